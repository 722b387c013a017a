"""Fully connected heads on top of a feature extractor."""

from collections.abc import Sequence

from torch import nn


def mlp_head(in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear -> ReLU (-> Dropout) for each hidden size, then a final Linear to `out_features`.

    Input (N, in_features), output (N, out_features) logits.
    """
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, int(size)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
