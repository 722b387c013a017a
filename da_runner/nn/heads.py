"""Fully connected heads on top of a feature extractor."""

from collections.abc import Sequence

from torch import nn


def mlp_head(in_features: int, hidden: Sequence[int], out_features: int, dropout: float = 0.0,
             batch_norm: bool = False) -> nn.Sequential:
    """Linear (-> BatchNorm) -> ReLU (-> Dropout) for each hidden size, then a final Linear to `out_features`.

    Input (N, in_features), output (N, out_features) logits. BatchNorm and dropout are the reference
    implementations' discriminator and classifier blocks (Transfer-Learning-Library: 1024-1024 with
    BatchNorm; CDAN's digits code: 500-500 with dropout 0.5).
    """
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, int(size)))
        if batch_norm:
            layers.append(nn.BatchNorm1d(int(size)))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(size)
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def label_head(cfg, in_features: int, num_classes: int) -> nn.Sequential:
    """The label classifier of the `backbone` config node: `label_head` hidden sizes with
    `label_head_batch_norm` and `label_head_dropout`. `label_head_weight_norm: true` reparametrises
    the output layer's weight as w_k = g_k v_k / ||v_k|| (weight normalisation, Salimans & Kingma
    2016; one norm g_k per class), the classifier of SHOT's reference code (digit/network.py,
    feat_classifier with type "wn")."""
    head = mlp_head(in_features, cfg.label_head, num_classes, float(cfg.get("label_head_dropout", 0.0)),
                    bool(cfg.get("label_head_batch_norm", False)))
    if cfg.get("label_head_weight_norm", False):
        nn.utils.parametrizations.weight_norm(head[-1], name="weight", dim=0)
    return head


def domain_head(cfg, in_features: int, outputs: int) -> nn.Sequential:
    """The domain discriminator of the `backbone` config node: `domain_head` hidden sizes with
    `domain_head_batch_norm` and `domain_head_dropout`."""
    return mlp_head(in_features, cfg.domain_head, outputs, float(cfg.get("domain_head_dropout", 0.0)),
                    bool(cfg.get("domain_head_batch_norm", False)))
