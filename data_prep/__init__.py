"""data_prep: convert image datasets to FFCV .beton files (run once, then train many times).

Every .beton this package writes has two fields: `image` (RGBImageField, RGB uint8) and `label` (IntField,
the class index: position of the class folder / synset in sorted order).
"""


class DataPrepError(Exception):
    """A problem with the user's input or output paths; `clmae-prep` prints it as one line and exits 2."""

    exit_code = 2


class BrokenDatasetError(DataPrepError):
    """`verify` found a .beton file unreadable, truncated or inconsistent (exit code 1: the check failed)."""

    exit_code = 1
