"""Feature extractors. Each maps a batch of inputs to (N, out_features) features.

The input shape comes from the data (channels, height, width for images; (features,) for vectors),
so one backbone config works for every dataset it fits. Heads are built by the method on top.

Two families: networks written here for digits and vectors (trained from scratch), and the image
networks of torchvision (ResNet-18/34/50/101) and timm (any model), which can start from the
libraries' pretrained weights (`backbone.pretrained`) or from a local file (`backbone.weights`).
"""

import copy
import difflib
import logging
import math
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from da_runner.errors import UserError

log = logging.getLogger(__name__)


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


class MissingWeightsError(UserError):
    """Pretrained weights that could not be downloaded; the message says which file to put where."""


def _first_line(err: Exception) -> str:
    """A library error's first line (some run to a paragraph), so that the user's message stays one line."""
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def local_weights_file(value) -> Path:
    """The existing file named by `backbone.weights`."""
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise UserError(f"backbone.weights={value}: no such file (a checkpoint of the backbone's network, "
                        f"or null to start from backbone.pretrained)")
    return path


def read_state_dict(value) -> dict[str, torch.Tensor]:
    """The state dict in the checkpoint file `backbone.weights`: a plain state dict, or one wrapped as
    {"state_dict": ...} or {"model": ...} as training scripts save them, with DataParallel's
    "module." prefixes removed. `.safetensors` files (timm's format on the Hugging Face Hub) too."""
    path = local_weights_file(value)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip and safetensors errors share no base class
        raise UserError(f"backbone.weights={path} could not be read as a checkpoint "
                        f"({type(err).__name__}: {_first_line(err)})") from err
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.weights={path} holds no state dict (parameter names -> tensors), "
                        f"nor one under 'state_dict' or 'model'")
    return {key.removeprefix("module."): value for key, value in state.items()}


def load_backbone_state(net: nn.Module, state: dict[str, torch.Tensor], classifier, source: str) -> None:
    """Copy `state` into `net`, a library's model whose classifier the method's label head replaces.

    The original classifier's keys (`classifier`: "fc", "head", "head.fc" or a tuple of them) are
    dropped; every other key must fit, or the error names `source` and the first keys that do not.
    """
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    prefixes = tuple(f"{name}." for name in names)
    state = {key: value for key, value in state.items() if not key.startswith(prefixes)}
    own = net.state_dict()
    wrong_shape = [f"{key} {tuple(value.shape)} (the network's: {tuple(own[key].shape)})"
                   for key, value in state.items() if key in own and value.shape != own[key].shape]
    if wrong_shape:
        raise UserError(f"{source} does not fit the backbone: wrong shapes for {_first(wrong_shape, 3)}")
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        problems = [f"{label} keys {_first(keys)}" for label, keys in
                    (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise UserError(f"{source} does not fit the backbone: {'; '.join(problems)}. Is it a checkpoint of "
                        f"this network (its state_dict, or one under 'state_dict' or 'model')?")


def torch_hub_cache_file(url: str) -> Path:
    """Where torch.hub's `load_state_dict_from_url` keeps (and first looks for) the file of `url`:
    $TORCH_HOME/hub/checkpoints/<file name>, read when the call is made."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download_failed(what: str, url: str, err: Exception, place: str) -> MissingWeightsError:
    """One message: what could not be downloaded from where, why, and the ways around it."""
    return MissingWeightsError(
        f"{what} could not be downloaded from {url} ({_first_line(err)}). {place}, or start from a local checkpoint "
        f"(that file, for one) with backbone.weights=<file>, or from random weights with backbone.pretrained=false")


TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def torchvision_weights(name: str, tag: str):
    """torchvision's weights entry `tag` for model `name`, e.g. ResNet50_Weights.IMAGENET1K_V1."""
    entries = torchvision.models.get_model_weights(name)
    if tag not in entries.__members__:
        raise UserError(f"backbone.pretrained_tag must be one of {', '.join(entries.__members__)} for "
                        f"backbone={name}, got {tag!r}")
    return entries[tag]


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet-18, -34, -50 or -101 (`backbone.name`) without its fc layer: the globally
    average-pooled output of the last stage, 512 features (18, 34) or 2,048 (50, 101).

    `backbone.weights=<file>` starts from a local checkpoint; otherwise `backbone.pretrained=true`
    starts from torchvision's ImageNet weights `backbone.pretrained_tag`, which torchvision's weights
    API downloads once into torch.hub's cache ($TORCH_HOME/hub/checkpoints/) and reads from there.
    """

    def __init__(self, input_shape: tuple[int, ...], cfg):
        super().__init__()
        name = cfg.name
        _require_image(name, input_shape, 1)
        if input_shape[0] != 3:
            raise UserError(f"backbone={name} takes RGB images (3 channels), but the data gives {input_shape[0]}; "
                            f"digit pairs convert with data.channels=3 (backbone=timm adapts its first layer)")
        self.net = torchvision.models.get_model(name, weights=None)
        self.out_features = self.net.fc.in_features
        self.net.fc = nn.Identity()  # the method's label head is the classifier
        if cfg.get("weights"):
            load_backbone_state(self.net, read_state_dict(cfg.weights), "fc", f"backbone.weights={cfg.weights}")
        elif cfg.get("pretrained", False):
            weights = torchvision_weights(name, str(cfg.get("pretrained_tag", "DEFAULT")))
            path = torch_hub_cache_file(weights.url)
            try:
                state = weights.get_state_dict(progress=True, check_hash=True)
            except OSError as err:  # urllib's URLError and HTTPError, socket errors: no network, no file
                raise _download_failed(
                    f"backbone={name} backbone.pretrained=true: torchvision's {weights} ({path.name})", weights.url,
                    err, f"Place that file at {path} (torch.hub's cache; TORCH_HOME moves it)") from err
            load_backbone_state(self.net, state, "fc", str(path))
            log.info("backbone=%s starts from torchvision's %s (%s)", name, weights, path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DEEPLAB_ARCHS = {"resnet50": 8, "resnet101": 8, "mobilenet_v3_large": 16}  # arch -> output stride


class TorchvisionDeepLab(nn.Module):
    """The dilated encoder of torchvision's DeepLabV3 (Chen et al., 2017): ResNet-50 / -101 with its last
    two stages dilated (feature maps of 2,048 at 1/8 of the input) or MobileNetV3-Large with its last
    stage dilated (960 at 1/16), `backbone.arch`. The method's label head is DeepLabV3's ASPP head
    (`backbone.label_head_aspp: true`), upsampled to the input's size (nn/heads.label_head).

    As ADVENT and the reference segmentation code bases do, the encoder starts from the ImageNet weights
    of the classification network (`backbone.pretrained`, torchvision's `backbone.pretrained_tag`, fetched
    through its weights API into torch.hub's cache) or from a local checkpoint of that network
    (`backbone.weights`); its classifier's keys are dropped. Dilation changes no parameter's shape.
    """

    def __init__(self, input_shape: tuple[int, ...], cfg):
        super().__init__()
        arch = str(cfg.get("arch", "resnet50"))
        if arch not in DEEPLAB_ARCHS:
            raise UserError(f"backbone.arch must be one of {', '.join(DEEPLAB_ARCHS)} for backbone=deeplabv3, got {arch!r}")
        _require_image("deeplabv3", input_shape, 32)
        if input_shape[0] != 3:
            raise UserError(f"backbone=deeplabv3 takes RGB images (3 channels), but the data gives {input_shape[0]}")
        self.output_stride = DEEPLAB_ARCHS[arch]
        if input_shape[1] % self.output_stride or input_shape[2] % self.output_stride:
            raise UserError(f"backbone=deeplabv3 with arch={arch} needs image sides divisible by {self.output_stride}, "
                            f"got {tuple(input_shape[1:])}")
        builder = getattr(torchvision.models.segmentation, f"deeplabv3_{arch}")
        self.body = builder(weights=None, weights_backbone=None, num_classes=1, aux_loss=False).backbone
        self.out_features = 960 if arch.startswith("mobilenet") else 2048
        # The classification network's state dict names the encoder's layers differently: MobileNetV3's
        # live under "features." there, and its classifier (fc / classifier) has no place here.
        prefix, classifier = ("features.", "classifier") if arch.startswith("mobilenet") else ("", "fc")
        if cfg.get("weights"):
            state, source = read_state_dict(cfg.weights), f"backbone.weights={cfg.weights}"
        elif cfg.get("pretrained", False):
            weights = torchvision_weights(arch, str(cfg.get("pretrained_tag", "DEFAULT")))
            path = torch_hub_cache_file(weights.url)
            try:
                state, source = weights.get_state_dict(progress=True, check_hash=True), str(path)
            except OSError as err:
                raise _download_failed(
                    f"backbone=deeplabv3 backbone.pretrained=true: torchvision's {weights} ({path.name})", weights.url,
                    err, f"Place that file at {path} (torch.hub's cache; TORCH_HOME moves it)") from err
        else:
            return
        state = {key.removeprefix(prefix): value for key, value in state.items() if not key.startswith(f"{classifier}.")}
        load_backbone_state(self.body, state, (), source)
        log.info("backbone=deeplabv3 (%s) starts from %s", arch, source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)["out"]


def import_timm():
    """timm, or one message saying how to install it."""
    try:
        import timm
    except ImportError as err:
        raise UserError("backbone=timm needs the timm package: pip install 'da-runner[images]' "
                        "(or pip install timm)") from err
    return timm


def check_timm_model(model) -> None:
    """`backbone.model` names a timm model (an architecture, optionally with a weights tag), or the
    error lists the closest names."""
    timm = import_timm()
    if not isinstance(model, str) or not model:
        raise UserError(f"backbone.model must name a timm model (e.g. resnet50, convnext_tiny), got {model!r}")
    if ":" in model:  # hf-hub:<repo> and local-dir:<dir>: timm resolves those itself
        return
    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=5)
        hint = f"close matches: {', '.join(close)}" if close else "timm.list_models('*<part>*') lists the names"
        raise UserError(f"backbone.model={model!r} is not a timm model; {hint}")
    try:
        timm.models.get_pretrained_cfg(model)
    except RuntimeError as err:  # an architecture with a weights tag timm does not know
        arch = model.split(".")[0]
        tagged = _first(timm.list_pretrained(arch + ".*"), 8)
        raise UserError(f"backbone.model={model!r}: {err} Tagged names: {tagged}") from err


def _timm_download_failed(model: str, err: Exception) -> MissingWeightsError:
    """The message for timm's pretrained weights that could not be fetched: from the Hugging Face Hub
    (timm's first choice, into the Hugging Face cache) or from a URL (into torch.hub's cache)."""
    pretrained = import_timm().models.get_pretrained_cfg(model)
    what = f"backbone=timm backbone.model={model} backbone.pretrained=true: timm's weights"
    if pretrained is None:  # a hf-hub:<repo> name: the name is the place
        return _download_failed(what, model, err, "Download the repository's weights file")
    if pretrained.hf_hub_id:
        from huggingface_hub import constants

        repo = pretrained.hf_hub_id
        url = f"https://huggingface.co/{repo}/resolve/main/{pretrained.hf_hub_filename or 'model.safetensors'}"
        place = (f"Copy the folder models--{repo.replace('/', '--')} of a Hugging Face cache that holds them into "
                 f"{constants.HF_HUB_CACHE} (timm's cache; HF_HOME moves it)")
        return _download_failed(f"{what} {repo}", url, err, place)
    path = torch_hub_cache_file(pretrained.url)
    return _download_failed(f"{what} ({path.name})", pretrained.url, err,
                            f"Place that file at {path} (torch.hub's cache; TORCH_HOME moves it)")


class TimmBackbone(nn.Module):
    """Any timm model (`backbone.model`), built with `num_classes=0`: its pooled pre-logits features.

    timm adapts the first layer to the data's channel count (`in_chans`) and, for models with a
    fixed input size (ViTs), the input size (`img_size`); `backbone.kwargs` passes further options to
    `timm.create_model` (e.g. `+backbone.kwargs.drop_path_rate=0.1`). `backbone.pretrained=true` loads
    timm's weights through timm's own mechanism (the Hugging Face Hub and its cache);
    `backbone.weights=<file>` a local checkpoint instead.
    """

    def __init__(self, input_shape: tuple[int, ...], cfg):
        super().__init__()
        _require_image("timm", input_shape, 1)
        timm = import_timm()
        model = cfg.get("model")
        check_timm_model(model)
        pretrained = bool(cfg.get("pretrained", False)) and not cfg.get("weights")
        located = ":" in model  # hf-hub:<repo>, local-dir:<dir>: the name says where the weights are
        defaults = None if located else timm.models.get_pretrained_cfg(model)
        if pretrained and not located and not (defaults and (defaults.hf_hub_id or defaults.url or defaults.file)):
            raise UserError(f"timm has no pretrained weights for backbone.model={model}; set backbone.pretrained=false "
                            f"or start from backbone.weights=<file>")
        options = cfg.get("kwargs") or {}
        kwargs = {"in_chans": input_shape[0],
                  **(OmegaConf.to_container(options) if isinstance(options, DictConfig) else options)}
        if defaults and defaults.fixed_input_size and tuple(defaults.input_size[1:]) != tuple(input_shape[1:]):
            kwargs.setdefault("img_size", tuple(input_shape[1:]))  # timm resamples pretrained position embeddings
        try:
            self.net = timm.create_model(model, pretrained=pretrained, num_classes=0, **kwargs)
        except OSError as err:  # the Hub or the URL could not be reached, and the cache has no copy
            raise _timm_download_failed(model, err) from err
        except (RuntimeError, TypeError, ValueError) as err:  # an unknown weights tag, an option the model lacks
            raise UserError(f"timm could not build backbone.model={model} with {kwargs}: {err}") from err
        if cfg.get("weights"):
            load_backbone_state(self.net, read_state_dict(cfg.weights), self.net.pretrained_cfg.get("classifier"),
                                f"backbone.weights={cfg.weights}")
        elif pretrained:
            log.info("backbone=timm starts from timm's pretrained %s", model)
        try:  # the width, and a check that the model takes the data's image size
            self.out_features = _flat_size(self.net, input_shape)
        except RuntimeError as err:
            raise UserError(f"backbone.model={model} cannot take inputs of shape {tuple(input_shape)}: "
                            f"{_first_line(err)}") from err

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FcnDigits(nn.Module):
    """A small fully-convolutional network for the 64x64 segmentation digits (data=digits_seg).

    Stages of two 3x3 conv -> BatchNorm -> ReLU blocks, a 2x2 max-pool before every stage but the
    first; the last stage's convolutions are dilated (rate 2), which widens the receptive field to a
    whole digit without pooling further (DeepLab's way of keeping resolution).

    `hypercolumns: true` (the default): every stage's maps reach each pixel at the input's resolution
    (hypercolumns, Hariharan et al., CVPR 2015; merged by addition as in FPN, Lin et al., CVPR 2017):
    each deeper stage's maps are projected to the first stage's width by a 1x1 conv, upsampled and
    added to the first stage's, then BatchNorm -> ReLU. The first stage says where a stroke is, the
    last which digit it belongs to. The features are maps of `channels[0]` and `output_stride` is 1.
    `false`: the last stage's maps alone, at 1 / 2 ** (stages - 1) of the input, which the label head
    upsamples. At stride 4 an MNIST stroke (2 - 3 pixels wide) is thinner than one logit cell: even
    perfect quarter-resolution maps, upsampled, recover only about half of the stroke pixels (0.46
    mIoU on the source canvases)."""

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("fcn_digits", input_shape, 16)
        options = cfg if cfg is not None else {}
        channels = [int(c) for c in options.get("channels") or (16, 32, 64)]
        if not channels or min(channels) < 1:
            raise UserError(f"backbone.channels must be a list of positive widths, got {channels}")
        self.stages = nn.ModuleList()
        width = input_shape[0]
        for stage, out in enumerate(channels):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if stage > 0 else []
            dilation = 2 if stage == len(channels) - 1 and stage > 0 else 1
            for _ in range(2):
                layers += [nn.Conv2d(width, out, 3, padding=dilation, dilation=dilation, bias=False),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                width = out
            self.stages.append(nn.Sequential(*layers))
        self.hypercolumns = bool(options.get("hypercolumns", True))
        # Each deeper stage's maps, projected to the first stage's width at their own resolution (cheaper
        # than upsampling them whole), are upsampled and added to the first stage's.
        self.projections = nn.ModuleList(nn.Conv2d(width_k, channels[0], 1, bias=False) for width_k in channels[1:]) \
            if self.hypercolumns else None
        self.merge = nn.Sequential(nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)) if self.hypercolumns else None
        self.out_features = channels[0] if self.hypercolumns else channels[-1]
        pooled = 2 ** (len(channels) - 1)
        self.output_stride = 1 if self.hypercolumns else pooled
        if input_shape[1] % pooled or input_shape[2] % pooled:
            raise UserError(f"backbone=fcn_digits pools its inputs by {pooled} ({len(channels)} stages): image sides must "
                            f"be divisible by it, got {tuple(input_shape[1:])}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, maps = x.shape[-2:], []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        if not self.hypercolumns:
            return x
        merged = maps[0]
        for projection, deeper in zip(self.projections, maps[1:]):
            merged = merged + nn.functional.interpolate(projection(deeper), size=size, mode="bilinear", align_corners=False)
        return self.merge(merged)


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise in training mode only (VADA's regulariser after each pooling stage)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x) if self.training and self.std > 0 else x


class VadaSmall(nn.Module):
    """The "small" network of VADA / DIRT-T (Shu et al., ICLR 2018; `codebase/models/nns/small.py` of
    their code): three stages of three conv3x3 (64, 'same' padding) - BatchNorm - LeakyReLU(0.1); after
    the first two stages a 2x2 max-pool, dropout (0.5) and Gaussian noise (std 1); then global
    average pooling. The features are the pooled 64 channels and the label head is one linear layer.
    (Their discriminator reads the second stage's output maps; here it reads the pooled features, the
    one feature space every head of this runner shares.) Inputs are usually instance-normalised
    first (`backbone.input_norm=instance`, configs/backbone/vada_small.yaml).
    """

    def __init__(self, input_shape: tuple[int, ...], cfg=None):
        super().__init__()
        _require_image("vada_small", input_shape, 8)
        options = cfg if cfg is not None else {}
        width, dropout = int(options.get("channels", 64)), float(options.get("dropout", 0.5))
        noise = float(options.get("noise", 1.0))
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for stage in range(3):
            for _ in range(3):
                layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                           nn.LeakyReLU(0.1, inplace=True)]
                in_channels = width
            if stage < 2:
                layers += [nn.MaxPool2d(2, ceil_mode=True), nn.Dropout(dropout), GaussianNoise(noise)]
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


BACKBONES = {"dann_mnist": DannMnist, "dann_svhn": DannSvhn, "dtn": DTN, "lenet": LeNet, "mlp": MLP,
             "vada_small": VadaSmall, "fcn_digits": FcnDigits, "deeplabv3": TorchvisionDeepLab,
             **{name: TorchvisionResNet for name in TORCHVISION_RESNETS}, "timm": TimmBackbone}


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


INPUT_NORMS = ("none", "instance")


class InputInstanceNorm(nn.Module):
    """Each image standardised per channel over its own pixels (instance normalisation without learned
    scale and shift), before the network sees it: VADA's and DIRT-T's input layer (Shu et al., ICLR
    2018), which removes a global colour and contrast shift such as MNIST -> MNIST-M's per image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.instance_norm(x, eps=1e-5)


class FeatureExtractor(nn.Module):
    """The backbone followed by the optional bottleneck: what every method calls its features G(x).

    The bottleneck (`backbone.bottleneck.width`; null: none) is Linear -> BatchNorm (optional) ->
    ReLU (optional, `relu`) -> Dropout (optional), the block Transfer-Learning-Library puts between
    the backbone and the heads of every method (256 wide with BatchNorm on digits; 1024 with dropout
    for MDD). SHOT's reference code has no ReLU there (Linear -> BatchNorm -> Dropout 0.5:
    digit/network.py, feat_bottleneck with type "bn"): `relu: false`.
    The two parts are separate modules so each gets its own learning-rate multiplier
    (`optim.lr_mult.backbone`, `optim.lr_mult.bottleneck`). `backbone.input_norm=instance` puts
    `InputInstanceNorm` (no parameters) in front of the backbone.
    """

    def __init__(self, cfg, input_shape: tuple[int, ...]):
        super().__init__()
        input_norm = cfg.get("input_norm") or "none"
        if input_norm not in INPUT_NORMS:
            raise UserError(f"backbone.input_norm must be one of {', '.join(INPUT_NORMS)} (or null), "
                            f"got {input_norm!r}")
        if input_norm == "instance" and len(input_shape) != 3:
            raise UserError("backbone.input_norm=instance needs images, but the data gives inputs of shape "
                            f"{tuple(input_shape)}")
        self.input_norm = InputInstanceNorm() if input_norm == "instance" else nn.Identity()
        self.backbone = build_backbone(cfg, input_shape)
        # Dense backbones (segmentation) give feature maps (N, d, h, w) at 1/output_stride of the input.
        self.output_stride: int | None = getattr(self.backbone, "output_stride", None)
        options = cfg.get("bottleneck") or {}
        width = options.get("width")
        if width is not None and self.output_stride is not None:
            raise UserError(f"backbone={cfg.name} gives feature maps for segmentation; it takes no bottleneck "
                            f"(set backbone.bottleneck.width=null)")
        if width is None:
            self.bottleneck = nn.Identity()
            self.out_features = self.backbone.out_features
        else:
            if int(width) < 1:
                raise UserError(f"backbone.bottleneck.width must be a positive integer or null, got {width}")
            layers: list[nn.Module] = [nn.Linear(self.backbone.out_features, int(width))]
            if options.get("batch_norm", True):
                layers.append(nn.BatchNorm1d(int(width)))
            if options.get("relu", True):
                layers.append(nn.ReLU(inplace=True))
            if float(options.get("dropout", 0.0)) > 0:
                dropout = L2PreservedDropout if options.get("l2_dropout", False) else nn.Dropout
                layers.append(dropout(float(options.dropout)))
            self.bottleneck = nn.Sequential(*layers)
            self.out_features = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.backbone(self.input_norm(x)))


def build_features(cfg, input_shape: tuple[int, ...]) -> FeatureExtractor:
    """The feature extractor G of the `backbone` config node: backbone + bottleneck."""
    return FeatureExtractor(cfg, tuple(input_shape))


def without_initial_weights(cfg):
    """A copy of a run's config whose backbone starts from random weights, for building a model whose
    weights a checkpoint replaces at once (resume, da-eval): neither the network nor the pretrained or
    local weights file is needed then."""
    cfg = copy.deepcopy(cfg)
    for key, value in (("pretrained", False), ("weights", None)):
        if key in cfg.backbone:  # digit backbones have neither key
            cfg.backbone[key] = value
    if cfg.method.get("init_from"):  # a method that starts from another run's weights (dirt_t)
        cfg.method.init_from = None
    return cfg
