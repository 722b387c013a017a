"""`trainer.ema`: an exponential moving average (EMA) of a method's weights.

After every training step each floating-point tensor of the method's state (parameters and
buffers such as BatchNorm's running statistics) moves towards the live one:

    average <- decay * average + (1 - decay) * live

Integer buffers (BatchNorm's batch counter, flags such as ADDA's `stage2_started`) are copied.
The average starts from the weights of step 0, so it needs about 1 / (1 - decay) steps to forget
them (1,000 at decay 0.999). It is evaluated beside the raw weights and saved in the checkpoints;
`trainer.ema_select` lets the validators choose `best.pt` by the average's evaluation.
"""

from contextlib import contextmanager

import torch
from torch import nn


class WeightAverage:
    """The moving average of `module.state_dict()`, updated in place by `update()`."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        # state_dict() holds the live tensors themselves (detached), so these lists stay valid:
        # optimizers, load_state_dict and .to(memory_format=...) all change the tensors in place.
        live = module.state_dict(keep_vars=False)
        self.names = list(live)
        self.average = {name: tensor.detach().clone() for name, tensor in live.items()}
        self._float_pairs = [(self.average[n], live[n]) for n in self.names if live[n].is_floating_point()]
        self._other_pairs = [(self.average[n], live[n]) for n in self.names if not live[n].is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        averages, lives = [a for a, _ in self._float_pairs], [v for _, v in self._float_pairs]
        if averages:
            torch._foreach_lerp_(averages, lives, 1.0 - self.decay)
        for average, live in self._other_pairs:
            average.copy_(live)

    @contextmanager
    def applied(self, module: nn.Module):
        """Inside the block, `module` holds the averaged weights; its own are put back afterwards."""
        saved = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        module.load_state_dict(self.average)
        try:
            yield module
        finally:
            module.load_state_dict(saved)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "average": {name: t.clone() for name, t in self.average.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["average"])
        if missing:
            raise KeyError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}")
        with torch.no_grad():
            for name in self.names:
                self.average[name].copy_(state["average"][name])
