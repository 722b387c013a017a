"""Real digit datasets from `data.root`, in the official layouts:

    <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte     torchvision's MNIST layout (IDX)
    <root>/usps/usps.bz2, usps.t.bz2                                   torchvision's USPS files (libsvm)
    <root>/svhn/{train,test}_32x32.mat                                 torchvision's SVHN files
    <root>/mnist_m/mnist_m.tar.gz                                      the MNIST-M release tarball, or it
    <root>/mnist_m/mnist_m/mnist_m_{train,test}/ + *_labels.txt        extracted (also without the inner mnist_m/)

MNIST, USPS and SVHN are read by torchvision's dataset classes; MNIST-M by reading the tarball's PNGs.
With `data.download=true`, missing MNIST / USPS / SVHN files come from torchvision's sources (MD5-checked)
and a missing MNIST-M is built from MNIST and the BSDS500 train photos (da_runner/data/fetch.py).
Each split is decoded once and cached as uint8 tensors in `data.cache_dir` (keyed by the source
files' size and modification time), so the next run starts in seconds even from a read-only root.
"""

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from da_runner.data.classes import ClassSelection, default_class_names
from da_runner.errors import MissingDataError, UserError, missing_data_message

MNISTM_HINT = ("MNIST-M (its release link is dead): set data.download=true to build it from MNIST and the BSDS500 "
               "photos (both downloaded), put the release tarball mnist_m.tar.gz there, or build it from local files "
               "with `da-data build-mnistm --root <data.root> --bsds <BSDS500 dir>`")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, C, H, W) uint8
    y: torch.Tensor  # (N,) int64


def _mnist_files(root: Path, train: bool) -> list[Path]:
    prefix = "train" if train else "t10k"
    return [root / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", root / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte"]


def _usps_files(root: Path, train: bool) -> list[Path]:
    return [root / "usps" / ("usps.bz2" if train else "usps.t.bz2")]


def _svhn_files(root: Path, train: bool) -> list[Path]:
    return [root / "svhn" / ("train_32x32.mat" if train else "test_32x32.mat")]


def _mnistm_files(root: Path, train: bool) -> list[Path]:
    """The tarball if present, else the extracted folder and label file (either nesting)."""
    split = "train" if train else "test"
    tarball = root / "mnist_m" / "mnist_m.tar.gz"
    if tarball.is_file():
        return [tarball]
    for base in (root / "mnist_m" / "mnist_m", root / "mnist_m"):
        if (base / f"mnist_m_{split}_labels.txt").is_file():
            return [base / f"mnist_m_{split}", base / f"mnist_m_{split}_labels.txt"]
    return [tarball]


def _mnist_class():
    """torchvision's MNIST, fetching from $DA_DATA_MIRROR/<file> when that is set (da_runner/data/fetch.py)."""
    from torchvision.datasets import MNIST

    from da_runner.data.fetch import mirror

    base = mirror()
    # Named MNIST: torchvision's folder is <root>/<class name>/raw.
    return type("MNIST", (MNIST,), {"mirrors": [f"{base}/"]}) if base else MNIST


def _load_mnist(root: Path, train: bool, download: bool) -> Split:
    ds = _mnist_class()(str(root), train=train, download=download)
    return Split(ds.data[:, None].contiguous(), ds.targets.long())


def _load_usps(root: Path, train: bool, download: bool) -> Split:
    from torchvision.datasets import USPS

    ds = USPS(str(root / "usps"), train=train, download=download)
    return Split(torch.from_numpy(ds.data)[:, None].contiguous(), torch.tensor(ds.targets, dtype=torch.long))


def _load_svhn(root: Path, train: bool, download: bool) -> Split:
    from torchvision.datasets import SVHN

    ds = SVHN(str(root / "svhn"), split="train" if train else "test", download=download)
    return Split(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long())


def _load_mnistm(root: Path, train: bool, download: bool) -> Split:
    from PIL import Image

    split = "train" if train else "test"
    files = _mnistm_files(root, train)
    if files[0].name == "mnist_m.tar.gz":
        # One sequential pass: seeking backwards in a .tar.gz decompresses from the start again.
        wanted, blobs, labels_text = f"mnist_m_{split}/", {}, None
        with tarfile.open(files[0], mode="r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name.endswith(f"mnist_m_{split}_labels.txt"):
                    labels_text = tar.extractfile(member).read().decode()
                elif wanted in member.name:
                    blobs[member.name.rsplit("/", 1)[-1]] = tar.extractfile(member).read()
        if labels_text is None:
            raise UserError(f"{files[0]} has no mnist_m_{split}_labels.txt; is it the MNIST-M release tarball?")
        return _decode_mnistm(labels_text, blobs.__getitem__, Image)
    folder, label_file = files
    return _decode_mnistm(label_file.read_text(), lambda name: (folder / name).read_bytes(), Image)


def _decode_mnistm(labels_text: str, read, Image) -> Split:
    """Label file lines `00000000.png 5`, in order; image i is MNIST image i blended."""
    entries = [line.split() for line in labels_text.splitlines() if line.strip()]
    images = np.stack([np.asarray(Image.open(io.BytesIO(read(name))).convert("RGB")) for name, _ in entries])
    labels = torch.tensor([int(label) for _, label in entries], dtype=torch.long)
    return Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


DATASETS = {
    "mnist": (_mnist_files, _load_mnist),
    "usps": (_usps_files, _load_usps),
    "svhn": (_svhn_files, _load_svhn),
    "mnistm": (_mnistm_files, _load_mnistm),
}
DOWNLOADABLE = ("mnist", "usps", "svhn", "mnistm")  # mnistm: built from downloaded MNIST and BSDS500 photos
DIGIT_CLASSES = default_class_names(10)  # every digit dataset's labels are the digits 0-9


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "da_runner"


def _fingerprint(paths: list[Path]) -> str:
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)


def missing_files(name: str, train: bool, root) -> list[Path]:
    files_of, _ = DATASETS[name]
    return [p for p in files_of(Path(root).expanduser(), train) if not p.exists()]


def missing_message(root, missing: dict[str, list[Path]]) -> str:
    """One message naming every missing file of every dataset, and how to get them."""
    hints = []
    if any(name in ("mnist", "usps", "svhn") for name in missing):
        hints.append("MNIST / USPS / SVHN: set data.download=true to fetch them from the official sources.")
    if "mnistm" in missing:
        hints.append(MNISTM_HINT)
    return missing_data_message(root, missing, hints)


def fetch_split(name: str, train: bool, root, cache_dir=None) -> None:
    """Fetch the missing files of one split: torchvision's download (MD5-checked) for MNIST, USPS and SVHN,
    MNIST-M built from MNIST and the BSDS500 photos. Nothing half-written is left (da_runner/data/fetch.py)."""
    from da_runner.data import fetch

    root = Path(root).expanduser()
    if name == "mnistm":
        fetch.fetch_mnistm(root, cache_dir=cache_dir)
        return
    missing = missing_files(name, train, root)
    try:
        fetch.fetch_with_torchvision(name, root, train, DATASETS[name][1])
    except Exception as err:  # network errors come in many types; all mean the same to the user
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise MissingDataError("\n".join([f"downloading {name} into {root} failed ({reason}); put these files "
                                          "there by hand:", *_by_hand(name, train, missing)])) from err


def _by_hand(name: str, train: bool, missing: list[Path]) -> list[str]:
    """`  <URL>  ->  <path>` for each missing file: torchvision's sources (or DA_DATA_MIRROR's, for MNIST)."""
    from torchvision.datasets import SVHN, USPS

    if name == "mnist":
        return [f"  {_mnist_class().mirrors[0]}{path.name}.gz  ->  gunzip to {path}" for path in missing]
    table = USPS.split_list if name == "usps" else SVHN.split_list
    url = table["train" if train else "test"][0]
    return [f"  {url}  ->  {path}" for path in missing]


def load_split(name: str, train: bool, root, cache_dir=None, download: bool = False) -> Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64 of one split of a digit dataset."""
    if name not in DATASETS:
        raise UserError(f"unknown digit dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    root = Path(root).expanduser()
    files_of, loader = DATASETS[name]
    missing = missing_files(name, train, root)
    if missing and download and name in DOWNLOADABLE:
        fetch_split(name, train, root, cache_dir)
        missing = missing_files(name, train, root)
    if missing:
        raise MissingDataError(missing_message(root, {name: missing}))
    files = files_of(root, train)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache = cache_dir / f"{name}_{'train' if train else 'test'}.pt"
    fingerprint = _fingerprint(files)
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            if cached.get("fingerprint") == fingerprint:
                return Split(cached["x"], cached["y"])
        except Exception:  # an unreadable cache is rebuilt, never fatal
            pass
    split = loader(root, train, False)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        torch.save({"fingerprint": fingerprint, "x": split.x, "y": split.y}, tmp)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs decoding time next run
    return split


def to_format(x: torch.Tensor, size: int, channels: int, chunk: int = 8192) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, channels, size, size) uint8: grey <-> RGB and bilinear resize."""
    if x.shape[1] == channels and tuple(x.shape[2:]) == (size, size):
        return x
    out = torch.empty((len(x), channels, size, size), dtype=torch.uint8)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].float()
        if part.shape[1] == 3 and channels == 1:
            part = (part * luma).sum(1, keepdim=True)
        elif part.shape[1] == 1 and channels == 3:
            part = part.expand(-1, 3, -1, -1)
        if tuple(part.shape[2:]) != (size, size):
            part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + chunk] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def _subset(split: Split, size, rng: np.random.Generator) -> Split:
    """A random `size`-sample subset (all of it when size is null), in random order."""
    order = rng.permutation(len(split.y))
    if size is not None:
        if not 0 < int(size) <= len(split.y):
            raise UserError(f"subset size {size} must be between 1 and the split's {len(split.y)} samples")
        order = order[: int(size)]
    index = torch.from_numpy(order)
    return Split(split.x[index], split.y[index])


def build_digit_pair(cfg):
    """A source -> target pair of real digit datasets (`data.source`, `data.target`), both brought to
    `data.channels` x `data.size` x `data.size`. Source train is split into train and held-out
    validation; the target's training split is the unlabelled adaptation data and its test split
    is where accuracy is reported."""
    from da_runner.data.domain import DomainPair
    from da_runner.data.memory import InMemoryDomain, split_source

    def load(name: str, train: bool) -> Split:
        split = load_split(name, train, cfg.root, cfg.cache_dir, bool(cfg.download))
        return Split(to_format(split.x, int(cfg.size), int(cfg.channels)), split.y)

    # Report every missing file of the pair at once, not one dataset per attempt.
    needed = [(cfg.source, True), (cfg.target, True), (cfg.target, False)]
    missing: dict[str, list[Path]] = {}
    for name, train in needed:
        if name not in DATASETS:
            raise UserError(f"unknown digit dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
        if not (cfg.download and name in DOWNLOADABLE):
            missing.setdefault(name, []).extend(missing_files(name, train, cfg.root))
    # train and test may share a file (the MNIST-M tarball): list each once
    missing = {name: list(dict.fromkeys(paths)) for name, paths in missing.items() if paths}
    if missing:
        raise MissingDataError(missing_message(Path(cfg.root).expanduser(), missing))

    # Class subsets (data.source_classes / target_classes) are applied to every pair by build_pair;
    # dropping the other classes' samples already here makes data.source_subset / target_subset
    # count samples of the kept classes.
    selection = ClassSelection.from_config(cfg, DIGIT_CLASSES)

    def kept_classes(split: Split, domain: str) -> Split:
        if selection is None:
            return split
        index, _ = selection.keep(split.y, domain)
        return Split(split.x[index], split.y[index])

    # MNIST-M first: its fetch brings MNIST too, and its failure names every file of the chain.
    if cfg.download and "mnistm" in (cfg.source, cfg.target) and (
            missing_files("mnistm", True, cfg.root) or missing_files("mnistm", False, cfg.root)):
        fetch_split("mnistm", True, cfg.root, cfg.cache_dir)

    rng = np.random.default_rng(int(cfg.seed))
    source = _subset(kept_classes(load(cfg.source, True), "source"), cfg.source_subset, rng)
    target_train = _subset(kept_classes(load(cfg.target, True), "target"), cfg.target_subset, rng)
    target_test = load(cfg.target, False)
    source_train, source_val = split_source(source.x, source.y, float(cfg.source_val_fraction))
    return DomainPair(
        name=cfg.name,
        source_train=source_train,
        source_val=source_val,
        target_train=InMemoryDomain(target_train.x, target_train.y),
        target_test=InMemoryDomain(target_test.x, target_test.y),
        num_classes=10,
    )
