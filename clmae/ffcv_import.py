"""Importing FFCV without the numba compilation its image field runs on import.

FFCV 1.0.2 builds `ffcv.fields.rgb_image.IMAGE_MODES`, a two-entry table ({"jpg": 0, "raw": 1}), as a
`numba.typed.Dict`. Creating the first typed Dict JIT-compiles numba's dictionary implementation: 6-8 s of
one CPU core in every process that imports FFCV (each training rank, each restart, each dataloader test),
more than torch's own import. FFCV reads the table only from Python (in `generate_code`, before any
jitted code runs, and in the writer), so a plain dict behaves identically. `import_ffcv` imports the
module with `numba.typed.Dict` briefly standing for `dict`, and checks the table it got.

Call it before the first `from ffcv... import`; later imports find the module already loaded.
"""

from __future__ import annotations

import sys

IMAGE_FIELD_MODULE = "ffcv.fields.rgb_image"
EXPECTED_IMAGE_MODES = {"jpg": 0, "raw": 1}


def import_ffcv() -> None:
    """Import FFCV's image field with IMAGE_MODES as a plain dict (a no-op once it is imported)."""
    if IMAGE_FIELD_MODULE in sys.modules:
        return
    import numba.typed

    # numba.typed resolves Dict lazily (a module __getattr__); shadow it for the import, then unshadow
    # without loading numba's typed-dict module ourselves
    loaded = vars(numba.typed).get("Dict")
    numba.typed.Dict = dict
    try:
        import ffcv.fields.rgb_image as rgb_image
    finally:
        if loaded is None:
            del numba.typed.Dict
        else:
            numba.typed.Dict = loaded
    if dict(rgb_image.IMAGE_MODES) != EXPECTED_IMAGE_MODES:  # another FFCV than the one setup.py pins
        raise ImportError(
            f"{IMAGE_FIELD_MODULE}.IMAGE_MODES is {dict(rgb_image.IMAGE_MODES)}, expected {EXPECTED_IMAGE_MODES}: "
            "clmae supports the FFCV version pinned in setup.py"
        )
