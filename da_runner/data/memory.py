"""In-memory datasets for small data: whole tensors on the training device, batches by index.

Images stay uint8 (4x smaller than float32, so even a GPU holds them whole); a batch is gathered
by index and converted to normalised float as tensor ops on the device. No DataLoader, no workers,
no per-sample Python work in the training loop.
"""

from dataclasses import dataclass, field

import torch

from da_runner.data.augment import NO_INVERSION, Inversion, augment, batch_seed, check_level
from da_runner.data.domain import EpochOrder, sample_index, validation_size
from da_runner.errors import UserError


@dataclass
class InMemoryDomain:
    """Inputs `x` (N, C, H, W) uint8 images or (N, D) float features, labels `y` (N,) int64, or label
    maps (N, H, W) uint8 for segmentation."""

    x: torch.Tensor
    y: torch.Tensor
    mean: tuple[float, ...] = ()  # per-channel normalisation of uint8 images (after scaling to [0, 1])
    std: tuple[float, ...] = ()
    _mean: torch.Tensor | None = field(default=None, init=False, repr=False)
    _std: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} inputs but {len(self.y)} labels")
        if self.is_image:
            channels = self.x.shape[1]
            self.mean = tuple(self.mean) or (0.5,) * channels
            self.std = tuple(self.std) or (0.5,) * channels
            self._mean = torch.tensor(self.mean, device=self.x.device).view(1, -1, 1, 1)
            self._std = torch.tensor(self.std, device=self.x.device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def is_image(self) -> bool:
        return self.x.dtype == torch.uint8

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def to(self, device) -> "InMemoryDomain":
        return InMemoryDomain(self.x.to(device), self.y.to(device), self.mean, self.std)

    def sample(self, size: int, seed: int = 0) -> "InMemoryDomain":
        """A fixed random subset of at most `size` samples (the same for a given seed)."""
        if size >= len(self):
            return self
        return self.subset(sample_index(len(self), size, seed))

    def subset(self, index: torch.Tensor, labels: torch.Tensor | None = None) -> "InMemoryDomain":
        index = index.to(self.x.device)
        y = self.y[index] if labels is None else labels.to(self.y.device)
        return InMemoryDomain(self.x[index], y, self.mean, self.std)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw stored inputs -> the float tensor the network sees."""
        return normalize_images(x, self._mean, self._std) if self.is_image else x

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs back to [0, 1] images (for pictures in TensorBoard)."""
        return unnormalize_images(x, self._mean, self._std) if self.is_image else x

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.x[index]), self.labels(index)

    def labels(self, index: torch.Tensor) -> torch.Tensor:
        """int64 labels of the samples at `index`: (N,) or, for segmentation, (N, H, W) maps (stored as
        uint8 to take an eighth of the memory)."""
        return self.y[index].long()

    def augmented_batch(self, index: torch.Tensor, level: str, seed: int,
                        invert: Inversion = NO_INVERSION) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `index`, augmented at `level` (and inverted by `invert`) with
        the draws of `seed`, then normalised."""
        images = augment(self.x[index].float().div_(255.0), level, seed, invert)
        return (images - self._mean) / self._std, self.labels(index)

    def batches(self, batch_size: int):
        """Sequential batches over the whole domain, for evaluation."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)), device=self.x.device)
            yield self.batch(index)

    def stream(self, batch_size: int, seed: int, augment: str | None = None,
               invert: Inversion = NO_INVERSION) -> "BatchStream":
        """Training batches; `augment` (data.augment: none | weak | strong, None: none) and `invert`
        (data.invert) are applied on the device (da_runner/data/augment.py)."""
        level = check_level(augment or "none")
        if level != "none" and not self.is_image:
            raise UserError(f"data.augment={level} needs images; this data holds {tuple(self.x.shape[1:])} feature vectors "
                            f"(use data.augment=none)")
        if invert and not self.is_image:
            raise UserError(f"data.invert={invert.probability} needs images; this data holds {tuple(self.x.shape[1:])} feature vectors "
                            f"(use data.invert=0)")
        return BatchStream(self, batch_size, seed, level, invert)


def normalize_images(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float, per-channel normalised (mean, std: (1, C, 1, 1) on x's device)."""
    return (x.float().div_(255.0) - mean) / std


def unnormalize_images(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The inverse of normalize_images, as [0, 1] floats."""
    return (x * std + mean).clamp(0, 1)


class BatchStream:
    """A never-ending stream of random batches from one in-memory domain, gathered by index in the
    order of an `EpochOrder` (a fresh permutation each epoch from the stream's own generator). Its
    state goes into checkpoints so a resumed run draws exactly the same batches; the augmentation's
    draws follow from the seed and the batch's place in the order, so they resume exactly too.
    `last_index` holds the dataset indices (on the domain's device) of the batch drawn last.
    """

    def __init__(self, domain: InMemoryDomain, batch_size: int, seed: int, augment: str = "none",
                 invert: Inversion = NO_INVERSION):
        self.domain, self.seed, self.augment, self.invert = domain, seed, augment, invert
        self.order = EpochOrder(len(domain), batch_size, seed)
        self.last_index: torch.Tensor | None = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index, epoch, start = self.order.next_batch()
        index = self.last_index = index.to(self.domain.x.device, non_blocking=True)
        if self.augment == "none" and not self.invert:
            return self.domain.batch(index)
        return self.domain.augmented_batch(index, self.augment, batch_seed(self.seed, epoch, start), self.invert)

    def next_views(self, levels: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The next batch's samples once per augmentation level in `levels`, each view with draws of
        its own (FixMatch's weak and strong views of the same target images, mean teacher's student and
        teacher views), and their labels. The first view is what `next()` would have returned."""
        if not self.domain.is_image:
            raise UserError("methods that train on several augmented views of each target batch (fixmatch, "
                            "mean_teacher, method.fixmatch_weight > 0) need images; this data holds feature vectors")
        index, epoch, start = self.order.next_batch()
        index = self.last_index = index.to(self.domain.x.device, non_blocking=True)
        views = [self.domain.augmented_batch(index, check_level(level), batch_seed(self.seed, epoch, start, view),
                                             self.invert)[0]
                 for view, level in enumerate(levels)]
        return views, self.domain.labels(index)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


def split_source(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[InMemoryDomain, InMemoryDomain]:
    """Split already shuffled source data into training and held-out validation parts."""
    n_val = validation_size(len(y), val_fraction)
    return InMemoryDomain(x[n_val:], y[n_val:]), InMemoryDomain(x[:n_val], y[:n_val])
