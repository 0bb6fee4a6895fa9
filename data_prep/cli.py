"""`clmae-prep` / `python -m data_prep`: dataset conversion to FFCV.

    clmae-prep imagefolder SRC OUT.beton      class-per-subfolder tree -> one .beton (+ class index)
    clmae-prep imagenet ROOT OUTDIR           ImageNet-1k -> OUTDIR/{train,val}.beton + OUTDIR/classes.json
    clmae-prep digits OUTDIR                  the bundled scikit-learn digits -> OUTDIR/{train,val}.beton
    clmae-prep fashion-mnist OUTDIR           Fashion-MNIST (Debian package dataset-fashion-mnist) -> same
    clmae-prep downstream NAME SRC OUTDIR     svhn | stanford_cars | cub | mit_indoor | food101, split as the
                                              CL-MAE reference splits them -> train/val(/test).beton + JSON
    clmae-prep verify FILE.beton              counts, classes, sizes; decodes samples; exit 1 if broken

Heavy modules (FFCV, numba, torch) are imported only by the command that needs them, after the paths
have been checked: `--help` and input mistakes answer at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from data_prep import DataPrepError
from data_prep.outputs import available_cpus

DIGITS_IMAGE_SIZE = 32  # the tiny model's input: 8x8 patches of 4 px
DIGITS_VAL_COUNT = 300  # of 1,797: 1,497 train / 300 val, stratified


def _add_writer_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("writer (FFCV's ImageNet recipe by default)")
    group.add_argument(
        "--max-resolution", type=int, default=500, help="longest side after resizing, 0 keeps the original size"
    )
    group.add_argument(
        "--write-mode",
        choices=("proportion", "smart", "jpg", "raw"),
        default="proportion",
        help="proportion: a random --compress-probability share as JPEG, the rest raw; smart: JPEG when raw "
        "pixels exceed --smart-threshold bytes; jpg / raw: all one way",
    )
    group.add_argument("--compress-probability", type=float, default=0.5)
    group.add_argument("--jpeg-quality", type=int, default=90)
    group.add_argument("--smart-threshold", type=int, default=256 * 256 * 3, metavar="BYTES")
    _add_common_options(group)
    group.add_argument("--chunk-size", type=int, default=100, help="samples per task handed to a worker")
    group.add_argument(
        "--subset", type=int, default=0, metavar="N", help="only N source files, evenly spread over the classes"
    )


def _add_common_options(group) -> None:
    group.add_argument("--workers", type=int, default=available_cpus(), help="worker processes")
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_fashion_parser(sub, defaults_shown: dict) -> None:
    fashion = sub.add_parser(
        "fashion-mnist",
        **defaults_shown,
        help="Fashion-MNIST (70,000 images) -> train/val .beton",
        description="Zalando's Fashion-MNIST from its IDX files: 60,000 train images -> train.beton, the official "
        "10,000 test images -> val.beton; 28x28 grayscale stored raw as RGB (the loader resizes). The files come "
        "from the Debian package dataset-fashion-mnist (`make setup` installs it).",
    )
    fashion.add_argument("outdir", type=Path, metavar="OUTDIR")
    fashion.add_argument(
        "--source",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder with the four IDX files (.gz or not); "
        "default: the Debian package's /usr/share/datasets/fashion-mnist",
    )
    fashion.add_argument(
        "--subset", type=int, default=0, metavar="N", help="only N images of each split, evenly spread (tests)"
    )
    _add_common_options(fashion)
    fashion.set_defaults(run=_run_fashion_mnist)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clmae-prep", description="Convert image datasets to FFCV .beton files.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults_shown = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    imagefolder = sub.add_parser(
        "imagefolder",
        **defaults_shown,
        help="class-per-subfolder tree -> one .beton",
        description="SRC/<class>/<image>: labels are class folder indices in sorted order. Writes OUT, "
        "OUT.classes.json and OUT.skipped.json (every file left out, with the reason).",
    )
    imagefolder.add_argument("src", type=Path, metavar="SRC")
    imagefolder.add_argument("out", type=Path, metavar="OUT.beton")
    _add_writer_options(imagefolder)
    imagefolder.set_defaults(run=_run_imagefolder)

    imagenet = sub.add_parser(
        "imagenet",
        **defaults_shown,
        help="ImageNet-1k train/ and val/ -> train.beton, val.beton, class index",
        description="ROOT/train/<synset>/ and ROOT/val/ (synset folders, or flat files labelled by "
        "LOC_val_solution.csv); Kaggle's ROOT/ILSVRC/Data/CLS-LOC/ layout works too. Labels are indices of "
        "the synsets in sorted order (0 = n01440764); OUTDIR/classes.json maps synset -> index -> name "
        "(names from LOC_synset_mapping.txt when present).",
    )
    imagenet.add_argument("root", type=Path, metavar="ROOT")
    imagenet.add_argument("outdir", type=Path, metavar="OUTDIR")
    _add_writer_options(imagenet)
    imagenet.set_defaults(run=_run_imagenet)

    digits = sub.add_parser(
        "digits",
        **defaults_shown,
        help="the embedded scikit-learn digits set -> train/val .beton",
        description="scikit-learn's bundled 1,797 8x8 handwritten digits (no download), split 1,497 / 300 "
        "stratified and seeded, upsampled (bicubic) to RGB, stored raw.",
    )
    digits.add_argument("outdir", type=Path, metavar="OUTDIR")
    digits.add_argument("--size", type=int, default=DIGITS_IMAGE_SIZE, help="output side length in pixels")
    digits.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    _add_common_options(digits)
    digits.set_defaults(run=_run_digits)

    _add_fashion_parser(sub, defaults_shown)

    from data_prep.downstream import add_downstream_parser

    add_downstream_parser(sub, defaults_shown, _add_writer_options)

    verify = sub.add_parser(
        "verify",
        **defaults_shown,
        help="check a .beton file (exit 1 when broken)",
        description="Print samples, classes and image sizes; check the file's tables; decode the first, middle "
        "and last image (or all). Exit code 1 when the file is truncated or inconsistent.",
    )
    verify.add_argument("file", type=Path, metavar="FILE.beton")
    verify.add_argument("--decode-all", action="store_true", help="decode every image, not three")
    verify.set_defaults(run=_run_verify)
    return parser


def _writer_options(args: argparse.Namespace):
    from data_prep.outputs import WriteOptions

    return WriteOptions(
        max_resolution=args.max_resolution if args.max_resolution > 0 else None,
        write_mode=args.write_mode,
        compress_probability=args.compress_probability,
        jpeg_quality=args.jpeg_quality,
        smart_threshold=args.smart_threshold,
        workers=args.workers,
        chunk_size=args.chunk_size,
    )


def _run_imagefolder(args: argparse.Namespace) -> int:
    from data_prep.outputs import check_output, write_class_index
    from data_prep.sources import scan_class_tree, spread_subset

    check_output(args.out, args.overwrite)
    options = _writer_options(args)
    source = scan_class_tree(args.src)
    source.samples = spread_subset(source.samples, args.subset)
    # FFCV (seconds to import) only once the inputs and outputs are known to be usable.
    from data_prep.writer import write_files

    result = write_files(source, args.out, options, overwrite=args.overwrite)
    write_class_index(args.out.with_name(args.out.name + ".classes.json"), source.classes, source.classes)
    print(result.summary())
    return 0


def _run_imagenet(args: argparse.Namespace) -> int:
    from data_prep.outputs import check_output, write_class_index
    from data_prep.sources import imagenet_layout, imagenet_val, scan_class_tree, spread_subset, synset_names

    outputs = [args.outdir / "train.beton", args.outdir / "val.beton"]
    for out in outputs:
        check_output(out, args.overwrite)
    options = _writer_options(args)
    layout = imagenet_layout(args.root)
    train = scan_class_tree(layout.train_dir)
    val = imagenet_val(layout, train.classes)
    train.samples = spread_subset(train.samples, args.subset)
    val.samples = spread_subset(val.samples, args.subset)
    from data_prep.writer import write_files

    splits = zip((train, val), outputs, strict=True)
    results = [write_files(split, out, options, args.overwrite) for split, out in splits]
    write_class_index(args.outdir / "classes.json", train.classes, synset_names(layout, train.classes))
    for result in results:
        print(result.summary())
    return 0


def _run_digits(args: argparse.Namespace) -> int:
    from data_prep.outputs import check_output, write_class_index
    from data_prep.sources import digits_split

    outputs = [args.outdir / "train.beton", args.outdir / "val.beton"]
    for out in outputs:
        check_output(out, args.overwrite)
    if args.size < 8:
        raise DataPrepError("--size must be >= 8 (the digits are 8x8)")
    splits = digits_split(args.size, DIGITS_VAL_COUNT, args.seed)
    from data_prep.outputs import WriteOptions
    from data_prep.writer import write_arrays

    # Raw: a 32x32 image is 3 KiB, and decoding it must cost nothing next to the tiny model's step.
    options = WriteOptions(max_resolution=None, write_mode="raw", workers=args.workers)
    for (images, labels), out in zip(splits, outputs, strict=True):
        print(write_arrays(images, labels, out, options, args.overwrite).summary())
    digit_names = [str(digit) for digit in range(10)]
    write_class_index(args.outdir / "classes.json", digit_names, digit_names)
    return 0


def _run_fashion_mnist(args: argparse.Namespace) -> int:
    from data_prep import fashion_mnist
    from data_prep.outputs import WriteOptions, check_output, write_class_index

    outputs = {split: args.outdir / f"{split}.beton" for split in fashion_mnist.SPLITS}
    for out in outputs.values():
        check_output(out, args.overwrite)
    started = time.perf_counter()
    source = args.source or fashion_mnist.DEFAULT_SOURCE
    splits = {split: fashion_mnist.load_split(source, split) for split in outputs}  # all read before any write
    from data_prep.writer import write_arrays

    # Raw: 2.3 KiB an image, and decoding costs nothing next to the model's step.
    options = WriteOptions(max_resolution=None, write_mode="raw", workers=args.workers)
    written = 0
    for split, (images, labels) in splits.items():
        keep = fashion_mnist.spread(args.subset, len(labels))
        print(write_arrays(images[keep], labels[keep], outputs[split], options, args.overwrite).summary())
        written += len(keep)
    write_class_index(args.outdir / "classes.json", fashion_mnist.CLASS_NAMES, fashion_mnist.CLASS_NAMES)
    seconds = time.perf_counter() - started
    print(f"converted {written} images in {seconds:.1f} s ({written / seconds:.0f} images/s, {args.workers} workers)")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from data_prep.verify import verify

    print("\n".join(verify(args.file, decode_all=args.decode_all).lines()))
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except DataPrepError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code)
