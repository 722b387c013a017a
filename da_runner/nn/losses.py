"""Loss terms shared by the methods. Shapes: N samples, d feature dimensions, C classes."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def domain_loss_and_acc(logits: torch.Tensor, is_source: torch.Tensor,
                        weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Domain discriminator loss and accuracy.

    logits: (N, 1) for a single-logit head (binary cross-entropy) or (N, 2) for a two-way softmax.
    is_source: (N,) float, 1 for source rows and 0 for target rows.
    weights: optional (N,) per-sample weights (mean 1); the loss is the weighted mean.
    """
    if logits.shape[1] == 1:
        logits = logits.squeeze(1)
        per_sample = F.binary_cross_entropy_with_logits(logits, is_source, reduction="none")
        correct = (logits > 0).float() == is_source
    else:
        target = is_source.long()
        per_sample = F.cross_entropy(logits, target, reduction="none")
        correct = logits.argmax(1) == target
    loss = per_sample.mean() if weights is None else (weights * per_sample).sum() / weights.sum()
    return loss, correct.float().mean()


def multilinear_map(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """CDAN's multilinear map (Long et al., NeurIPS 2018): the flattened outer product g ⊗ f.

    f: (N, d) features, g: (N, C) class probabilities -> (N, C * d) with [n, c * d + j] = g[n, c] * f[n, j].
    """
    return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    """CDAN's randomized multilinear map: (R_f f) ⊙ (R_g g) / sqrt(output_dim).

    R_f (d, output_dim) and R_g (C, output_dim) are drawn once from a standard normal and kept fixed
    (stored as buffers, so they are checkpointed). Unbiased for the inner products of the full map.
    f: (N, d), g: (N, C) -> (N, output_dim).
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("R_f", torch.randn(features_dim, output_dim))
        self.register_buffer("R_g", torch.randn(num_classes, output_dim))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.R_f) * (g @ self.R_g) / math.sqrt(self.output_dim)


def entropy(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities p: (N, C) -> (N,)."""
    return -(p * (p + eps).log()).sum(1)


def entropy_weights(p: torch.Tensor) -> torch.Tensor:
    """CDAN+E's sample weights w = 1 + exp(-H(p)), normalised to mean 1 over the batch: (N, C) -> (N,).

    Confident predictions (low entropy) weigh more in the domain loss. No gradient flows through them.
    """
    w = 1.0 + torch.exp(-entropy(p.detach()))
    return w * (len(w) / w.sum())


def bsp_penalty(f_s: torch.Tensor, f_t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Batch spectral penalization (Chen et al., ICML 2019): sum of the squared k largest singular
    values of the source and of the target feature matrices. f_s: (N_s, d), f_t: (N_t, d) -> scalar."""
    return (torch.linalg.svdvals(f_s)[:k].pow(2).sum() + torch.linalg.svdvals(f_t)[:k].pow(2).sum())
