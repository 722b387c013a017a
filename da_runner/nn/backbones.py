"""Feature extractors. Each maps a batch of inputs to (N, out_features) features.

The input shape comes from the data (channels, height, width for images; (features,) for vectors),
so one backbone config works for every dataset it fits. Heads are built by the method on top.
"""

import math

import torch
from torch import nn

from da_runner.errors import UserError


def _flat_size(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).shape[1])


def _require_image(name: str, input_shape: tuple[int, ...], min_size: int) -> None:
    if len(input_shape) != 3 or min(input_shape[1:]) < min_size:
        raise UserError(
            f"backbone={name} needs images of at least {min_size}x{min_size} pixels, but the data gives "
            f"inputs of shape {tuple(input_shape)}; use backbone=mlp for vector data"
        )


class DannMnist(nn.Module):
    """The MNIST network of Ganin et al. (JMLR 2016): conv5x5(32) - maxpool2 - conv5x5(48) - maxpool2.

    For 28x28 inputs the features are 48 * 4 * 4 = 768. The paper's heads (label 100-100-10,
    domain 100-1) are set in configs/backbone/dann_mnist.yaml.
    """

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("dann_mnist", input_shape, 12)
        self.net = nn.Sequential(
            # ReLU after pooling: the same function (max and ReLU commute) on a 4x smaller tensor.
            nn.Conv2d(input_shape[0], 32, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(32, 48, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.out_features = _flat_size(self.net, input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet as used for MNIST<->USPS by ADDA and CDAN: conv5x5(20) - conv5x5(50) - fc(500)."""

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("lenet", input_shape, 12)
        dropout = float(cfg.get("dropout", 0.5)) if cfg is not None else 0.5
        conv = nn.Sequential(
            nn.Conv2d(input_shape[0], 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(20, 50, 5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.net = nn.Sequential(
            conv, nn.Linear(_flat_size(conv, input_shape), 500), nn.ReLU(inplace=True), nn.Dropout(dropout)
        )
        self.out_features = 500

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs (the two-moons toy, or any vector data)."""

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        hidden = [int(h) for h in (cfg.get("hidden", [64, 64]) if cfg is not None else [64, 64])]
        if not hidden:
            raise UserError("backbone.hidden must list at least one layer size for backbone=mlp")
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            width = size
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BACKBONES = {"dann_mnist": DannMnist, "lenet": LeNet, "mlp": MLP}


def build_backbone(cfg, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the feature extractor named by `backbone.name` for inputs of `input_shape`."""
    if cfg.name not in BACKBONES:
        raise UserError(f"unknown backbone {cfg.name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.name](tuple(input_shape), cfg)
