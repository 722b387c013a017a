"""The method contract: what the trainer may call, and nothing else.

A method owns its modules and optimizers. The trainer calls `step(batch, ctx)` once per training
iteration and `predict(x)` for evaluation, sets the learning rate of every param group that has an
`lr_mult` (to the scheduled lr times it; groups without one keep their own constant lr) and saves
`checkpoint_state()`. It never looks at which method it is running.
"""

from dataclasses import dataclass

import torch
from torch import nn

from da_runner.errors import UserError
from da_runner.nn.backbones import build_backbone
from da_runner.nn.heads import mlp_head


@dataclass(frozen=True)
class StepContext:
    """What a method may know about where training stands."""

    step: int  # 0-based index of this iteration
    max_steps: int
    progress: float  # step / max_steps in [0, 1)
    grl_lambda: float  # gradient-reversal coefficient from the `grl` schedule
    lr: float  # base learning rate from the `optim` schedule (already applied to the optimizers)


@dataclass(frozen=True)
class Batch:
    """One training batch: labelled source and unlabelled target. Target labels never reach a method."""

    x_s: torch.Tensor
    y_s: torch.Tensor
    x_t: torch.Tensor


def build_optimizer(param_groups, cfg) -> torch.optim.Optimizer:
    """The optimizer of the `optim` config node for `param_groups` (a list of dicts with "params")."""
    lr, weight_decay = float(cfg.lr), float(cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=float(cfg.momentum), weight_decay=weight_decay,
                               nesterov=bool(cfg.nesterov))
    if cfg.name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(float(b) for b in cfg.betas), weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {cfg.name!r}; available: adam, sgd")


class Method(nn.Module):
    """Base class: a feature extractor + label classifier, one optimizer over all parameters.

    Subclasses add their own modules in `__init__` *before* calling `self.setup_optimizers()`,
    and implement `step`.
    """

    def __init__(self, cfg, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.features = build_backbone(cfg.backbone, input_shape)
        self.classifier = mlp_head(self.features.out_features, cfg.backbone.label_head, num_classes)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def setup_optimizers(self) -> None:
        self.optimizers = {"main": build_optimizer([{"params": self.parameters(), "lr_mult": 1.0}], self.cfg.optim)}

    def step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One training iteration. Returns scalar terms, logged as `train/<key>`.

        Values may be 0-dim tensors: the trainer converts them to floats only when it logs, so a GPU
        is not forced to synchronise on every step.
        """
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) for inputs x."""
        return self.classifier(self.features(x))

    def checkpoint_state(self) -> dict:
        return {"modules": self.state_dict(), "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])

    @staticmethod
    def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
