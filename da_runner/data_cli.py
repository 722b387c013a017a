"""`da-data`: dataset maintenance commands.

    da-data build-mnistm [--root <data.root>] [--bsds <BSDS500 dir>]    writes <data.root>/mnist_m/mnist_m/
    da-data build-digits-seg [--mnist-root <dir>] [--bsds <BSDS500 dir>] [--out <data.root>]
                                                                         writes <data.root>/digits_seg/
"""

import argparse
import sys
from pathlib import Path

from da_runner.errors import UserError
from da_runner.paths import default_data_root


def main(argv=None) -> int:
    from da_runner.data.segmentation import DEFAULT_SIZES

    parser = argparse.ArgumentParser(prog="da-data", description="Dataset tools for da_runner.")
    commands = parser.add_subparsers(dest="command", required=True)
    root = default_data_root()
    build = commands.add_parser(
        "build-mnistm", help="build MNIST-M from MNIST and BSDS500 (Ganin's recipe), in the release layout",
        description="Blend each MNIST digit over a random patch of a random BSDS500 train photo: |patch - digit|. "
                    "Writes <out>/mnist_m/mnist_m_{train,test}/*.png and the label files, the release tarball's "
                    "layout; an interrupted build resumes where it stopped. `da-run ... data.download=true` does "
                    "the same after downloading MNIST and the BSDS500 photos.")
    build.add_argument("--root", type=Path, default=root,
                       help=f"data root holding MNIST/raw/ (the MNIST IDX files); default: $DA_DATA_ROOT, else the "
                            f"per-user folder, here {root}")
    build.add_argument("--bsds", type=Path, default=None,
                       help="BSDS500 folder holding images/train/*.jpg (e.g. BSR/BSDS500/data); default: <root>/bsds500")
    build.add_argument("--out", type=Path, default=None, help="output folder (default: <root>/mnist_m)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--train-size", type=int, default=59001, help="train images (the release has 59,001)")
    build.add_argument("--test-size", type=int, default=9001, help="test images (the release has 9,001)")
    seg = commands.add_parser(
        "build-digits-seg", help="build the digits_seg segmentation pair from MNIST and BSDS500",
        description="Canvases of 64x64 with up to four MNIST digits each and pixel labels (background + 10 digits) "
                    "from the strokes: the source on a black background, the target blended over BSDS500 photo "
                    "patches with the MNIST-M recipe. Writes <out>/digits_seg/{source_train,target_train,"
                    "target_test}.npz and digits_seg_build.json, which `da-run data=digits_seg` reads; an "
                    "interrupted build resumes, a complete one is reused.")
    seg.add_argument("--mnist-root", type=Path, default=root,
                     help=f"folder holding MNIST/raw/ (the MNIST IDX files); default: the data root, here {root}")
    seg.add_argument("--bsds", type=Path, default=None,
                     help="BSDS500 folder holding images/train/*.jpg and images/test/*.jpg (e.g. BSR/BSDS500/data); "
                          "default: <mnist-root>/bsds500")
    seg.add_argument("--out", type=Path, default=root,
                     help=f"data root to write digits_seg/ into; default: the data root, here {root}")
    seg.add_argument("--seed", type=int, default=0)
    seg.add_argument("--source-train", type=int, default=DEFAULT_SIZES["source_train"], help="source canvases")
    seg.add_argument("--target-train", type=int, default=DEFAULT_SIZES["target_train"], help="target training canvases")
    seg.add_argument("--target-test", type=int, default=DEFAULT_SIZES["target_test"], help="target test canvases")
    seg.add_argument("--cache-dir", type=Path, default=None,
                     help="decoded-MNIST cache (default: $XDG_CACHE_HOME/da_runner or ~/.cache/da_runner)")
    args = parser.parse_args(argv)
    if args.command == "build-digits-seg":
        return _build_digits_seg(args)

    from da_runner.data.mnistm_builder import build_mnistm

    try:
        out = args.out or args.root / "mnist_m"
        written = build_mnistm(args.root, args.bsds or args.root / "bsds500", out, seed=args.seed,
                               sizes={"train": args.train_size, "test": args.test_size})
    except UserError as err:
        print(f"da-data: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote MNIST-M to {out / 'mnist_m'}: " + ", ".join(f"{n} {split}" for split, n in written.items()))
    return 0


def _build_digits_seg(args) -> int:
    from da_runner.data.segmentation import BUILD_INFO, FOLDER, build_digits_seg

    sizes = {"source_train": args.source_train, "target_train": args.target_train, "target_test": args.target_test}
    folder = args.out.expanduser() / FOLDER
    complete = (folder / BUILD_INFO).is_file()
    try:
        info = build_digits_seg(args.mnist_root, args.bsds or args.mnist_root / "bsds500", args.out, seed=args.seed,
                                sizes=sizes, cache_dir=args.cache_dir)
    except UserError as err:
        print(f"da-data: error: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {split}" for split, n in info["sizes"].items())
    print(f"{folder} is complete already ({counts}, seed {info['seed']}): reused" if complete else
          f"wrote digits_seg to {folder}: {counts} canvases; target_test over the {info['photos']['target_test']} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
