"""Two moons as source and the same distribution rotated by `data.angle` degrees as target:
the classic toy problem of the DANN paper, small enough to train in seconds."""

import math

import numpy as np
import torch
from sklearn.datasets import make_moons

from da_runner.data.domain import DomainPair
from da_runner.data.memory import InMemoryDomain, split_source


def _moons(n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


def build_toy2d(cfg) -> DomainPair:
    seed, noise, n = int(cfg.seed), float(cfg.noise), int(cfg.samples_per_domain)
    x_s, y_s = _moons(n, noise, seed)
    center = x_s.mean(axis=0)
    theta = math.radians(float(cfg.angle))
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=np.float32)

    def rotated(x: np.ndarray) -> np.ndarray:
        return (x - center) @ rotation.T + center

    x_t_train, y_t_train = _moons(n, noise, seed + 1)
    x_t_test, y_t_test = _moons(n, noise, seed + 2)
    source_train, source_val = split_source(torch.from_numpy(x_s), torch.from_numpy(y_s), float(cfg.source_val_fraction))
    return DomainPair(
        name="toy2d",
        source_train=source_train,
        source_val=source_val,
        target_train=InMemoryDomain(torch.from_numpy(rotated(x_t_train)), torch.from_numpy(y_t_train)),
        target_test=InMemoryDomain(torch.from_numpy(rotated(x_t_test)), torch.from_numpy(y_t_test)),
        num_classes=2,
    )
