"""Build MNIST-M from MNIST and the BSDS500 photos with Ganin & Lempitsky's recipe (ICML 2015):
each MNIST digit d (brought to 32x32 like the release) is blended over a random 32x32 patch p of a
random BSDS500 *train* photo as out = |p - d| per pixel and channel.

Writes the layout of the release tarball under <out>/mnist_m/: mnist_m_{train,test}/<i:08d>.png and
mnist_m_{train,test}_labels.txt (`00000000.png 5` lines); image i is MNIST image i, and the first
59,001 train / 9,001 test digits are used, as in the release. Deterministic for a seed (default 0).

What it is: the release's recipe, sizes, layout and labels, not the release file bit for bit (the
release's random photo and patch draws are not published). `mnist_m_build.json` beside the images says
so, with the seed and the sizes.

Interruptible: the build works in <out>/mnist_m.partial/ (a PNG is written under a temporary name and
renamed, a split's label file is written last), a later build with the same settings resumes there,
and the folder is renamed to <out>/mnist_m when complete.
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from da_runner.data.digits import load_split, to_format
from da_runner.errors import UserError

RELEASE_SIZES = {"train": 59001, "test": 9001}
BUILD_INFO = "mnist_m_build.json"  # written last, then the folder is renamed: the marker of a complete build
RECIPE = "Ganin & Lempitsky (ICML 2015): |random 32x32 patch of a random BSDS500 train photo - MNIST digit at 32x32|"


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def resume_or_restart(work: Path, settings: dict) -> Path:
    """Make `work` the folder of a build with `settings`: a partial build there with the same settings
    (its settings.json) is kept to resume; one with other settings, or one stopped before it wrote
    them, is deleted. Files an interruption caught half-written (*.tmp) are removed. Returns the
    settings file, which the build deletes once it is complete."""
    started = work / "settings.json"
    if work.is_dir():
        try:
            resumable = json.loads(started.read_text()) == settings
        except (OSError, ValueError):
            resumable = False
        if not resumable:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    _write_atomic(started, json.dumps(settings).encode())
    for stale in work.glob("*.tmp"):
        stale.unlink()
    return started


def _write_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    _write_atomic(path, buf.getvalue())


def build_mnistm(mnist_root: Path, bsds: Path, out: Path, seed: int = 0, sizes=RELEASE_SIZES,
                 image_size: int = 32, progress: bool = True, cache_dir=None) -> dict[str, int]:
    """Write MNIST-M to <out>/mnist_m/ (normally out = <data.root>/mnist_m); returns the images per split."""
    out = Path(out).expanduser()
    final, work = out / "mnist_m", out / "mnist_m.partial"
    if final.exists() and any(final.iterdir()):
        raise UserError(f"{final} exists already; delete it to build MNIST-M again")
    settings = {"seed": int(seed), "sizes": {k: int(v) for k, v in sizes.items()}, "image_size": int(image_size)}
    started = resume_or_restart(work, settings)

    photos = load_bsds_train(bsds)
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in sizes.items():
        mnist = load_split("mnist", split == "train", mnist_root, cache_dir=cache_dir)
        count = min(int(count), len(mnist.y))
        digits = to_format(mnist.x[:count], image_size, 1)[:, 0].numpy()
        # Drawn for every split, done or not, so a resumed build makes the same draws as an uninterrupted one.
        images = blend_mnistm(digits, photos, rng)
        labels_file = work / f"mnist_m_{split}_labels.txt"
        if not labels_file.is_file():  # written last: the split's marker of completion
            folder = work / f"mnist_m_{split}"
            folder.mkdir(exist_ok=True)
            for stale in folder.glob("*.tmp"):  # a PNG the interruption caught half-written
                stale.unlink()
            for i in tqdm(range(count), desc=f"MNIST-M {split}", disable=not progress):
                path = folder / f"{i:08d}.png"
                if not path.is_file():  # PNGs of an interrupted build are complete (renamed into place)
                    _write_png(images[i], path)
            lines = "".join(f"{i:08d}.png {int(mnist.y[i])}\n" for i in range(count))
            _write_atomic(labels_file, lines.encode())
        written[split] = count

    info = {
        "what": "MNIST-M built by da_runner from MNIST and the BSDS500 train photos; the release's recipe, "
                "layout, sizes and labels, not the release file bit for bit",
        "recipe": RECIPE,
        **settings,
        "images": written,
    }
    _write_atomic(work / BUILD_INFO, json.dumps(info, indent=2).encode())
    started.unlink()
    if final.exists():
        final.rmdir()  # empty (checked above)
    os.replace(work, final)
    return written
