"""Schedules as pure functions of training progress p = step / max_steps in [0, 1].

Nothing here keeps a counter: the trainer computes p and passes the values to the method, so a
resumed run, a longer run and a sweep all see the same curve for the same p.
"""

import math

GRL_SCHEDULES = ("constant", "ganin", "linear", "step")
LR_SCHEDULES = ("constant", "ganin")


def grl_lambda(p: float, cfg) -> float:
    """Gradient-reversal coefficient lambda at progress p for the `grl` config node."""
    name, hi = cfg.name, float(cfg.hi)
    if name == "constant":
        return hi
    if name == "ganin":
        # Ganin & Lempitsky (2015): lambda_p = hi * (2 / (1 + exp(-gamma * p)) - 1): starts at 0 so
        # the discriminator's early noisy gradients do not disturb the features.
        return hi * (2.0 / (1.0 + math.exp(-float(cfg.gamma) * p)) - 1.0)
    if name == "linear":
        ramp = float(cfg.ramp_fraction)
        return hi if ramp <= 0 else hi * min(1.0, p / ramp)
    if name == "step":
        return hi if p >= float(cfg.start) else 0.0
    raise ValueError(f"unknown grl schedule {name!r}; choose one of {GRL_SCHEDULES}")


def lr_factor(p: float, cfg) -> float:
    """Multiplier of the base learning rate at progress p for the `optim` config node."""
    name = cfg.schedule
    if name == "constant":
        return 1.0
    if name == "ganin":
        # Ganin & Lempitsky (2015): lr_p = lr0 / (1 + alpha * p) ** beta.
        return 1.0 / (1.0 + float(cfg.alpha) * p) ** float(cfg.beta)
    raise ValueError(f"unknown lr schedule {name!r}; choose one of {LR_SCHEDULES}")
