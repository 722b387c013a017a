"""`da-data`: dataset maintenance commands.

    da-data build-mnistm [--root <data.root>] [--bsds <BSDS500 dir>]    writes <data.root>/mnist_m/mnist_m/
"""

import argparse
import sys
from pathlib import Path

from da_runner.errors import UserError
from da_runner.paths import default_data_root


def main(argv=None) -> int:
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
