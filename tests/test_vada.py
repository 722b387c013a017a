"""VADA and DIRT-T: virtual adversarial training against a hand computation, the input instance
normalisation and the small network, VADA's two updates, and DIRT-T starting from a VADA run,
refreshing its teacher, ignoring the source and resuming exactly."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da_runner.errors import UserError
from da_runner.methods import Batch, StepContext, build_method
from da_runner.nn.backbones import build_features
from da_runner.nn.losses import soft_cross_entropy, virtual_adversarial_loss
from da_runner.trainer import train
from conftest import TINY_DIGITS, crash_and_resume, load_ckpt, make_cfg, read_metrics


def ctx(step=0):
    return StepContext(step=step, max_steps=100, progress=step / 100, grl_lambda=1.0, lr=1e-3)


def test_soft_cross_entropy_is_the_kl_plus_the_targets_entropy():
    target_logits, logits = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.2, 0.5, 0.1]])
    p, log_q = F.softmax(target_logits, 1), F.log_softmax(logits, 1)
    kl = (p * (p.log() - log_q)).sum()
    entropy = -(p * p.log()).sum()
    assert soft_cross_entropy(target_logits, logits).item() == pytest.approx((kl + entropy).item())


def test_vat_against_a_hand_computation_on_a_linear_model():
    # For logits = W x the gradient of CE(p, softmax(W (x + d))) in d is W^T (softmax(W (x + d)) - p).
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4)
    logits = model(x)
    radius, xi = 2.0, 1e-3
    torch.manual_seed(5)
    loss = virtual_adversarial_loss(model, x, logits, radius, xi)

    torch.manual_seed(5)
    noise = torch.randn_like(x)
    d = xi * noise / noise.norm(dim=1, keepdim=True)
    W, p = model.weight.detach(), F.softmax(logits.detach(), 1)
    grad = (F.softmax((x + d) @ W.T, 1) - p) @ W / len(x)  # the mean over the batch scales every row alike
    r = radius * grad / grad.norm(dim=1, keepdim=True)
    by_hand = -(p * F.log_softmax((x + r) @ W.T, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss.backward()
    assert model.weight.grad is not None  # the model learns from the perturbed prediction


def test_vat_leaves_batch_norm_running_statistics_alone():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    x = torch.randn(16, 4)
    logits = model(x)
    running = model[1].running_mean.clone(), model[1].running_var.clone()
    virtual_adversarial_loss(model, x, logits, radius=3.5)
    assert torch.equal(model[1].running_mean, running[0]) and torch.equal(model[1].running_var, running[1])
    assert model[1].momentum == 0.1  # put back


def test_input_instance_norm_removes_a_per_image_colour_shift():
    cfg = make_cfg(*TINY_DIGITS, "backbone.input_norm=instance").backbone
    torch.manual_seed(0)
    features = build_features(cfg, (3, 32, 32)).eval()
    x = torch.rand(4, 3, 32, 32)
    scale, shift = torch.tensor([0.5, 2.0, 1.5]).view(1, 3, 1, 1), torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    assert torch.allclose(features(x), features(x * scale + shift), atol=1e-3)  # eps in the variance: not exact
    plain = build_features(make_cfg(*TINY_DIGITS).backbone, (3, 32, 32)).eval()
    assert not torch.allclose(plain(x), plain(x * scale + shift), atol=1e-2)


def test_input_norm_rejects_vectors_and_unknown_values():
    with pytest.raises(UserError, match="input_norm=instance needs images"):
        build_features(make_cfg("data=toy2d", "backbone=mlp", "+backbone.input_norm=instance").backbone, (2,))
    with pytest.raises(UserError, match="backbone.input_norm must be one of none, instance"):
        build_features(make_cfg(*TINY_DIGITS, "backbone.input_norm=batch").backbone, (3, 32, 32))


@pytest.mark.parametrize("size", [28, 32])
def test_vada_small_network(size):
    cfg = make_cfg(*TINY_DIGITS, "backbone=vada_small").backbone
    features = build_features(cfg, (3, size, size))
    assert features.out_features == 64 and isinstance(features.input_norm, nn.Module)
    x = torch.randn(5, 3, size, size)
    assert features(x).shape == (5, 64)
    features.eval()  # no dropout, no noise: deterministic
    assert torch.equal(features(x), features(x))
    features.train()
    assert not torch.equal(features(x), features(x))


def tiny_batch(n=8, size=32):
    torch.manual_seed(1)
    return Batch(torch.randn(n, 3, size, size), torch.randint(0, 10, (n,)), torch.randn(n, 3, size, size))


def test_vada_steps_the_discriminator_on_detached_features_then_the_classifier():
    torch.manual_seed(0)
    method = build_method(make_cfg(*TINY_DIGITS, "method=vada"), (3, 32, 32), 10)
    features_before = copy.deepcopy(method.features.state_dict())
    disc_before = copy.deepcopy(method.discriminator.state_dict())
    out = method.step(tiny_batch(), ctx())
    for key in ("loss_cls", "loss_domain", "loss_disc", "loss_entropy", "loss_vat_target", "loss_vat_source"):
        assert torch.isfinite(out[key]), key
    assert not torch.equal(method.discriminator.state_dict()["0.weight"], disc_before["0.weight"])
    changed = [k for k, v in method.features.state_dict().items() if not torch.equal(v, features_before[k])]
    assert changed
    # Each optimizer holds only its own parameters.
    main = {id(p) for g in method.optimizers["main"].param_groups for p in g["params"]}
    assert not main & {id(p) for p in method.discriminator.parameters()}


def test_vada_without_its_adaptation_terms_is_source_only():
    """With every extra weight at 0, the features learn from the source cross-entropy alone: the same
    update whatever the target batch holds."""
    torch.manual_seed(0)
    overrides = [*TINY_DIGITS, "method=vada", "method.domain_weight=0", "method.source_vat_weight=0",
                 "method.target_weight=0"]
    a = build_method(make_cfg(*overrides), (3, 32, 32), 10)
    b = copy.deepcopy(a)
    batch = tiny_batch()
    a.step(batch, ctx())
    b.step(Batch(batch.x_s, batch.y_s, torch.randn_like(batch.x_t)), ctx())
    for (name, p), q in zip(a.features.named_parameters(), b.features.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


VADA_RUN = [*TINY_DIGITS, "method=vada", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3",
            "trainer.ema=0.9"]


@pytest.fixture(scope="module")
def vada_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vada")
    train(make_cfg(*VADA_RUN), run_dir)
    return run_dir


def test_dirt_t_starts_from_the_vada_run(vada_run):
    state = load_ckpt(vada_run / "checkpoints" / "last.pt")
    method = build_method(make_cfg(*TINY_DIGITS, "method=dirt_t", f"method.init_from={vada_run}"), (3, 28, 28), 10)
    weights = method.state_dict()
    raw, average = state["method"]["modules"], state["ema"]["average"]
    for key in raw:
        if key.startswith(("features.", "classifier.")):
            assert torch.equal(weights[key], raw[key]), key  # the model: VADA's raw weights
            assert torch.equal(weights[f"teacher.{key}"], average[key]), key  # the teacher: its average
            assert torch.equal(weights[f"average.{key}"], average[key]), key  # and the average goes on from it
    assert any(not torch.equal(raw[k], average[k]) for k in raw if k.endswith("weight"))


def test_dirt_t_needs_a_vada_run(vada_run):
    with pytest.raises(UserError, match="method.init_from"):
        train(make_cfg(*TINY_DIGITS, "method=dirt_t"), "unused")
    with pytest.raises(UserError, match="no checkpoint found"):
        build_method(make_cfg(*TINY_DIGITS, "method=dirt_t", "method.init_from=/nonexistent/run"), (3, 28, 28), 10)
    with pytest.raises(UserError, match="holds another network than backbone=dann_mnist"):
        build_method(make_cfg(*TINY_DIGITS, "method=dirt_t", f"method.init_from={vada_run}"), (3, 32, 32), 10)


def test_dirt_t_ignores_the_source_and_refreshes_its_teacher(vada_run):
    cfg = make_cfg(*TINY_DIGITS, "method=dirt_t", f"method.init_from={vada_run}", "method.teacher_every=2",
                   "method.average_decay=0.5")
    a, b = (build_method(cfg, (3, 28, 28), 10) for _ in range(2))
    batch = tiny_batch(size=28)
    nan_source = Batch(torch.full_like(batch.x_s, float("nan")), batch.y_s, batch.x_t)
    teacher_before = copy.deepcopy(a.teacher.state_dict())
    for method, data in ((a, batch), (b, nan_source)):
        torch.manual_seed(3)  # the same dropout, noise and VAT draws
        method.step(data, ctx(step=0))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # the source is never read
    assert all(torch.equal(v, a.teacher.state_dict()[k]) for k, v in teacher_before.items())  # not yet
    a.step(batch, ctx(step=1))  # the second step ends a teacher period: teacher <- the average
    for key, value in a.teacher.state_dict().items():
        assert torch.equal(value, a.average.state_dict()[key]), key
    assert not all(torch.equal(v, a.teacher.state_dict()[k]) for k, v in teacher_before.items())


def test_dirt_t_average_follows_the_model_after_a_memory_format_change(vada_run):
    """The moving average is a module of the method: after `.to(memory_format=channels_last)` (what
    trainer.channels_last does) it still averages the live weights."""
    cfg = make_cfg(*TINY_DIGITS, "method=dirt_t", f"method.init_from={vada_run}", "method.average_decay=0.75")
    method = build_method(cfg, (3, 28, 28), 10).to(memory_format=torch.channels_last)
    before = copy.deepcopy(method.average.state_dict())
    method.step(tiny_batch(size=28), ctx())
    live = method.student().state_dict()
    for key, value in method.average.state_dict().items():
        expected = 0.75 * before[key] + 0.25 * live[key] if value.is_floating_point() else live[key]
        assert torch.allclose(value, expected, atol=1e-6), key


def test_dirt_t_resumes_exactly_without_the_vada_run(vada_run, tmp_path, monkeypatch):
    args = [*TINY_DIGITS, "method=dirt_t", f"method.init_from={vada_run}", "method.teacher_every=3",
            "trainer.max_steps=10", "trainer.eval_every=2", "trainer.ckpt_every=4"]
    reference = train(make_cfg(*args), tmp_path / "ref")
    resumed = crash_and_resume(monkeypatch, "dirt_t", 6, args, tmp_path / "run")
    for key in ("target_acc", "selected_target_acc", "step"):
        assert resumed[key] == reference[key]
    ref, new = (load_ckpt(tmp_path / r / "checkpoints" / "last.pt")["method"] for r in ("ref", "run"))
    assert all(torch.equal(v, new["modules"][k]) for k, v in ref["modules"].items())
    assert any(k.startswith("average.") for k in ref["modules"])  # the average is resumed with the modules
    assert read_metrics(tmp_path / "run")["step"] == 10


def test_vat_radius_must_be_positive():
    with pytest.raises(UserError, match="method.vat_radius must be a number > 0, got 0"):
        train(make_cfg(*TINY_DIGITS, "method=vada", "method.vat_radius=0"), "unused")
