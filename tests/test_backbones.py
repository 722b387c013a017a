import pytest
import torch
from omegaconf import OmegaConf

from da_runner.errors import UserError
from da_runner.nn.backbones import BACKBONES, build_backbone
from conftest import make_cfg


@pytest.mark.parametrize("name, shape, features", [
    ("dann_mnist", (3, 28, 28), 48 * 4 * 4),   # the paper's 768 features
    ("dann_mnist", (1, 28, 28), 768),
    ("lenet", (1, 28, 28), 500),
    ("dtn", (3, 32, 32), 512),
    ("dann_svhn", (3, 32, 32), 128 * 7 * 7),
    ("mlp", (2,), 64),
])
def test_backbone_output_width_and_mode(name, shape, features):
    cfg = make_cfg(f"backbone={name}").backbone
    net = build_backbone(cfg, shape)
    assert net.out_features == features and net.training and all(m.training for m in net.modules())
    assert net(torch.zeros(4, *shape)).shape == (4, features)


def test_image_backbone_on_vector_data_is_a_clear_error():
    with pytest.raises(UserError, match="backbone=mlp"):
        build_backbone(OmegaConf.create({"name": "dann_mnist"}), (2,))


def test_every_backbone_has_a_config():
    for name in BACKBONES:
        assert make_cfg(f"backbone={name}").backbone.name == name
