"""CDAN, CDAN+E, BSP and ADDA: their math on tiny tensors and their stage logic."""

import math

import pytest
import torch

from da_runner.errors import UserError
from da_runner.methods import Batch, StepContext, build_method
from da_runner.nn.losses import (RandomizedMultilinearMap, bsp_penalty, domain_loss_and_acc, entropy_weights,
                                 multilinear_map)
from conftest import TINY_DIGITS, TINY_TOY, make_cfg


def ctx(step=0, max_steps=10, lam=1.0, lr=0.01):
    return StepContext(step=step, max_steps=max_steps, progress=step / max_steps, grl_lambda=lam, lr=lr)


def test_multilinear_map_is_the_flattened_outer_product():
    f = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    g = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    out = multilinear_map(f, g)
    assert out.shape == (2, 6)
    assert out[0].tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.6, 2.4])
    assert out[1].tolist() == pytest.approx([0.5, -1.0, 0.0, 0.0, 0.0, 0.0])


def test_randomized_map_equals_its_formula_with_the_stored_matrices():
    torch.manual_seed(0)
    layer = RandomizedMultilinearMap(features_dim=5, num_classes=3, output_dim=16)
    f, g = torch.randn(4, 5), torch.softmax(torch.randn(4, 3), 1)
    expected = torch.stack([
        torch.tensor([sum(f[n, i] * layer.R_f[i, k] for i in range(5)) * sum(g[n, c] * layer.R_g[c, k] for c in range(3))
                      for k in range(16)]) for n in range(4)]) / 4.0  # sqrt(16)
    assert torch.allclose(layer(f, g), expected, atol=1e-5)
    assert {"R_f", "R_g"} <= set(layer.state_dict())  # fixed matrices travel with checkpoints


def test_entropy_weights_match_a_hand_computation():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    raw = [1 + math.exp(0.0), 1 + math.exp(-math.log(2))]  # H = 0 and log 2
    expected = [w * 2 / sum(raw) for w in raw]
    assert entropy_weights(p).tolist() == pytest.approx(expected, abs=1e-6)


def test_weighted_domain_loss_is_the_weighted_mean():
    logits, is_source = torch.tensor([[2.0], [-1.0], [0.5]]), torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([0.5, 1.0, 1.5])
    bce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(0.5))]
    loss, acc = domain_loss_and_acc(logits, is_source, w)
    assert loss.item() == pytest.approx(sum(wi * b for wi, b in zip(w.tolist(), bce)) / 3.0, abs=1e-6)
    assert acc.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("k", [1, 2])
def test_bsp_penalty_equals_svdvals(k):
    torch.manual_seed(0)
    f_s, f_t = torch.randn(6, 4), torch.randn(5, 4)
    expected = (torch.linalg.svdvals(f_s)[:k] ** 2).sum() + (torch.linalg.svdvals(f_t)[:k] ** 2).sum()
    assert bsp_penalty(f_s, f_t, k).item() == pytest.approx(expected.item(), rel=1e-5)


def test_cdan_chooses_the_randomized_map_by_size():
    # randomized=null: the paper's rule, the full map up to max_multilinear_dim (4096) inputs.
    small = build_method(make_cfg("method=cdan", "method.randomized=null", *TINY_TOY), (2,), 2)  # 256 * 2 <= 4096
    assert small.random_map is None and small.discriminator[0].in_features == 256 * 2
    big = build_method(make_cfg("method=cdan", "method.randomized=null", "backbone.bottleneck.width=null", *TINY_DIGITS),
                       (3, 28, 28), 10)  # 768 * 10 > 4096
    assert big.random_map is not None and big.discriminator[0].in_features == 1024
    lower = build_method(make_cfg("method=cdan", "method.randomized=null", "method.max_multilinear_dim=100",
                                  "method.randomized_dim=16", *TINY_TOY), (2,), 2)  # 512 > 100
    assert lower.random_map is not None and lower.discriminator[0].in_features == 16
    forced = build_method(make_cfg("method=cdan", "method.randomized=true", "method.randomized_dim=32", *TINY_TOY), (2,), 2)
    assert forced.discriminator[0].in_features == 32


def test_cdan_uses_the_full_map_by_default_whatever_its_size():
    # The reference recipes' default (randomized: false): d * C inputs even past the paper's 4096.
    cfg = make_cfg("method=cdan", *TINY_DIGITS)
    assert cfg.method.randomized is False
    assert build_method(cfg, (3, 28, 28), 10).discriminator[0].in_features == 256 * 10  # the bottleneck's map
    big = build_method(make_cfg("method=cdan", "backbone.bottleneck.width=null", *TINY_DIGITS), (3, 28, 28), 10)
    assert big.random_map is None and big.discriminator[0].in_features == 768 * 10
    small = build_method(make_cfg("method=cdan", *TINY_TOY), (2,), 2)
    assert small.random_map is None and small.discriminator[0].in_features == 256 * 2


def test_cdan_discriminator_sees_the_map_of_features_and_detached_predictions(monkeypatch):
    torch.manual_seed(0)
    method = build_method(make_cfg("method=cdan_e", *TINY_TOY), (2,), 2)
    seen = {}
    original = method.discriminator.forward

    def spy(x):
        seen.setdefault("inputs", []).append(x)
        return original(x)

    monkeypatch.setattr(method.discriminator, "forward", spy)
    batch = Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2))
    with torch.no_grad():  # the default runs each domain through the networks on its own
        f = torch.cat([method.features(batch.x_s), method.features(batch.x_t)])
        g = torch.softmax(torch.cat([method.classifier(f[:4]), method.classifier(f[4:])]), 1)
    out = method.step(batch, ctx())
    assert len(seen["inputs"]) == 2  # one discriminator pass per domain
    assert torch.allclose(torch.cat(seen["inputs"]), multilinear_map(f, g), atol=1e-6)
    assert {"loss_cls", "loss_domain", "domain_acc"} <= set(out)


def cdan_e(*overrides):
    return build_method(make_cfg("method=cdan_e", *overrides, *TINY_TOY), (2,), 2)


def test_cdan_e_weights_normalised_over_the_batch_or_per_domain():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])  # entropies 0, log 2, log 2, log 2
    logits = (p + 1e-12).log()
    confident, unsure = 2.0, 1.5  # 1 + exp(-H)
    batch = cdan_e("method.entropy_normalization=batch", "method.entropy_gradient=false").entropy_weights(logits, 2, ctx())
    mean = (confident + 3 * unsure) / 4
    assert batch.tolist() == pytest.approx([confident / mean, unsure / mean, unsure / mean, unsure / mean], abs=1e-5)
    # CDAN's own code: each domain's weights have mean 1, so the unsure target rows weigh 1 each.
    per_domain = cdan_e("method.entropy_gradient=false").entropy_weights(logits, 2, ctx())  # the default: domain
    source_mean = (confident + unsure) / 2
    assert per_domain.tolist() == pytest.approx([confident / source_mean, unsure / source_mean, 1.0, 1.0], abs=1e-5)
    assert not batch.requires_grad


def test_cdan_e_entropy_gradient_is_reversed_and_scaled_by_lambda():
    torch.manual_seed(0)
    logits = torch.randn(6, 2, requires_grad=True)
    per_sample = torch.rand(6)  # stands for the discriminator's per-sample losses
    method = cdan_e()  # the authors' code: per-domain normalisation, the entropy's gradient reversed
    (method.entropy_weights(logits, 3, ctx(lam=0.3)) * per_sample).sum().backward()
    reversed_grad = logits.grad.clone()

    # The same weights built by hand, with the normalisers detached and no reversal.
    logits.grad = None
    h = -(torch.softmax(logits, 1) * torch.log_softmax(logits, 1)).sum(1)
    w = 1 + torch.exp(-h)
    w = torch.cat([w[:3] * 3 / w[:3].detach().sum(), w[3:] * 3 / w[3:].detach().sum()])
    (w * per_sample).sum().backward()
    assert torch.allclose(reversed_grad, -0.3 * logits.grad, atol=1e-6)
    assert reversed_grad.abs().sum() > 0
    assert not cdan_e("method.entropy_gradient=false").entropy_weights(logits, 3, ctx()).requires_grad


def test_cdan_e_rejects_an_unknown_normalisation():
    with pytest.raises(UserError, match="method.entropy_normalization"):
        cdan_e("method.entropy_normalization=classes")


def test_cdan_runs_the_domains_apart_except_with_bsp():
    # Per-domain BatchNorm statistics lift CDAN (docs/benchmarks.md); with BSP they collapse it.
    passes = {name: make_cfg(f"method={name}").method.separate_forward for name in ("cdan", "cdan_e", "cdan_bsp")}
    assert passes == {"cdan": True, "cdan_e": True, "cdan_bsp": False}


def test_bsp_variants_log_and_use_the_penalty():
    for name in ("dann_bsp", "cdan_bsp"):
        method = build_method(make_cfg(f"method={name}", *TINY_TOY), (2,), 2)
        assert method.bsp_weight == 1e-4
        out = method.step(Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2)), ctx())
        assert out["loss_bsp"] > 0
        assert out["loss"].item() == pytest.approx((out["loss_cls"] + out["loss_domain"] + 1e-4 * out["loss_bsp"]).item(), rel=1e-5)
    assert "loss_bsp" not in build_method(make_cfg("method=dann", *TINY_TOY), (2,), 2).step(
        Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2)), ctx())


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_adda_stages():
    torch.manual_seed(0)
    method = build_method(make_cfg("method=adda", "method.pretrain_steps=3", *TINY_DIGITS), (3, 28, 28), 10)
    g = torch.Generator().manual_seed(1)

    def batch():
        return Batch(torch.randn(8, 3, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g),
                     torch.randn(8, 3, 28, 28, generator=g))

    start = {name: params(getattr(method, name)) for name in ("features", "classifier", "target_features", "discriminator")}
    for step in range(3):  # stage 1: only the source encoder and the classifier learn
        assert method.step(batch(), ctx(step))["stage"] == 1
    assert changed(start["features"], method.features) and changed(start["classifier"], method.classifier)
    assert not changed(start["discriminator"], method.discriminator)
    assert not changed(start["target_features"], method.target_features)

    after_stage1 = {name: params(getattr(method, name)) for name in ("features", "classifier")}
    out = method.step(batch(), ctx(3))
    assert out["stage"] == 2 and {"loss_domain", "loss_target", "domain_acc"} <= set(out)
    for step in range(4, 6):
        method.step(batch(), ctx(step))
    assert bool(method.stage2_started)
    assert not changed(after_stage1["features"], method.features)  # frozen source encoder
    assert not changed(after_stage1["classifier"], method.classifier)  # frozen classifier
    assert changed(start["discriminator"], method.discriminator)
    assert changed(after_stage1["features"], method.target_features)  # moved away from its initial copy
    # evaluation goes through the target encoder once stage 2 has begun
    x = torch.randn(2, 3, 28, 28)
    method.eval()
    assert torch.equal(method.predict(x), method.classifier(method.target_features(x)))


def test_adda_target_encoder_is_initialised_from_the_source_encoder(monkeypatch):
    torch.manual_seed(0)
    method = build_method(make_cfg("method=adda", "method.pretrain_steps=1", *TINY_TOY), (2,), 2)
    method.step(Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2)), ctx(0))
    source_weights = params(method.features)
    target_optimizer = method.optimizers["target"]
    seen = {}

    def record_then_step(*args, **kwargs):  # at the first target update, before it changes anything
        seen.setdefault("target", params(method.target_features))

    monkeypatch.setattr(target_optimizer, "step", record_then_step)
    method.step(Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.randn(4, 2)), ctx(1))
    assert all(torch.equal(seen["target"][n], source_weights[n]) for n in source_weights)
    # stage 2's Adam keeps its own constant lr: param groups without lr_mult
    assert all("lr_mult" not in g and g["lr"] == 2e-4 and g["betas"][0] == 0.5 for g in target_optimizer.param_groups)


def test_adda_stage2_draws_no_dropout_in_either_encoder():
    """The frozen source encoder runs in eval mode; the target encoder must not draw dropout masks either,
    or the discriminator separates the domains by the noise: with dropout off its features are a
    deterministic function of the input, while its BatchNorm layers keep training."""
    torch.manual_seed(0)
    method = build_method(make_cfg("method=adda", "method.pretrain_steps=1", "backbone=lenet", *TINY_DIGITS),
                          (1, 28, 28), 10)
    x_t = torch.randn(8, 1, 28, 28)
    batch = Batch(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), x_t)
    method.train()
    method.step(batch, ctx(0))  # stage 1
    lenet_dropout = [m for m in method.target_features.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert lenet_dropout and all(m.training for m in lenet_dropout)
    method.step(batch, ctx(1))  # stage 2: the target encoder copies the source encoder, then adapts
    assert all(not m.training for m in lenet_dropout)
    batch_norms = [m for m in method.target_features.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert batch_norms and all(m.training for m in batch_norms)  # lenet's bottleneck keeps target statistics
    # in the mode stage 2 trains it in, the same inputs give the same features (no dropout draws;
    # BatchNorm normalises with the batch's statistics, equal for equal batches)
    with torch.no_grad():
        assert torch.equal(method.target_features(x_t), method.target_features(x_t))
