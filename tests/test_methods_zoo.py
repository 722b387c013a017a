"""DAN, JAN, Deep CORAL, MCD, MDD, MCC, MinEnt, BNM, AFN and the oracle: each loss against a hand
computation on a fixed tiny batch, the updates each method makes, and how the trainer treats them."""

import copy
import itertools
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from da_runner.config_tree import config_dir
from da_runner.errors import UserError
from da_runner.methods import METHODS, Batch, StepContext, build_method
from da_runner.methods.dann import DANN
from da_runner.nn.losses import (afn_loss, bnm_loss, class_balance_loss, classifier_discrepancy, coral_loss,
                                 entropy_loss, joint_mmd, mcc_loss, mdd_adversary_loss, mk_mmd)
from da_runner.trainer import train
from conftest import TINY_TOY, make_cfg, read_metrics
from test_trainer import scalar_tags

MULTIPLIERS = [0.5, 1.0, 2.0]


def ctx(step=0, lam=1.0, lr=0.05):
    return StepContext(step=step, max_steps=10, progress=step / 10, grl_lambda=lam, lr=lr)


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gauss(a, b, sigma2):
    return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma2))


def test_mk_mmd_equals_the_kernel_formula():
    f_s, f_t = fixed(4, 3, seed=1), fixed(5, 3, seed=2) + 1.0
    z = torch.cat([f_s, f_t])
    pairs = [(i, j) for i in range(9) for j in range(9) if i != j]
    mean_sq = sum(float(((z[i] - z[j]) ** 2).sum()) for i, j in pairs) / len(pairs)

    def k(a, b):
        return sum(gauss(a, b, m * mean_sq) for m in MULTIPLIERS)

    expected = (sum(k(a, b) for a in f_s for b in f_s) / 16 + sum(k(a, b) for a in f_t for b in f_t) / 25
                - 2 * sum(k(a, b) for a in f_s for b in f_t) / 20)
    assert mk_mmd(f_s, f_t, MULTIPLIERS).item() == pytest.approx(expected, rel=1e-5)
    assert mk_mmd(f_s, f_s.clone(), MULTIPLIERS).item() == pytest.approx(0.0, abs=1e-6)


def test_linear_mmd_equals_the_pairwise_formula():
    f_s, f_t = fixed(5, 3, seed=3), fixed(4, 3, seed=4) - 0.5  # uses the first 4 of each
    quads = [(f_s[0], f_s[1], f_t[0], f_t[1]), (f_s[2], f_s[3], f_t[2], f_t[3])]
    sq = [float(((a - b) ** 2).sum()) for s, s2, t, t2 in quads for a, b in ((s, s2), (t, t2), (s, t2), (s2, t))]
    mean_sq = sum(sq) / len(sq)

    def k(a, b):
        return sum(gauss(a, b, m * mean_sq) for m in MULTIPLIERS)

    expected = sum(k(s, s2) + k(t, t2) - k(s, t2) - k(s2, t) for s, s2, t, t2 in quads) / 2
    assert mk_mmd(f_s, f_t, MULTIPLIERS, linear=True).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("linear", [False, True])
def test_mmd_stays_finite_when_the_features_collapse(linear):
    # A randomly initialised network can minimise the MMD by mapping every sample to one point; the
    # bandwidth (a multiple of the mean squared distance) must not reach 0 and turn the kernels into 0/0.
    f_s = torch.ones(6, 3, requires_grad=True)
    f_t = (torch.ones(6, 3) + 1e-20 * fixed(6, 3, seed=11)).requires_grad_()
    loss = mk_mmd(f_s, f_t, MULTIPLIERS, linear=linear)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(f_s.grad).all() and torch.isfinite(f_t.grad).all()


def test_joint_mmd_multiplies_the_kernels_of_the_layers():
    f_s, f_t = fixed(3, 2, seed=5), fixed(3, 2, seed=6)
    g_s, g_t = torch.softmax(fixed(3, 4, seed=7), 1), torch.softmax(fixed(3, 4, seed=8), 1)
    f, g = torch.cat([f_s, f_t]), torch.cat([g_s, g_t])
    pairs = [(i, j) for i in range(6) for j in range(6) if i != j]
    mean_sq = sum(float(((f[i] - f[j]) ** 2).sum()) for i, j in pairs) / len(pairs)
    k = np.array([[sum(gauss(f[i], f[j], m * mean_sq) for m in MULTIPLIERS) * gauss(g[i], g[j], 0.92 ** 2)
                   for j in range(6)] for i in range(6)])
    expected = k[:3, :3].mean() + k[3:, 3:].mean() - 2 * k[:3, 3:].mean()
    assert joint_mmd([f_s, g_s], [f_t, g_t], [MULTIPLIERS, 0.92]).item() == pytest.approx(expected, rel=1e-5)


def test_coral_equals_explicit_covariances():
    f_s, f_t = fixed(6, 3, seed=9), 2 * fixed(7, 3, seed=10)
    c_s, c_t = np.cov(f_s.numpy(), rowvar=False), np.cov(f_t.numpy(), rowvar=False)
    expected = ((c_s - c_t) ** 2).sum() / (4 * 3 * 3)
    assert coral_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-5)


def test_bnm_is_minus_the_mean_singular_value():
    # The official code's normalisation: the nuclear norm over min(N, C) singular values (not over N).
    logits = fixed(5, 3, seed=11)
    p = torch.softmax(logits, 1).numpy()
    assert bnm_loss(logits).item() == pytest.approx(-np.linalg.norm(p, "nuc") / 3, rel=1e-5)
    wide = fixed(2, 4, seed=12)  # N < C: two singular values
    assert bnm_loss(wide).item() == pytest.approx(-np.linalg.norm(torch.softmax(wide, 1).numpy(), "nuc") / 2, rel=1e-5)
    # One-hot predictions on distinct classes: every singular value is 1.
    assert bnm_loss(50 * torch.eye(3)).item() == pytest.approx(-1.0, abs=1e-5)
    # Confident and diverse predictions have the larger nuclear norm (the lower loss).
    diverse, collapsed = 10 * torch.eye(3), 10 * torch.tensor([[1.0, 0, 0]] * 3)
    assert bnm_loss(diverse) < bnm_loss(collapsed)


def test_entropy_loss_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (1/2, 1/2) and (3/4, 1/4)
    h = [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert entropy_loss(logits).item() == pytest.approx(sum(h) / 2, abs=1e-6)


def test_mcc_matches_the_formula():
    logits, temperature = fixed(6, 3, seed=12) * 3, 2.5
    y = torch.softmax(logits / temperature, 1).numpy().astype(np.float64)
    h = -(y * np.log(y)).sum(1)
    w = 6 * (1 + np.exp(-h)) / (1 + np.exp(-h)).sum()
    c = np.zeros((3, 3))
    for i in range(6):
        c += w[i] * np.outer(y[i], y[i])
    c = c / c.sum(0, keepdims=True)
    expected = sum(c[j, k] for j in range(3) for k in range(3) if j != k) / 3
    assert mcc_loss(logits, temperature).item() == pytest.approx(expected, rel=1e-5)
    # Confident, unconfused predictions have almost no class confusion.
    assert mcc_loss(30 * torch.eye(3), 1.0).item() < 1e-6


def test_mdd_adversary_loss_matches_its_margin_formula():
    adv_s, adv_t = fixed(3, 4, seed=13), fixed(2, 4, seed=14)
    pred_s, pred_t = torch.tensor([0, 3, 1]), torch.tensor([2, 2])
    p_s, p_t = torch.softmax(adv_s, 1), torch.softmax(adv_t, 1)
    ce_s = -sum(math.log(p_s[i, pred_s[i]]) for i in range(3)) / 3
    disagree_t = -sum(math.log(1 - p_t[i, pred_t[i]]) for i in range(2)) / 2
    loss = mdd_adversary_loss(adv_s, adv_t, pred_s, pred_t, margin=4.0)
    assert loss.item() == pytest.approx(4.0 * ce_s + disagree_t, rel=1e-5)


def test_classifier_discrepancy_is_the_mean_absolute_probability_difference():
    a, b = fixed(4, 3, seed=15), fixed(4, 3, seed=16)
    expected = (torch.softmax(a, 1) - torch.softmax(b, 1)).abs().sum().item() / 12
    assert classifier_discrepancy(a, b).item() == pytest.approx(expected, rel=1e-6)


def test_afn_stepwise_and_hard_norm_terms():
    f = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)  # norms 5 and 1
    loss = afn_loss(f, delta_r=1.0)
    assert loss.item() == pytest.approx(1.0)  # (norm + delta_r - norm)^2, always delta_r^2
    (grad,) = torch.autograd.grad(loss, f)
    # d/df mean((n.detach() + dr - n)^2) = -2 dr / N * f / |f|: every norm is pushed up
    assert torch.allclose(grad, torch.tensor([[-0.6, -0.8], [0.0, -1.0]]))
    assert afn_loss(f, radius=3.0).item() == pytest.approx(((3 - 5) ** 2 + (3 - 1) ** 2) / 2)


# ---- the methods' updates -------------------------------------------------------------------------------

def toy_method(name, *overrides):
    torch.manual_seed(0)
    cfg = make_cfg(f"method={name}", "data=toy2d", "backbone=mlp", "backbone.hidden=[6]", "backbone.label_head=[5]",
                   "optim.momentum=0.0", *overrides)
    method = build_method(cfg, (2,), 3)
    for optimizer in method.optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = 0.05
    return method


def toy_batch():
    return Batch(x_s=fixed(6, 2, seed=20), y_s=torch.tensor([0, 1, 2, 0, 1, 2]), x_t=fixed(5, 2, seed=21) + 1.0)


def expected_sgd_update(before, loss_fn, reversed_prefix=None, lam=1.0, reversed_loss_fn=None, lr=0.05):
    """Parameters after one plain SGD step on loss_fn(module) (+ reversed_loss_fn, whose gradient the
    parameters under `reversed_prefix` receive times -lam), computed with autograd on a copy."""
    params = dict(before.named_parameters())
    grads = torch.autograd.grad(loss_fn(before), list(params.values()), allow_unused=True)
    total = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}
    if reversed_loss_fn is not None:
        grads = torch.autograd.grad(reversed_loss_fn(before), list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            if g is not None:
                total[n] = total[n] + (-lam * g if n.startswith(reversed_prefix) else g)
    return {n: p.detach() - lr * total[n] for n, p in params.items()}


def seeded(fn, seed=7):
    """fn, run after seeding the global generator: the same dropout masks in every call (the
    reference bottlenecks and heads have dropout; the method's own step is run under the same seed)."""
    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return run


def assert_parameters(method, expected):
    for name, value in method.named_parameters():
        assert torch.allclose(value, expected[name], atol=1e-6), name


@pytest.mark.parametrize("name, term, loss_of", [
    ("dan", "loss_mmd", lambda f_s, f_t, l_s, l_t: mk_mmd(f_s, f_t, [0.125, 0.25, 0.5, 1.0, 2.0])),
    ("jan", "loss_jmmd", lambda f_s, f_t, l_s, l_t: joint_mmd(
        [f_s, torch.softmax(l_s, 1)], [f_t, torch.softmax(l_t, 1)], [[0.125, 0.25, 0.5, 1.0, 2.0], 0.92])),
    ("deepcoral", "loss_coral", lambda f_s, f_t, l_s, l_t: coral_loss(f_s, f_t, 0.01)),  # mean_weight 0.01: deepcoral.yaml
    ("mcc", "loss_mcc", lambda f_s, f_t, l_s, l_t: mcc_loss(l_t, 2.5)),
    # AFN: one stepwise term per domain, summed (delta_r 1.0: configs/method/afn.yaml)
    ("afn", "loss_afn", lambda f_s, f_t, l_s, l_t: afn_loss(f_s, 1.0) + afn_loss(f_t, 1.0)),
    ("minent", "loss_entropy", lambda f_s, f_t, l_s, l_t: entropy_loss(l_t)),
    ("bnm", "loss_bnm", lambda f_s, f_t, l_s, l_t: bnm_loss(l_t)),
])
def test_loss_term_methods_descend_cross_entropy_plus_their_weighted_term(name, term, loss_of):
    method = toy_method(name)
    before, batch, lam = copy.deepcopy(method), toy_batch(), 0.6
    options = method.cfg.method  # the configured weight, times the grl value where the config ramps it
    weight_key = {"minent": "entropy_weight", "bnm": "bnm_weight"}.get(name, "trade_off")
    ramp = lam if options.ramp_trade_off else 1.0
    weight = float(options[weight_key]) * ramp
    # Target-prediction add-ons the method's config turns on besides its own term (MinEnt: the class
    # balance at the entropy's weight).
    add_ons = [(float(options.get(key, 0.0)) * ramp, fn) for key, fn in
               (("entropy_weight", entropy_loss), ("bnm_weight", bnm_loss), ("balance_weight", class_balance_loss))
               if key != weight_key]

    @seeded
    def loss_fn(m):
        if options.separate_forward:  # one pass per domain (AFN, as its reference implementations)
            f_s, f_t = m.features(batch.x_s), m.features(batch.x_t)
            f, logits = torch.cat([f_s, f_t]), torch.cat([m.classifier(f_s), m.classifier(f_t)])
        else:
            f = m.features(torch.cat([batch.x_s, batch.x_t]))
            logits = m.classifier(f)
        return (F.cross_entropy(logits[:6], batch.y_s) + weight * loss_of(f[:6], f[6:], logits[:6], logits[6:])
                + sum(w * fn(logits[6:]) for w, fn in add_ons))

    expected = expected_sgd_update(before, loss_fn)
    out = seeded(method.step)(batch, ctx(lam=lam))
    assert term in out  # logged as train/<term>
    assert out["loss"].item() == pytest.approx(loss_fn(before).item(), rel=1e-5)
    assert_parameters(method, expected)


@pytest.mark.parametrize("layer", ["logits", "features"])
def test_deepcoral_aligns_the_layer_it_is_given(layer):
    method, batch = toy_method("deepcoral", f"method.layer={layer}"), toy_batch()
    before = copy.deepcopy(method)
    with torch.no_grad():
        f = seeded(before.features)(torch.cat([batch.x_s, batch.x_t]))
        aligned = before.classifier(f) if layer == "logits" else f
    out = seeded(method.step)(batch, ctx())
    assert out["loss_coral"].item() == pytest.approx(coral_loss(aligned[:6], aligned[6:], 0.01).item(), rel=1e-5)


def test_deepcoral_rejects_an_unknown_layer():
    with pytest.raises(UserError, match="method.layer must be one of logits, features, got 'fc7'"):
        toy_method("deepcoral", "method.layer=fc7")


def test_ramp_trade_off_multiplies_the_weight_by_the_grl_value():
    for ramp, lam in itertools.product([False, True], [0.0, 0.4]):
        method = toy_method("dan", "method.trade_off=2.0", f"method.ramp_trade_off={ramp}")
        out = method.step(toy_batch(), ctx(lam=lam))
        weight = 2.0 * lam if ramp else 2.0
        assert out["loss"].item() == pytest.approx((out["loss_cls"] + weight * out["loss_mmd"]).item(), rel=1e-6)


def test_ramp_trade_off_also_warms_up_the_target_prediction_weights():
    for ramp, lam in itertools.product([False, True], [0.0, 0.4]):
        method = toy_method("minent", "method.entropy_weight=0.5", "method.bnm_weight=0.2",
                            "method.balance_weight=0.3", f"method.ramp_trade_off={ramp}")
        out = method.step(toy_batch(), ctx(lam=lam))
        assert {"loss_entropy", "loss_bnm", "loss_balance"} <= set(out)  # logged even while the ramp is at 0
        scale = lam if ramp else 1.0
        added = scale * (0.5 * out["loss_entropy"] + 0.2 * out["loss_bnm"] + 0.3 * out["loss_balance"])
        assert out["loss"].item() == pytest.approx((out["loss_cls"] + added).item(), rel=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_mdd_update_reverses_the_disparity_gradient_into_the_features(scale):
    method, lam = toy_method("mdd", f"method.reversal_scale={scale}"), 0.7
    before, batch = copy.deepcopy(method), toy_batch()

    @seeded  # the same dropout masks (MDD's bottleneck and heads) in each call and in the step
    def parts(m):
        f = m.features(torch.cat([batch.x_s, batch.x_t]))
        logits, logits_adv = m.classifier(f), m.adversary(f)
        predicted = logits.argmax(1)
        return logits, mdd_adversary_loss(logits_adv[:6], logits_adv[6:], predicted[:6], predicted[6:], 4.0)

    expected = expected_sgd_update(before, lambda m: F.cross_entropy(parts(m)[0][:6], batch.y_s), "features.",
                                   scale * lam, lambda m: parts(m)[1])
    out = seeded(method.step)(batch, ctx(lam=lam))
    assert out["loss_mdd"].item() == pytest.approx(parts(before)[1].item(), rel=1e-5)
    assert_parameters(method, expected)


@pytest.mark.parametrize("method_name", ["dann", "cdan", "mdd"])
def test_entropy_and_bnm_add_ons_on_adversarial_methods(method_name):
    plain = toy_method(method_name).step(toy_batch(), ctx())
    method = toy_method(method_name, "method.entropy_weight=0.3", "method.bnm_weight=0.2")
    out = method.step(toy_batch(), ctx())
    assert {"loss_entropy", "loss_bnm"} <= set(out) and "loss_entropy" not in plain
    # Same initial weights and batch: the loss grows by exactly the weighted add-ons.
    added = 0.3 * out["loss_entropy"] + 0.2 * out["loss_bnm"]
    assert out["loss"].item() == pytest.approx((plain["loss"] + added).item(), rel=1e-5)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    return {n.split(".")[0] for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def target_discrepancy(method, batch) -> float:
    """The classifiers' discrepancy on the target batch, in eval mode (no dropout draws)."""
    method.eval()
    with torch.no_grad():
        value = method.heads(batch, method.features(method.both(batch)))[2].item()
    method.train()
    return value


def test_mcd_three_updates_change_only_their_parameters():
    # Heads without dropout and BatchNorm: each update is then a plain gradient step on the function
    # that target_discrepancy evaluates.
    method, batch = toy_method("mcd", "backbone.label_head_dropout=0.0", "backbone.label_head_batch_norm=false"), toy_batch()
    before = snapshot(method)
    method.update_source(batch)
    assert changed(before, method) == {"features", "classifier", "classifier2"}

    before = snapshot(method)
    before_b = target_discrepancy(method, batch)
    method.update_classifiers(batch, 1.0)
    assert changed(before, method) == {"classifier", "classifier2"}
    after_b = target_discrepancy(method, batch)

    before = snapshot(method)
    method.update_features(batch, 1.0)
    assert changed(before, method) == {"features"}
    # B raised the target discrepancy that C then lowers.
    assert after_b > before_b
    assert target_discrepancy(method, batch) < after_b


def test_mcd_step_runs_num_k_feature_updates(monkeypatch):
    method = toy_method("mcd", "method.num_k=3")
    calls = []
    original = method.update_features
    monkeypatch.setattr(method, "update_features", lambda *a: calls.append(1) or original(*a))
    out = method.step(toy_batch(), ctx())
    assert len(calls) == 3 and {"loss_cls", "discrepancy_classifiers", "discrepancy"} <= set(out)


def test_mcd_reports_both_classifiers_and_their_ensemble(tmp_path):
    metrics = train(make_cfg("method=mcd", *TINY_TOY, "trainer.max_steps=4", "trainer.eval_every=2"), tmp_path)
    assert {"target_acc_c1", "target_acc_c2", "source_acc_c1", "source_acc_c2"} <= set(metrics)
    assert {"eval/target_acc_c1", "eval/target_acc_c2"} <= set(scalar_tags(tmp_path).Tags()["scalars"])

    method = toy_method("mcd").eval()  # as evaluation runs it: no dropout in the heads, BatchNorm's running statistics
    x = fixed(7, 2, seed=30)
    heads = method.predict_heads(x)
    mean_p = (torch.softmax(heads["c1"], 1) + torch.softmax(heads["c2"], 1)) / 2
    assert torch.allclose(method.predict(x).exp(), mean_p, atol=1e-6)


def test_target_labels_reach_only_the_oracle(tmp_path, monkeypatch, caplog):
    seen = []
    original = DANN.step
    monkeypatch.setattr(DANN, "step", lambda self, batch, ctx: seen.append(batch.y_t) or original(self, batch, ctx))
    train(make_cfg("method=dann", *TINY_TOY, "trainer.max_steps=3"), tmp_path / "dann")
    assert seen == [None] * 3
    assert read_metrics(tmp_path / "dann")["uses_target_labels"] is False

    with caplog.at_level(logging.WARNING):
        metrics = train(make_cfg("method=oracle", *TINY_TOY, "trainer.max_steps=3"), tmp_path / "oracle")
    assert metrics["uses_target_labels"] is True
    assert "TARGET LABELS" in caplog.text


def test_oracle_learns_from_target_labels_only():
    method = toy_method("oracle")
    batch = toy_batch()
    y_t = torch.tensor([2, 1, 0, 0, 1])
    before = copy.deepcopy(method)
    expected = expected_sgd_update(
        before, lambda m: F.cross_entropy(m.classifier(m.features(batch.x_t)), y_t))
    out = method.step(Batch(batch.x_s, batch.y_s, batch.x_t, y_t), ctx())
    assert "loss_cls_target" in out
    assert_parameters(method, expected)


@pytest.mark.parametrize("override", ["method.trade_off=-1", "method.entropy_weight=-0.5", "method.bnm_weight=abc",
                                      "method.reversal_scale=-0.1"])
def test_negative_or_non_numeric_weights_are_refused(tmp_path, override):
    name = override.split(".")[1].split("=")[0]
    method = {"bnm_weight": "bnm", "reversal_scale": "mdd"}.get(name, "dan")
    with pytest.raises(UserError, match=f"method.{name} must be a number >= 0"):
        train(make_cfg(f"method={method}", override, *TINY_TOY, "trainer.max_steps=2"), tmp_path)


def test_every_method_has_a_config_and_a_docs_section():
    from pathlib import Path

    configs = config_dir() / "method"
    docs = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert (configs / f"{name}.yaml").is_file(), name
        assert f"`{name}`" in docs, name
