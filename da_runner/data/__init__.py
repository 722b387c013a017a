"""Datasets and domain pairs. `build_pair(cfg.data)` returns the pair named by `data.name`."""

from da_runner.data.embedded import build_embedded_digits
from da_runner.data.memory import BatchStream, DomainPair, InMemoryDomain
from da_runner.data.toy import build_toy2d
from da_runner.errors import UserError

PAIRS = {"embedded_digits": build_embedded_digits, "toy2d": build_toy2d}


def build_pair(cfg) -> DomainPair:
    if cfg.name not in PAIRS:
        raise UserError(f"unknown data pair {cfg.name!r}; available: {', '.join(sorted(PAIRS))}")
    return PAIRS[cfg.name](cfg)


__all__ = ["BatchStream", "DomainPair", "InMemoryDomain", "PAIRS", "build_pair"]
