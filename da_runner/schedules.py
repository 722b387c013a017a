"""Schedules as pure functions of the step (and of progress p = step / max_steps in [0, 1]).

Nothing here keeps a counter: the trainer computes the values and passes them to the method, so a
resumed run and a sweep see the same curve. Two families:

- progress-based (the DANN paper's): a function of p, so a longer run stretches the whole curve;
- step-based (the reference implementations' recipes, which count iterations): a function of the
  step alone, so a longer run continues the same curve (Transfer-Learning-Library's lr
  `lr0 * (1 + gamma * i) ** -decay` and its warm-start GRL).
"""

import math

GRL_SCHEDULES = ("constant", "ganin", "linear", "step", "warm_start")
LR_SCHEDULES = ("constant", "ganin", "inv", "poly")


def _sigmoid_ramp(x: float) -> float:
    """2 / (1 + exp(-x)) - 1: 0 at x = 0, rising to 1; Ganin's and the warm start's shared shape."""
    return 2.0 / (1.0 + math.exp(-x)) - 1.0


def grl_lambda(step: int, max_steps: int, cfg) -> float:
    """Gradient-reversal coefficient lambda at `step` of `max_steps` for the `grl` config node."""
    name, hi, p = cfg.name, float(cfg.hi), step / max_steps
    if name == "constant":
        return hi
    if name == "ganin":
        # Ganin & Lempitsky (2015): lambda_p = hi * (2 / (1 + exp(-gamma * p)) - 1): starts at 0 so
        # the discriminator's early noisy gradients do not disturb the features.
        return hi * _sigmoid_ramp(float(cfg.gamma) * p)
    if name == "linear":
        # A ramp from 0 that reaches hi at step `ramp_steps` (when set) or at p = ramp_fraction.
        ramp_steps, fraction = cfg.get("ramp_steps"), float(cfg.ramp_fraction)
        if ramp_steps:
            return hi * min(1.0, step / int(ramp_steps))
        return hi * min(1.0, p / fraction) if fraction > 0 else hi
    if name == "step":
        return hi if p >= float(cfg.start) else 0.0
    if name == "warm_start":
        # Transfer-Learning-Library's WarmStartGradientReverseLayer, counted in steps:
        # lambda_i = hi * (2 / (1 + exp(-alpha * i / max_iters)) - 1); with alpha 1 and max_iters
        # 1000 it is 0.46 hi at step 1,000, 0.91 hi at 3,000 and 0.99 hi at 5,000, whatever the run length.
        return hi * _sigmoid_ramp(float(cfg.alpha) * step / float(cfg.max_iters))
    raise ValueError(f"unknown grl schedule {name!r}; choose one of {GRL_SCHEDULES}")


def lr_factor(step: int, max_steps: int, cfg) -> float:
    """Multiplier of the base learning rate at `step` of `max_steps` for the `optim` config node."""
    name, p = cfg.schedule, step / max_steps
    if name == "constant":
        return 1.0
    if name == "ganin":
        # Ganin & Lempitsky (2015): lr_p = lr0 / (1 + alpha * p) ** beta.
        return 1.0 / (1.0 + float(cfg.alpha) * p) ** float(cfg.beta)
    if name == "inv":
        # Caffe's "inv" policy, used by Transfer-Learning-Library: lr_i = lr0 * (1 + gamma * i) ** -decay.
        return (1.0 + float(cfg.gamma) * step) ** -float(cfg.decay)
    if name == "poly":
        # DeepLab's "poly" policy, used by ADVENT: lr_p = lr0 * (1 - p) ** power.
        return (1.0 - p) ** float(cfg.get("power", 0.9))
    raise ValueError(f"unknown lr schedule {name!r}; choose one of {LR_SCHEDULES}")
