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


def conv_head(in_channels: int, hidden: Sequence[int], num_classes: int, upsample: int,
              batch_norm: bool = False) -> nn.Sequential:
    """The per-pixel classifier of a segmentation network: 3x3 conv (-> BatchNorm) -> ReLU for each
    hidden width, a 1x1 conv to `num_classes`, then bilinear upsampling by the backbone's output stride
    `upsample` (FCN, Long et al. 2015; DeepLab upsamples its logits the same way).
    Input (N, in_channels, h, w), output (N, num_classes, upsample * h, upsample * w) logits."""
    layers: list[nn.Module] = []
    width = in_channels
    for size in hidden:
        layers.append(nn.Conv2d(width, int(size), 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(size)))
        layers.append(nn.ReLU(inplace=True))
        width = int(size)
    layers.append(nn.Conv2d(width, num_classes, 1))
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


def label_head(cfg, in_features: int, num_classes: int, output_stride: int | None = None) -> nn.Sequential:
    """The label classifier of the `backbone` config node: `label_head` hidden sizes with
    `label_head_batch_norm` and `label_head_dropout`. On a dense backbone (one with an `output_stride`:
    feature maps, not vectors) it is `conv_head`, or with `label_head_aspp: true` DeepLabV3's ASPP head
    (torchvision's DeepLabHead): per-pixel logits at the input's resolution.
    `label_head_weight_norm: true` reparametrises the output layer's weight as w_k = g_k v_k / ||v_k||
    (weight normalisation, Salimans & Kingma 2016; one norm g_k per class), the classifier of SHOT's reference code (digit/network.py,
    feat_classifier with type "wn")."""
    if output_stride is not None and cfg.get("label_head_aspp", False):
        from torchvision.models.segmentation.deeplabv3 import DeepLabHead

        # DeepLabV3's head: atrous spatial pyramid pooling (rates 12, 24, 36), 3x3 conv, 1x1 to the classes.
        return nn.Sequential(DeepLabHead(in_features, num_classes),
                             nn.Upsample(scale_factor=output_stride, mode="bilinear", align_corners=False))
    if output_stride is not None:
        return conv_head(in_features, cfg.label_head, num_classes, output_stride,
                         bool(cfg.get("label_head_batch_norm", False)))
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
