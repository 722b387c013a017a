"""UDA methods, one file each, registered by their config name."""

from da_runner.errors import UserError
from da_runner.methods import (  # noqa: F401  (importing registers them)
    adda, advent, afn, bnm, cdan, dan, dann, deepcoral, dirt_t, fixmatch, iwan, jan, mcc, mcd, mdd, mean_teacher, minent,
    oracle, osbp, pada, shot, source_only, vada,
)
from da_runner.methods.base import Batch, Method, StepContext
from da_runner.methods.registry import METHODS, register


def build_method(cfg, input_shape: tuple[int, ...], num_classes: int) -> Method:
    name = cfg.method.name
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; registered: {', '.join(sorted(METHODS))}")
    return METHODS[name](cfg, input_shape, num_classes)


__all__ = ["Batch", "METHODS", "Method", "StepContext", "build_method", "register"]
