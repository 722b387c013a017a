"""Gradient reversal layer (Ganin & Lempitsky, ICML 2015).

Forward is the identity; backward multiplies the incoming gradient by -lambda. Placed between the
feature extractor and the domain discriminator, it lets one backward pass train the discriminator
to tell the domains apart while pushing the features to confuse it.
"""

import torch


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.neg() * ctx.lambda_, None


def grad_reverse(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Identity on `x` (any shape); the gradient flowing back through it is scaled by -lambda_.

    lambda_ is a plain float from the trainer's schedule, so the layer keeps no state.
    """
    return _GradientReversal.apply(x, float(lambda_))
