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
    domain 100-1) are set in configs/backbone/dann_mnist.yaml. Options (all off in the paper's
    network): `channels` (the two conv widths), `batch_norm` (BatchNorm after each conv) and
    `dropout` (Dropout2d after the second conv): the BatchNorm + dropout variant of public DANN
    reimplementations (configs/backbone/dann_mnist_bn.yaml).
    """

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("dann_mnist", input_shape, 12)
        options = cfg if cfg is not None else {}
        c1, c2 = (int(c) for c in options.get("channels", [32, 48]))
        batch_norm, dropout = bool(options.get("batch_norm", False)), float(options.get("dropout", 0.0))
        layers: list[nn.Module] = []
        width = input_shape[0]
        for i, channels in enumerate((c1, c2)):
            layers.append(nn.Conv2d(width, channels, 5))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            if i == 1 and dropout > 0:
                layers.append(nn.Dropout2d(dropout))
            # ReLU after pooling: the same function (max and ReLU commute) on a 4x smaller tensor.
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            width = channels
        self.net = nn.Sequential(*layers, nn.Flatten())
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
    """Build the network named by `backbone.name` for inputs of `input_shape` (without the bottleneck)."""
    if cfg.name not in BACKBONES:
        raise UserError(f"unknown backbone {cfg.name!r}; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[cfg.name](tuple(input_shape), cfg)


class L2PreservedDropout(nn.Dropout):
    """Dropout that keeps the expected squared L2 norm of its input (AFN, Xu et al., ICCV 2019): kept
    units are scaled by 1 / sqrt(1 - p) in training instead of 1 / (1 - p), so the feature norms
    AFN enlarges are the same in training and evaluation on average."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out * math.sqrt(1.0 - self.p) if self.training else out


class FeatureExtractor(nn.Module):
    """The backbone followed by the optional bottleneck: what every method calls its features G(x).

    The bottleneck (`backbone.bottleneck.width`; null: none) is Linear -> BatchNorm (optional) ->
    ReLU -> Dropout (optional), the block Transfer-Learning-Library puts between the backbone and
    the heads of every method (256 wide with BatchNorm on digits; 1024 with dropout for MDD).
    The two parts are separate modules so each gets its own learning-rate multiplier
    (`optim.lr_mult.backbone`, `optim.lr_mult.bottleneck`).
    """

    def __init__(self, cfg, input_shape: tuple[int, ...]):
        super().__init__()
        self.backbone = build_backbone(cfg, input_shape)
        options = cfg.get("bottleneck") or {}
        width = options.get("width")
        if width is None:
            self.bottleneck = nn.Identity()
            self.out_features = self.backbone.out_features
        else:
            if int(width) < 1:
                raise UserError(f"backbone.bottleneck.width must be a positive integer or null, got {width}")
            layers: list[nn.Module] = [nn.Linear(self.backbone.out_features, int(width))]
            if options.get("batch_norm", True):
                layers.append(nn.BatchNorm1d(int(width)))
            layers.append(nn.ReLU(inplace=True))
            if float(options.get("dropout", 0.0)) > 0:
                dropout = L2PreservedDropout if options.get("l2_dropout", False) else nn.Dropout
                layers.append(dropout(float(options.dropout)))
            self.bottleneck = nn.Sequential(*layers)
            self.out_features = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.backbone(x))


def build_features(cfg, input_shape: tuple[int, ...]) -> FeatureExtractor:
    """The feature extractor G of the `backbone` config node: backbone + bottleneck."""
    return FeatureExtractor(cfg, tuple(input_shape))
