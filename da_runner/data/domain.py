"""What every kind of data offers the trainer, evaluation and analysis: a `Domain` (one split of one
domain, in memory or read from files), the `DomainPair` of four splits that a run trains and
evaluates on, and the `EpochOrder` that decides which samples each training batch holds.

Both kinds of domain (`memory.InMemoryDomain`, `files.ImageFileDomain`) implement the same protocol,
and each hands out its own batch stream (`domain.stream(...)`), so no code outside `da_runner/data`
asks which kind it has.
"""

from dataclasses import dataclass, replace
from typing import Iterator, Protocol

import torch

from da_runner.data.augment import NO_INVERSION, Inversion
from da_runner.data.classes import LabelSpace, default_class_names


class Domain(Protocol):
    """One split of one domain: N labelled samples (the labels of target training data are never
    given to a UDA method)."""

    def __len__(self) -> int: ...

    @property
    def is_image(self) -> bool: ...

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one network input, e.g. (3, 224, 224) or (2,)."""

    def to(self, device) -> "Domain":
        """The same samples, delivered as tensors on `device`."""

    def sample(self, size: int, seed: int = 0) -> "Domain":
        """A fixed random subset of at most `size` samples (the same for a given seed)."""

    def subset(self, index: torch.Tensor, labels: torch.Tensor | None = None) -> "Domain":
        """The samples at `index` (N',), with new `labels` (N',) when given (class subsets relabel)."""

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential (inputs, labels) batches over the whole split, without augmentation (evaluation)."""

    def stream(self, batch_size: int, seed: int, augment: str | None = None,
               invert: Inversion = NO_INVERSION) -> "BatchSource":
        """A never-ending stream of random training batches (see `EpochOrder`), augmented at level
        `augment` (data.augment: none | weak | strong; None: the domain's default), each image's
        colours inverted by `invert` (data.invert, data.invert_channels)."""

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Network inputs back to [0, 1] images (for pictures in TensorBoard)."""


class BatchSource(Protocol):
    """What `Domain.stream` returns: `next(stream)` -> (inputs, labels) on the domain's device, and
    a state that checkpoints carry so a resumed run draws exactly the same batches. `last_index`
    holds the dataset indices (N,) of the batch drawn last (None before the first); `order` is the
    `EpochOrder` it draws by (a run on several processes shards it before the first draw)."""

    last_index: torch.Tensor | None
    order: "EpochOrder"

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class DomainPair:
    """The four splits of a UDA task. Target training data is used without its labels.

    `label_space` says what the labels mean: the setting (closed, partial, open_set), the source's
    class names and the target's known classes (da_runner/data/classes.py); a builder that knows
    its class names passes a closed one, else they are "0" .. "K-1".
    """

    name: str
    source_train: Domain
    source_val: Domain  # held-out labelled source data, for label-free model selection
    target_train: Domain
    target_test: Domain
    num_classes: int  # the classifier's outputs: the source's classes
    label_space: LabelSpace | None = None

    def __post_init__(self):
        if self.label_space is None:
            self.label_space = LabelSpace.closed(default_class_names(self.num_classes))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.source_train.input_shape

    @property
    def is_image(self) -> bool:
        return self.source_train.is_image

    def to(self, device) -> "DomainPair":
        return replace(self, source_train=self.source_train.to(device), source_val=self.source_val.to(device),
                       target_train=self.target_train.to(device), target_test=self.target_test.to(device))


class EpochOrder:
    """Which samples each training batch holds, as a resumable state.

    Each epoch is a fresh permutation of range(n) drawn from the order's own generator (so that a
    method drawing random numbers never changes which samples a run sees); a batch never spans two
    epochs (the tail of a permutation is dropped, as DataLoader's drop_last does). `next_batch()` also
    says where the batch stands (epoch, position in the permutation), which file-backed streams turn
    into per-sample augmentation seeds.

    In a run on several processes (da_runner/distributed.py) every rank walks the same order of
    global batches of `batch_size` and, after `shard(rank, count)`, is handed only its share: rows
    [rank * b, (rank + 1) * b) of each, b = batch_size / count, with their own positions (so per-sample
    seeds are those a one-process run gives the same samples).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} samples of the domain")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.epoch = 0  # permutations drawn so far
        self.rank, self.ranks = 0, 1  # which share of each global batch this process takes (shard)

    def shard(self, rank: int, count: int) -> None:
        """From now on, hand out share `rank` of `count` equal shares of every batch."""
        if self.batch_size % count:
            raise ValueError(f"batch size {self.batch_size} does not split into {count} equal shares")
        self.rank, self.ranks = rank, count

    def next_batch(self) -> tuple[torch.Tensor, int, int]:
        """The next batch's indices (this rank's share), its epoch and its start in that epoch's permutation."""
        if self.pos + self.batch_size > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
            self.epoch += 1
        share = self.batch_size // self.ranks
        start = self.pos + self.rank * share
        self.pos += self.batch_size
        return self.perm[start : start + share], self.epoch, start

    def copy(self) -> "EpochOrder":
        other = EpochOrder(self.n, self.batch_size, 0)
        other.load_state_dict(self.state_dict())
        other.shard(self.rank, self.ranks)
        return other

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(), "pos": self.pos,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])
        self.epoch = int(state.get("epoch", 0))  # checkpoints written before the key existed: in-memory streams, unused


def sample_index(n: int, size: int, seed: int) -> torch.Tensor:
    """The indices of a fixed random subset of min(size, n) out of n samples (the same for a given seed)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def validation_size(n: int, fraction: float) -> int:
    """How many of n (shuffled) labelled source samples are held out for validation: at least one."""
    return max(1, round(n * fraction))
