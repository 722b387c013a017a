"""Feature extractors. Each maps a batch of inputs to (N, out_features) features.

The input shape comes from the data (channels, height, width for images; (features,) for vectors),
so one backbone config works for every dataset it fits. Heads are built by the method on top.
"""

import math

import torch
from torch import nn

from da_runner.errors import UserError


def _flat_size(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Output width of `module` for one input: run in eval mode (no dropout draws, no BatchNorm
    update on a batch of one), then put back in the mode it was in."""
    was_training = module.training
    module.eval()
    with torch.no_grad():
        size = int(module(torch.zeros(1, *input_shape)).shape[1])
    module.train(was_training)
    return size


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


class DannSvhn(nn.Module):
    """The SVHN network of Ganin et al. (JMLR 2016): conv5x5(64) - maxpool3/2 - conv5x5(64) - maxpool3/2
    - conv5x5(128), ReLUs after each, 'same' padding. For 32x32 inputs the features are 128 * 7 * 7.
    The paper's heads (label 3072-2048-10, domain 1024-1024-1) are in configs/backbone/dann_svhn.yaml."""

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("dann_svhn", input_shape, 16)
        self.net = nn.Sequential(
            nn.Conv2d(input_shape[0], 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 128, 5, padding=2), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.out_features = _flat_size(self.net, input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DTN(nn.Module):
    """The digits network used for SVHN->MNIST by CDAN (Long et al. 2018) and Transfer-Learning-Library:
    three conv5x5 stride-2 layers (64, 128, 256) with BatchNorm, Dropout2d (0.1, 0.3, 0.5) and ReLU,
    then fc(512) + BatchNorm + ReLU + Dropout(0.5). 512 features."""

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("dtn", input_shape, 8)
        layers: list[nn.Module] = []
        width = input_shape[0]
        for channels, drop in ((64, 0.1), (128, 0.3), (256, 0.5)):
            layers += [nn.Conv2d(width, channels, 5, stride=2, padding=2), nn.BatchNorm2d(channels),
                       nn.Dropout2d(drop), nn.ReLU(inplace=True)]
            width = channels
        conv = nn.Sequential(*layers, nn.Flatten())
        self.net = nn.Sequential(conv, nn.Linear(_flat_size(conv, input_shape), 512), nn.BatchNorm1d(512),
                                 nn.ReLU(inplace=True), nn.Dropout(0.5))
        self.out_features = 512

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


BACKBONES = {"dann_mnist": DannMnist, "dann_svhn": DannSvhn, "dtn": DTN, "lenet": LeNet, "mlp": MLP}


def build_backbone(cfg, input_shape: tuple[int, ...]) -> nn.Module:
    """Build the feature extractor named by `backbone.name` for inputs of `input_shape`."""
    if cfg.name not in BACKBONES:
        raise UserError(f"unknown backbone {cfg.name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.name](tuple(input_shape), cfg)
