"""Build MNIST-M from MNIST and the BSDS500 photos with Ganin & Lempitsky's recipe (ICML 2015):
each MNIST digit d (brought to 32x32 like the release) is blended over a random 32x32 patch p of a
random BSDS500 *train* photo as out = |p - d| per pixel and channel.

Writes the layout of the release tarball: <out>/mnist_m_{train,test}/<i:08d>.png and
<out>/mnist_m_{train,test}_labels.txt (`00000000.png 5` lines); image i is MNIST image i, and the
first 59,001 train / 9,001 test digits are used, as in the release. Deterministic for a seed.
"""

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from da_runner.data.digits import load_split, to_format
from da_runner.errors import UserError

RELEASE_SIZES = {"train": 59001, "test": 9001}


def load_bsds_train(bsds: Path) -> list[np.ndarray]:
    """BSDS500 train photos, from the folder that holds `images/train/*.jpg` (or that folder itself)."""
    from PIL import Image

    bsds = Path(bsds).expanduser()
    candidates = [bsds / "images" / "train", bsds / "train", bsds]
    folder = next((c for c in candidates if c.is_dir() and any(c.glob("*.jpg"))), None)
    if folder is None:
        raise UserError("no BSDS500 train photos found; looked for *.jpg in " + ", ".join(map(str, candidates)))
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]


def blend_mnistm(digits: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """digits (N, H, W) uint8 -> (N, H, W, 3) uint8: |random photo patch - digit| per channel."""
    n, h, w = digits.shape
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    which = rng.integers(len(photos), size=n)
    for i in range(n):
        photo = photos[which[i]]
        top, left = rng.integers(photo.shape[0] - h + 1), rng.integers(photo.shape[1] - w + 1)
        patch = photo[top : top + h, left : left + w].astype(np.int16)
        out[i] = np.abs(patch - digits[i, :, :, None].astype(np.int16)).astype(np.uint8)
    return out


def build_mnistm(mnist_root: Path, bsds: Path, out: Path, seed: int = 0, sizes=RELEASE_SIZES,
                 image_size: int = 32, progress: bool = True) -> dict[str, int]:
    """Write MNIST-M to `out` (normally <data.root>/mnist_m); returns the number of images per split."""
    from PIL import Image

    photos = load_bsds_train(bsds)
    rng = np.random.default_rng(seed)
    out = Path(out).expanduser()
    written = {}
    for split, count in sizes.items():
        mnist = load_split("mnist", split == "train", mnist_root)
        count = min(count, len(mnist.y))
        digits = to_format(mnist.x[:count], image_size, 1)[:, 0].numpy()
        images = blend_mnistm(digits, photos, rng)
        folder = out / f"mnist_m_{split}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in tqdm(range(count), desc=f"MNIST-M {split}", disable=not progress):
            name = f"{i:08d}.png"
            Image.fromarray(images[i]).save(folder / name)
            lines.append(f"{name} {int(mnist.y[i])}\n")
        (out / f"mnist_m_{split}_labels.txt").write_text("".join(lines))
        written[split] = count
    return written
