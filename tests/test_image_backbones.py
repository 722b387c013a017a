"""The image backbones: torchvision's ResNets and timm models, their initial weights (random, a local
file, the libraries' pretrained weights from their caches) and their place in methods and the trainer.

Nothing here touches the network: downloads are replaced by functions that fail, and "pretrained"
files are random weights saved where the libraries' caches look for them."""

import math
import sys
import urllib.error

import pytest
import torch
import torchvision

from da_runner.config import validate
from da_runner.errors import UserError
from da_runner.methods import METHODS, Batch, StepContext, build_method
from da_runner.nn.backbones import build_backbone, build_features, without_initial_weights
from da_runner.trainer import train
from conftest import TINY_DIGITS, make_cfg

RANDOM_RESNET18 = ["backbone=resnet18", "backbone.pretrained=false"]
SHAPE = (3, 32, 32)


@pytest.fixture
def no_downloads(monkeypatch):
    """torch.hub's downloads (torchvision's and timm's URL weights) fail as they would offline."""
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls


def images(n, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def step_once(method):
    """One training step of `method` on a fixed random batch of 3x32x32 images (4 source, 4 target)."""
    batch = Batch(x_s=images(4, 1), y_s=torch.tensor([0, 1, 2, 3]), x_t=images(4, 2))
    return method.step(batch, StepContext(step=0, max_steps=10, progress=0.0, grl_lambda=1.0, lr=0.01))


def backbone_weights(method):
    return {name: p.detach().clone() for name, p in method.features.backbone.named_parameters()}


@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)])
def test_resnet_features_are_the_pooled_penultimate_layer(name, width):
    net = build_backbone(make_cfg(f"backbone={name}", "backbone.pretrained=false").backbone, SHAPE)
    assert net.out_features == width
    assert net(images(2)).shape == (2, width)
    assert not any(key.startswith("fc.") for key in net.net.state_dict())  # the label head replaces fc


def test_resnet18_from_random_weights_trains_a_dann_step():
    torch.manual_seed(0)
    method = build_method(make_cfg("method=dann", *RANDOM_RESNET18), SHAPE, 10)
    # The reference recipe's heads sit on the 512 pooled features: a 256-d bottleneck, a linear label head.
    assert method.features.out_features == 256 and method.classifier[0].in_features == 256
    before = backbone_weights(method)
    out = step_once(method)
    assert math.isfinite(out["loss"].item()) and out["loss_domain"].item() > 0
    after = backbone_weights(method)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_the_backbone_group_learns_at_a_tenth_of_the_lr():
    method = build_method(make_cfg("method=dann", *RANDOM_RESNET18), SHAPE, 10)
    groups = {group["group"]: group for group in method.optimizers["main"].param_groups}
    assert {name: group["lr_mult"] for name, group in groups.items()} == {"backbone": 0.1, "bottleneck": 1.0,
                                                                          "heads": 1.0}
    conv1 = method.features.backbone.net.conv1.weight
    assert any(p is conv1 for p in groups["backbone"]["params"])
    assert len(groups["backbone"]["params"]) == len(list(method.features.backbone.parameters()))
    # A command-line override still wins, and the digit backbones keep every group at 1.
    assert make_cfg(*RANDOM_RESNET18, "optim.lr_mult.backbone=1").optim.lr_mult.backbone == 1
    assert make_cfg("backbone=dann_mnist").optim.lr_mult.backbone == 1.0


def resnet18_state(seed):
    """A state dict of torchvision's ResNet-18 with its fc layer, as torchvision and most scripts save it."""
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=1000).state_dict()


def assert_loaded(net, state):
    own = net.state_dict()
    for key, value in state.items():
        if key.startswith("fc."):
            assert key not in own
        else:
            assert torch.equal(own[key], value), key


@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s},
                                  lambda s: {f"module.{k}": v for k, v in s.items()}],
                         ids=["plain", "state_dict", "model", "DataParallel"])
def test_weights_from_a_local_file(tmp_path, wrap, no_downloads):
    state = resnet18_state(seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(wrap(state), path)
    # backbone.pretrained stays true: the local file stands in for the download.
    net = build_backbone(make_cfg("backbone=resnet18", f"backbone.weights={path}").backbone, SHAPE)
    assert_loaded(net.net, state)
    assert no_downloads == []


def test_a_local_file_of_another_network_names_the_keys(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet34().state_dict()  # three more blocks in layer1 than ResNet-18
    del state["conv1.weight"]
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as error:
        build_backbone(make_cfg(*RANDOM_RESNET18, f"backbone.weights={path}").backbone, SHAPE)
    message = str(error.value)
    assert str(path) in message and "missing keys conv1.weight" in message
    assert "unexpected keys layer1.2.conv1.weight" in message


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"not a checkpoint", "could not be read as a checkpoint"),
    (torch.zeros(3), "holds no state dict"),
])
def test_an_unusable_weights_file_is_named(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    cfg = make_cfg(*TINY_DIGITS, *RANDOM_RESNET18, f"backbone.weights={path}")
    with pytest.raises(UserError, match=message) as error:
        build_backbone(cfg.backbone, SHAPE)
    assert str(path) in str(error.value)
    if content is None:  # a missing file is caught with the other config errors, before any data is read
        with pytest.raises(UserError, match="no such file"):
            validate(cfg)


def torchvision_cache_file(tmp_path, monkeypatch, weights):
    """Where torch.hub's cache under a temporary TORCH_HOME holds `weights` (hub/checkpoints/<file of the URL>)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]


def test_pretrained_weights_come_from_torch_hubs_cache(tmp_path, monkeypatch, no_downloads):
    path = torchvision_cache_file(tmp_path, monkeypatch, torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    state = resnet18_state(seed=2)
    torch.save(state, path)
    net = build_backbone(make_cfg("backbone=resnet18").backbone, SHAPE)  # pretrained=true by default
    assert_loaded(net.net, state)
    assert no_downloads == []


def test_pretrained_weights_offline_give_one_message_naming_the_file_and_the_place(tmp_path, monkeypatch,
                                                                                   no_downloads):
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    path = torchvision_cache_file(tmp_path, monkeypatch, weights)
    cfg = make_cfg(*TINY_DIGITS, "backbone=resnet50", "backbone.pretrained_tag=IMAGENET1K_V2",
                   "trainer.max_steps=1")
    with pytest.raises(UserError) as error:
        train(cfg, tmp_path / "run")  # the path `da-run` takes, which prints a UserError as one line
    message = str(error.value)
    assert no_downloads == [weights.url]
    assert "\n" not in message
    for part in (weights.url, f"at {path} ", "backbone.weights=<file>", "backbone.pretrained=false"):
        assert part in message


def test_an_unknown_torchvision_weights_tag_lists_the_tags():
    with pytest.raises(UserError, match="backbone.pretrained_tag must be one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        validate(make_cfg("backbone=resnet50", "backbone.pretrained_tag=IMAGENET1K_V3"))


def test_torchvision_resnets_take_rgb_images():
    with pytest.raises(UserError, match="data.channels=3"):
        build_backbone(make_cfg(*RANDOM_RESNET18).backbone, (1, 28, 28))


def test_resume_and_evaluation_need_no_initial_weights_file(tmp_path):
    """A checkpoint holds every weight: resuming a run or evaluating its checkpoint works after the
    backbone.weights file it started from is gone (and would not download pretrained weights)."""
    from da_runner.eval_cli import evaluate_checkpoint

    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18_state(seed=4), weights)
    overrides = [*TINY_DIGITS, "backbone=resnet18", f"backbone.weights={weights}", "trainer.max_steps=2",
                 "trainer.validators=[source_acc]"]
    first = train(make_cfg(*overrides), tmp_path / "run")
    weights.unlink()
    assert train(make_cfg(*overrides, "resume=true"), tmp_path / "run")["target_acc"] == first["target_acc"]
    report = evaluate_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", [])
    assert report["target_test"]["accuracy"] == pytest.approx(first["target_acc"])
    cfg = make_cfg(*overrides)
    assert without_initial_weights(cfg).backbone.weights is None and cfg.backbone.weights == str(weights)


@pytest.fixture
def timm():
    """timm, an optional dependency (the `images` and `test` extras)."""
    return pytest.importorskip("timm")


@pytest.mark.parametrize("model", ["convnext_atto", "resnet10t", "vit_tiny_patch16_224"])
def test_a_timm_model_from_random_weights_trains_a_step(timm, model):
    torch.manual_seed(0)
    cfg = make_cfg("method=cdan", "backbone=timm", f"backbone.model={model}", "backbone.pretrained=false")
    method = build_method(cfg, SHAPE, 10)
    assert method.features.backbone.out_features == timm.create_model(model, num_classes=0).num_features
    before = backbone_weights(method)
    out = step_once(method)
    assert math.isfinite(out["loss"].item())
    after = backbone_weights(method)
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_timm_adapts_its_first_layer_to_grey_images(timm):
    net = build_backbone(make_cfg("backbone=timm", "backbone.model=resnet10t", "backbone.pretrained=false").backbone,
                         (1, 28, 28))
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 512)


def test_timm_weights_from_a_local_file_without_the_head(timm, tmp_path):
    torch.manual_seed(3)
    state = timm.create_model("convnext_atto", num_classes=7).state_dict()
    assert "head.fc.weight" in state and "head.norm.weight" in state
    path = tmp_path / "convnext.pth"
    torch.save({"state_dict": state}, path)
    net = build_backbone(make_cfg("backbone=timm", "backbone.model=convnext_atto",
                                  f"backbone.weights={path}").backbone, SHAPE)
    own = net.net.state_dict()
    assert "head.fc.weight" not in own
    assert all(torch.equal(own[key], value) for key, value in state.items() if not key.startswith("head.fc."))


def test_timm_pretrained_offline_names_the_weights_and_the_cache(timm, tmp_path, monkeypatch, no_downloads):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub makes no request
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError) as error:
        build_features(make_cfg("backbone=timm", "backbone.model=convnext_atto").backbone, SHAPE)
    message = str(error.value)
    assert "\n" not in message
    for part in ("https://huggingface.co/timm/convnext_atto.d2_in1k/", f"into {tmp_path / 'hf'} ",
                 "models--timm--convnext_atto.d2_in1k", "backbone.weights=<file>", "backbone.pretrained=false"):
        assert part in message


@pytest.mark.parametrize("model, message", [
    ("convnxt_atto", "is not a timm model; close matches: convnext_atto"),
    ("resnet10t.no_such_tag", "Tagged names: resnet10t.c3_in1k"),
])
def test_an_unknown_timm_model_lists_close_names(timm, model, message):
    with pytest.raises(UserError, match=message):
        validate(make_cfg("backbone=timm", f"backbone.model={model}"))


def test_timm_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'da-runner\[images\]'"):
        validate(make_cfg("backbone=timm"))


def test_bf16_on_cpu_runs_an_adversarial_method_on_a_resnet(tmp_path, monkeypatch):
    """trainer.precision=bf16 trainer.channels_last=true: the ResNet's convolutions run in bfloat16 on
    NHWC tensors during the steps, and the loss stays finite."""
    seen, losses = set(), []
    conv_forward, cdan_step = torch.nn.Conv2d.forward, METHODS["cdan"].step

    def recording_forward(self, x):
        out = conv_forward(self, x)
        if self.training:
            seen.add((out.dtype, self.weight.is_contiguous(memory_format=torch.channels_last)))
        return out

    def recording_step(self, batch, ctx):
        terms = cdan_step(self, batch, ctx)
        losses.append(float(terms["loss"]))
        return terms

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    monkeypatch.setattr(METHODS["cdan"], "step", recording_step)
    cfg = make_cfg(*TINY_DIGITS, "method=cdan", *RANDOM_RESNET18, "trainer.max_steps=2",
                   "trainer.precision=bf16", "trainer.channels_last=true", "trainer.validators=[source_acc]")
    metrics = train(cfg, tmp_path)
    assert seen == {(torch.bfloat16, True)}
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert metrics["step"] == 2 and 0 <= metrics["target_acc"] <= 1
