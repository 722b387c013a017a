"""In-memory datasets for small data: whole tensors on the training device, batches by index.

Images stay uint8 (4x smaller than float32, so even a GPU holds them whole); a batch is gathered
by index and converted to normalised float as tensor ops on the device. No DataLoader, no workers,
no per-sample Python work in the training loop.
"""

from dataclasses import dataclass, field

import torch


@dataclass
class InMemoryDomain:
    """Inputs `x` (N, C, H, W) uint8 images or (N, D) float features, labels `y` (N,) int64."""

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
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size].to(self.x.device)
        return InMemoryDomain(self.x[index], self.y[index], self.mean, self.std)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw stored inputs -> the float tensor the network sees."""
        if not self.is_image:
            return x
        return (x.float().div_(255.0) - self._mean) / self._std

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs back to [0, 1] images (for pictures in TensorBoard)."""
        return (x * self._std + self._mean).clamp(0, 1) if self.is_image else x

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prepare(self.x[index]), self.y[index]

    def batches(self, batch_size: int):
        """Sequential batches over the whole domain, for evaluation."""
        for start in range(0, len(self), batch_size):
            index = torch.arange(start, min(start + batch_size, len(self)), device=self.x.device)
            yield self.batch(index)


class BatchStream:
    """A never-ending stream of random batches from one domain.

    Each epoch is a fresh permutation drawn from the stream's own generator; a batch never spans two
    epochs (the tail of a permutation is dropped, as DataLoader's drop_last does). The state (generator,
    permutation, position) goes into checkpoints so a resumed run draws exactly the same batches.
    """

    def __init__(self, domain: InMemoryDomain, batch_size: int, seed: int):
        if batch_size > len(domain):
            raise ValueError(f"batch size {batch_size} exceeds the {len(domain)} samples of the domain")
        self.domain, self.batch_size = domain, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(len(self.domain), generator=self.generator)
            self.pos = 0
        index = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.domain.batch(index.to(self.domain.x.device, non_blocking=True))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


@dataclass
class DomainPair:
    """The four splits of a UDA task. Target training data is used without its labels."""

    name: str
    source_train: InMemoryDomain
    source_val: InMemoryDomain  # held-out labelled source data, for label-free model selection
    target_train: InMemoryDomain
    target_test: InMemoryDomain
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.source_train.input_shape

    @property
    def is_image(self) -> bool:
        return self.source_train.is_image

    def to(self, device) -> "DomainPair":
        return DomainPair(
            self.name, self.source_train.to(device), self.source_val.to(device),
            self.target_train.to(device), self.target_test.to(device), self.num_classes,
        )


def split_source(x: torch.Tensor, y: torch.Tensor, val_fraction: float) -> tuple[InMemoryDomain, InMemoryDomain]:
    """Split already shuffled source data into training and held-out validation parts."""
    n_val = max(1, round(len(y) * val_fraction))
    return InMemoryDomain(x[n_val:], y[n_val:]), InMemoryDomain(x[:n_val], y[:n_val])
