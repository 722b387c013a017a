"""File-backed image domains, for data that does not fit in memory (Office-31, Office-Home, VisDA,
DomainNet, any folder of images).

Images are decoded from their files by DataLoader worker processes while the model computes, with
torchvision's transforms v2:

    training:   resize to resize x resize, random resized crop to image_size, horizontal flip
    evaluation: resize to resize x resize, centre crop to image_size

The resize is to a square, as the reference UDA code bases do (Transfer-Learning-Library's
ResizeImage, CDAN's), so the centre crop keeps the whole object of a non-square photo. Workers
hand back uint8 crops (4x less to move than float32) in page-locked memory when the run is on a GPU;
the copy to the device is asynchronous, and the ImageNet normalisation happens there, as tensor ops,
exactly as for the in-memory digits.

Exact resume: the stream's `EpochOrder` (a generator of its own) decides which images each batch
holds, and each image's crop and flip are drawn from a seed computed from (stream seed, epoch,
position in the epoch), set inside the dataset's `__getitem__`. Neither depends on which worker
decodes which image or on how far the workers have read ahead, so a stream restored from its
`state_dict()` delivers the same images with the same crops as one that never stopped.
"""

import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from da_runner.data.augment import NO_INVERSION, Inversion, check_level
from da_runner.data.domain import EpochOrder, sample_index
from da_runner.data.memory import normalize_images, unnormalize_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_num_workers() -> int:
    """min(4, the CPU cores this process may use): images decode in parallel while the model
    computes, without taking every core of a large shared machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores)


def image_transform(image_size: int, resize: int, augment: str = "none", invert: Inversion = NO_INVERSION):
    """PIL image -> (3, image_size, image_size) uint8 tensor. `augment` (data.augment): none, the
    evaluation's resize and centre crop; weak, a random resized crop and a horizontal flip; strong,
    weak followed by torchvision's RandAugment (two operations at magnitude 9, as in its paper).
    `invert` (data.invert, data.invert_channels; training only) inverts the colours last."""
    from torchvision.transforms import v2

    steps = [v2.Resize((resize, resize), antialias=True)]
    if check_level(augment) == "none":
        steps += [v2.CenterCrop(image_size)]
    else:
        steps += [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        if augment == "strong":
            steps += [v2.RandAugment(num_ops=2, magnitude=9)]
    steps += [v2.PILToTensor()]
    if invert:
        steps += [ChannelInvert(invert.probability) if invert.per_channel else v2.RandomInvert(p=invert.probability)]
    return v2.Compose(steps)


class ChannelInvert:
    """Inverts each channel of a uint8 image tensor (C, H, W) with probability `p`, drawing from the
    global CPU generator (seeded per sample by `ImageFiles.seeded`)."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inverted = (torch.rand(x.shape[0]) < self.p).view(-1, 1, 1)
        return torch.where(inverted, 255 - x, x)


def sample_seed(stream_seed: int, epoch: int, position: int) -> int:
    """The seed of one training sample's augmentation: a function of where the sample stands in its
    stream, never of the worker that happens to decode it."""
    return int(np.random.SeedSequence([stream_seed % 2**64, epoch, position]).generate_state(1, np.uint64)[0])


def view_seed(seed: int, view: int) -> int:
    """The seed of a sample's further augmented view: view 0 draws from the sample's own seed, so a
    stream's first view is the batch a single-view stream hands out."""
    return seed if view == 0 else int(np.random.SeedSequence([seed, view]).generate_state(1, np.uint64)[0])


class ImageFiles(Dataset):
    """Decodes image files. A key is an index (no randomness: evaluation) or an (index, seed) pair
    (training: the transform's random draws come from `seed`). With several transforms (`views`,
    one per augmentation level) a sample is the stack (V, 3, H, W) of its views, view v drawing
    from `view_seed(seed, v)`."""

    def __init__(self, files: np.ndarray, labels: np.ndarray, transform, decode_size: int, views=None):
        # numpy arrays rather than lists of Python objects: forked workers then share the pages
        # instead of copying them as reference counts change (DomainNet lists 600,000 files).
        self.files, self.labels, self.transform, self.decode_size = files, labels, transform, decode_size
        self.views = views

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = key if isinstance(key, tuple) else (key, None)
        with Image.open(self.files[index]) as image:
            # JPEGs at least twice the target size are decoded at 1/2, 1/4 or 1/8 scale directly
            # (DCT scaling): much faster for large photos, and still at least decode_size pixels.
            image.draft("RGB", (self.decode_size, self.decode_size))
            image = image.convert("RGB")
        if seed is None:
            x = self.transform(image)
        elif self.views is None:
            x = self.seeded(self.transform, image, seed)
        else:
            x = torch.stack([self.seeded(t, image, view_seed(seed, v)) for v, t in enumerate(self.views)])
        return x, int(self.labels[index])

    @staticmethod
    def seeded(transform, image, seed: int) -> torch.Tensor:
        # A private RNG state for the draw, so that decoding in the main process (num_workers=0)
        # leaves the training's global RNG (dropout, ...) untouched. Only the CPU generator, which
        # the transforms draw from, is seeded: torch.manual_seed would also queue a seed for each
        # accelerator backend (CUDA, XPU, MTIA), recording a stack trace each time (0.1-0.2 ms an
        # image, half again the decoding of a small crop), and reseed a GPU's generator, which
        # fork_rng(devices=[]) does not restore.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return transform(image)


@dataclass(kw_only=True)
class FileDomain:
    """What every file-backed domain shares: DataLoader workers, page-locked memory on a GPU, and the
    per-channel normalisation done on the device (subclasses: ImageFileDomain, and the segmentation
    pairs' cityscapes.SegmentationFileDomain)."""

    num_workers: int = 0
    pin_memory: bool = True  # page-locked batches, used only when the device is a GPU
    device: torch.device = torch.device("cpu")
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.files = np.asarray(self.files, dtype=str)
        self.device = torch.device(self.device)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def is_image(self) -> bool:
        return True

    def to(self, device):
        return replace(self, device=torch.device(device))

    def sample(self, size: int, seed: int = 0):
        if size >= len(self):
            return self
        return self.subset(sample_index(len(self), size, seed))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A uint8 batch from the loader -> normalised float on the device (the copy overlaps
        compute when the batch is in page-locked memory)."""
        return normalize_images(x.to(self.device, non_blocking=True), self._mean, self._std)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return unnormalize_images(x, self._mean, self._std)


@dataclass
class ImageFileDomain(FileDomain):
    """Images read from `files` (paths) with labels `y`, decoded by DataLoader workers on demand."""

    files: np.ndarray  # (N,) paths
    y: torch.Tensor  # (N,) int64
    image_size: int = 224
    resize: int = 256

    def __post_init__(self):
        super().__post_init__()
        if len(self.files) != len(self.y):
            raise ValueError(f"{len(self.files)} files but {len(self.y)} labels")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def subset(self, index: torch.Tensor, labels: torch.Tensor | None = None) -> "ImageFileDomain":
        index = index.cpu()
        return replace(self, files=self.files[index.numpy()], y=self.y[index] if labels is None else labels.cpu())

    def loader(self, augment: str = "none", views: tuple[str, ...] | None = None, invert: Inversion = NO_INVERSION,
               **kwargs) -> DataLoader:
        """A DataLoader over the files with the transform of `augment` (none, no inversion: the
        evaluation's), or with one transform per level of `views`, whose batches are then
        (B, V, 3, H, W); kwargs choose the batches (batch_size or batch_sampler)."""
        view_transforms = None if views is None else [image_transform(self.image_size, self.resize, level, invert)
                                                     for level in views]
        dataset = ImageFiles(self.files, self.y.numpy(), image_transform(self.image_size, self.resize, augment, invert),
                             self.resize, view_transforms)
        return DataLoader(dataset, num_workers=self.num_workers,
                          pin_memory=self.pin_memory and self.device.type == "cuda",
                          # Its own generator: starting a loader (at the start, on resume, at each
                          # evaluation) then draws no number from the global RNG the training uses.
                          generator=torch.Generator(), **kwargs)

    def batches(self, batch_size: int):
        for x, y in self.loader(batch_size=batch_size):
            yield self.prepare(x), y.to(self.device, non_blocking=True)

    def stream(self, batch_size: int, seed: int, augment: str | None = None,
               invert: Inversion = NO_INVERSION) -> "FileBatchStream":
        """Training batches; `augment` (data.augment, None: weak, the random crop and flip) and
        `invert` (data.invert) pick the training transform (`image_transform`)."""
        return FileBatchStream(self, batch_size, seed, check_level(augment or "weak"), invert)


class FileBatchStream:
    """A never-ending stream of augmented training batches from an `ImageFileDomain`.

    The DataLoader's workers read ahead of the training loop, so the position that counts (what
    checkpoints hold) is that of the batches handed to the trainer: `order` advances only then, while
    the loader's batch sampler walks a copy of it, ahead. Loading a state restarts the sampler from
    the loaded position (the workers stay: they are persistent).
    """

    def __init__(self, domain: ImageFileDomain, batch_size: int, seed: int, augment: str = "weak",
                 invert: Inversion = NO_INVERSION):
        self.domain, self.invert = domain, invert
        # The sampler owns the position and the stream reaches it through the loader: no reference
        # cycle, so a dropped stream shuts its workers down at once rather than at a later GC pass.
        keys = _SampleKeys(EpochOrder(len(domain), batch_size, seed), seed)
        self.loader = domain.loader(augment, invert=invert, batch_sampler=keys, persistent_workers=domain.num_workers > 0)
        self._batches = None  # the loader's iterator, started at the first draw
        self.last_index: torch.Tensor | None = None  # dataset indices of the batch handed out last
        self.views: tuple[str, ...] | None = None  # the levels the workers decode each sample at (next_views)

    @property
    def order(self) -> EpochOrder:
        return self.loader.batch_sampler.order

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._next_raw()
        if self.views is not None:  # the workers decode several views: the first is the plain batch
            x = x[:, 0]
        return self.domain.prepare(x), y.to(self.domain.device, non_blocking=True)

    def _next_raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader's next uint8 batch as the workers hand it over, the position advanced."""
        if self._batches is None:
            self._batches = iter(self.loader)
        x, y = next(self._batches)
        # The sampler's copy of the order drew the same indices for this batch, ahead of time.
        index, _, _ = self.order.next_batch()
        self.last_index = index.to(self.domain.device)
        return x, y

    def next_views(self, levels: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The next batch's images once per augmentation level in `levels`, each view with draws of
        its own (FixMatch's weak and strong views), and their labels; the first view is what `next()`
        would have returned. The first call switches the workers to decoding every view of a sample
        together (a run asks for the same levels every step)."""
        levels = tuple(check_level(level) for level in levels)
        if levels != self.views:
            sampler = self.loader.batch_sampler
            self.loader = self.domain.loader(views=levels, invert=self.invert, batch_sampler=sampler,
                                             persistent_workers=self.domain.num_workers > 0)
            self.views, self._batches = levels, None
        x, y = self._next_raw()
        return [self.domain.prepare(x[:, v]) for v in range(len(levels))], y.to(self.domain.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "seed": self.loader.batch_sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.loader.batch_sampler.seed = int(state["seed"])
        self._batches = None  # what the workers have read ahead belongs to the old position


class _SampleKeys:
    """The stream's batch sampler: from the position `order` on, forever, each batch as the list of
    (index, augmentation seed) keys that `ImageFiles` reads."""

    def __init__(self, order: EpochOrder, seed: int):
        self.order, self.seed = order, seed

    def __iter__(self):
        order, seed = self.order.copy(), self.seed
        while True:
            index, epoch, start = order.next_batch()
            yield [(i, sample_seed(seed, epoch, start + j)) for j, i in enumerate(index.tolist())]
