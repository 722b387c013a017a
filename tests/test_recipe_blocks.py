"""The reference recipes' building blocks: step-based lr and GRL schedules (and what the trainer logs
of them), the bottleneck, L2-preserved dropout, head BatchNorm/dropout, per-group lr multipliers,
SGD options, method configs that carry their architecture, the class-balance term (MCD) and AFN's
per-domain sum."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from da_runner.config import validate
from da_runner.errors import UserError
from da_runner.methods import Batch, StepContext, build_method
from da_runner.methods.base import build_optimizer
from da_runner.nn.backbones import L2PreservedDropout, build_backbone, build_features
from da_runner.nn.heads import domain_head, label_head
from da_runner.nn.losses import afn_loss, class_balance_loss, classifier_discrepancy
from da_runner.schedules import grl_lambda, lr_factor
from da_runner.trainer import train
from test_methods_zoo import toy_batch, toy_method
from conftest import TINY_DIGITS, TINY_TOY, load_ckpt, make_cfg
from test_trainer import scalar_tags


def ctx(lam=1.0):
    return StepContext(step=0, max_steps=10, progress=0.0, grl_lambda=lam, lr=0.05)


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer_types(module):
    return [type(m) for m in module]


def logged(run_dir, tag):
    """(step, value) of every event of `tag` in the run's TensorBoard file."""
    return [(e.step, e.value) for e in scalar_tags(run_dir).Scalars(tag)]


# ---- schedules ------------------------------------------------------------------------------------------

def test_inv_lr_schedule_counts_steps_not_progress():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"schedule": "inv", "gamma": 0.001, "decay": 0.75})
    assert lr_factor(0, 100, cfg) == 1.0
    assert lr_factor(1000, 5000, cfg) == pytest.approx(2 ** -0.75)  # (1 + 0.001 * 1000) ** -0.75
    assert lr_factor(1000, 50000, cfg) == lr_factor(1000, 5000, cfg)  # a longer run continues the same curve
    steep = OmegaConf.create({"schedule": "inv", "gamma": 0.5, "decay": 2.0})
    assert lr_factor(6, 10, steep) == pytest.approx(1 / 16)  # (1 + 3) ** -2
    # the sgd config's defaults are Transfer-Learning-Library's: gamma 0.001, decay 0.75
    sgd = make_cfg("optim.schedule=inv").optim
    assert lr_factor(3000, 50000, sgd) == pytest.approx(4 ** -0.75)


def test_warm_start_grl_counts_steps_not_progress():
    cfg = make_cfg("grl=warm_start").grl  # hi 1, alpha 1, max_iters 1000
    assert grl_lambda(0, 50000, cfg) == 0.0
    for step, expected in ((1000, 0.4621), (3000, 0.9051), (5000, 0.9866)):
        assert grl_lambda(step, 50000, cfg) == pytest.approx(2 / (1 + math.exp(-step / 1000)) - 1)
        assert grl_lambda(step, 50000, cfg) == pytest.approx(expected, abs=1e-4)
        assert grl_lambda(step, 7000, cfg) == grl_lambda(step, 50000, cfg)
    other = make_cfg("grl=warm_start", "grl.hi=0.5", "grl.alpha=10", "grl.max_iters=200").grl
    assert grl_lambda(30, 100, other) == pytest.approx(0.5 * (2 / (1 + math.exp(-10 * 30 / 200)) - 1))


def test_linear_grl_ramp_steps_override_the_ramp_fraction():
    cfg = make_cfg("grl=linear", "grl.hi=2.0", "grl.ramp_steps=40").grl
    assert [grl_lambda(s, 1000, cfg) for s in (0, 10, 20, 40, 41, 999)] == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert grl_lambda(10, 50, cfg) == grl_lambda(10, 5000, cfg) == 0.5  # whatever the run length
    fraction = make_cfg("grl=linear", "grl.hi=2.0").grl  # ramp_steps null: half of the run
    assert grl_lambda(10, 1000, fraction) == pytest.approx(2.0 * 10 / 500)


def test_trainer_logs_the_step_based_lr_and_grl_values(tmp_path):
    # lr and lambda at the step that ended at each logged step (train/x at step k: schedule of step k - 1).
    cfg = make_cfg(*TINY_TOY, "trainer.max_steps=6", "trainer.log_every=1", "optim.lr=0.2", "optim.schedule=inv",
                   "optim.gamma=0.5", "optim.decay=0.75", "grl=warm_start", "grl.hi=0.8", "grl.alpha=2",
                   "grl.max_iters=3")
    train(cfg, tmp_path)
    lrs, lams = logged(tmp_path, "train/lr"), logged(tmp_path, "train/grl_lambda")
    assert [s for s, _ in lrs] == [s for s, _ in lams] == [1, 2, 3, 4, 5, 6]
    for k, value in lrs:
        assert value == pytest.approx(0.2 * (1 + 0.5 * (k - 1)) ** -0.75, rel=1e-6)
    for k, value in lams:
        assert value == pytest.approx(0.8 * (2 / (1 + math.exp(-2 * (k - 1) / 3)) - 1), rel=1e-6, abs=1e-7)


def test_trainer_logs_the_linear_ramp_in_steps(tmp_path):
    cfg = make_cfg(*TINY_TOY, "trainer.max_steps=8", "trainer.log_every=1", "grl=linear", "grl.ramp_steps=2")
    train(cfg, tmp_path)
    assert [v for _, v in logged(tmp_path, "train/grl_lambda")] == pytest.approx([0.0, 0.5, 1, 1, 1, 1, 1, 1])


# ---- bottleneck, dropout, heads -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_norm, dropout, l2, expected", [
    (True, 0.0, False, [nn.Linear, nn.BatchNorm1d, nn.ReLU]),
    (False, 0.0, False, [nn.Linear, nn.ReLU]),
    (True, 0.3, False, [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]),
    (False, 0.3, True, [nn.Linear, nn.ReLU, L2PreservedDropout]),
])
def test_bottleneck_layers_and_width(batch_norm, dropout, l2, expected):
    cfg = make_cfg("backbone=mlp", "backbone.hidden=[7]", "backbone.bottleneck.width=5",
                   f"backbone.bottleneck.batch_norm={batch_norm}", f"backbone.bottleneck.dropout={dropout}",
                   f"backbone.bottleneck.l2_dropout={l2}").backbone
    g = build_features(cfg, (2,))
    assert layer_types(g.bottleneck) == expected
    assert g.backbone.out_features == 7 and g.out_features == 5
    assert (g.bottleneck[0].in_features, g.bottleneck[0].out_features) == (7, 5)
    if dropout:
        assert g.bottleneck[-1].p == dropout
    assert g(torch.zeros(4, 2)).shape == (4, 5)


def test_bottleneck_computes_relu_of_batch_normalised_linear_features():
    torch.manual_seed(0)
    cfg = make_cfg("backbone=mlp", "backbone.hidden=[6]", "backbone.bottleneck.width=4").backbone
    g = build_features(cfg, (3,))
    x = fixed(8, 3, seed=1)
    h = g.backbone(x)
    z = g.bottleneck[0](h)
    expected = ((z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)).clamp_min(0)  # training mode: batch statistics
    assert torch.allclose(g(x), expected, atol=1e-5)


def test_no_bottleneck_by_default_and_a_bad_width_is_refused():
    g = build_features(make_cfg("backbone=mlp").backbone, (2,))
    assert isinstance(g.bottleneck, nn.Identity) and g.out_features == g.backbone.out_features == 64
    x = fixed(3, 2)
    assert torch.equal(g(x), g.backbone(x))
    with pytest.raises(UserError, match="bottleneck.width"):
        build_features(make_cfg("backbone=mlp", "backbone.bottleneck.width=0").backbone, (2,))


def test_heads_are_built_on_the_bottleneck_width():
    cfg = make_cfg("method=dann", *TINY_TOY, "backbone.bottleneck.width=12")
    method = build_method(cfg, (2,), 2)
    assert method.features.out_features == 12
    assert method.classifier[0].in_features == 12 and method.discriminator[0].in_features == 12
    f = method.features(fixed(5, 2))
    assert f.shape == (5, 12) and method.classifier(f).shape == (5, 2)


def test_l2_preserved_dropout_scales_kept_units_by_one_over_sqrt_keep():
    p, x = 0.36, fixed(200, 50).abs() + 0.1  # no zeros in the input: a zero in the output is a dropped unit
    layer = L2PreservedDropout(p)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    plain = nn.Dropout(p)(x)  # the same mask, scaled by 1 / (1 - p)
    kept = out != 0
    assert torch.equal(kept, plain != 0)
    assert torch.allclose(out[kept], x[kept] / math.sqrt(1 - p))  # 1 / 0.8, not 1 / 0.64
    assert 0.3 < 1 - kept.float().mean().item() < 0.42
    # the expected squared norm is kept: E[out^2] = (1 - p) * x^2 / (1 - p)
    assert (out ** 2).sum().item() == pytest.approx((x ** 2).sum().item(), rel=0.05)
    layer.eval()
    assert torch.equal(layer(x), x)


def test_head_batch_norm_and_dropout_layers():
    cfg = make_cfg("backbone=mlp", "backbone.label_head=[8,4]", "backbone.label_head_batch_norm=true",
                   "backbone.label_head_dropout=0.25", "backbone.domain_head=[6]",
                   "backbone.domain_head_dropout=0.1").backbone
    head = label_head(cfg, 10, 3)
    assert layer_types(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout,
                                 nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert [m.num_features for m in head if isinstance(m, nn.BatchNorm1d)] == [8, 4]
    assert {m.p for m in head if isinstance(m, nn.Dropout)} == {0.25}
    assert (head[0].in_features, head[-1].out_features) == (10, 3)
    disc = domain_head(cfg, 10, 1)
    assert layer_types(disc) == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear] and disc[2].p == 0.1
    plain = label_head(make_cfg("backbone=mlp", "backbone.label_head=[8]").backbone, 10, 3)
    assert layer_types(plain) == [nn.Linear, nn.ReLU, nn.Linear]


def test_dann_mnist_bn_adds_conv_batch_norm_and_dropout():
    cfg = make_cfg("backbone=dann_mnist_bn").backbone
    net = build_backbone(cfg, (3, 28, 28))
    convs = [m for m in net.net if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 50]
    assert [m.num_features for m in net.net if isinstance(m, nn.BatchNorm2d)] == [64, 50]
    assert [m.p for m in net.net if isinstance(m, nn.Dropout2d)] == [0.5]
    assert net.out_features == 50 * 4 * 4 and net(torch.zeros(2, 3, 28, 28)).shape == (2, 800)
    paper = build_backbone(make_cfg("backbone=dann_mnist").backbone, (3, 28, 28))
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout2d)) for m in paper.net) and paper.out_features == 768


# ---- optimizer: lr multipliers, SGD options --------------------------------------------------------------

LR_MULT = ["optim.lr_mult.backbone=0.1", "optim.lr_mult.bottleneck=0.5", "optim.lr_mult.heads=1.0"]


def test_lr_mult_puts_backbone_bottleneck_and_heads_in_their_groups():
    method = build_method(make_cfg("method=dann", *TINY_TOY, "backbone.bottleneck.width=8", *LR_MULT), (2,), 2)
    groups = {g["group"]: g for g in method.optimizers["main"].param_groups}
    assert {name: g["lr_mult"] for name, g in groups.items()} == {"backbone": 0.1, "bottleneck": 0.5, "heads": 1.0}

    def ids(params):
        return {id(p) for p in params}

    assert ids(groups["backbone"]["params"]) == ids(method.features.backbone.parameters())
    assert ids(groups["bottleneck"]["params"]) == ids(method.features.bottleneck.parameters())
    assert ids(groups["heads"]["params"]) == ids([*method.classifier.parameters(), *method.discriminator.parameters()])
    # no bottleneck: no empty group
    plain = build_method(make_cfg("method=dann", *TINY_TOY), (2,), 2)
    assert [g["group"] for g in plain.optimizers["main"].param_groups] == ["backbone", "heads"]


def test_trainer_sets_each_group_to_the_scheduled_lr_times_its_multiplier(tmp_path):
    cfg = make_cfg("method=dann", *TINY_TOY, "backbone.bottleneck.width=8", *LR_MULT, "trainer.max_steps=3",
                   "optim.lr=0.02", "optim.schedule=inv", "optim.gamma=0.5", "optim.decay=0.75")
    train(cfg, tmp_path)
    groups = load_ckpt(tmp_path / "checkpoints" / "last.pt")["method"]["optimizers"]["main"]["param_groups"]
    scheduled = 0.02 * (1 + 0.5 * 2) ** -0.75  # the lr of the last step (step 2)
    assert {g["group"]: g["lr"] for g in groups} == pytest.approx(
        {"backbone": 0.1 * scheduled, "bottleneck": 0.5 * scheduled, "heads": scheduled})


def test_lr_mult_moves_each_group_by_its_share_of_the_step():
    # Plain SGD: every parameter moves by -lr * mult * grad; the same batch without multipliers moves by -lr * grad.
    common = ["method=source_only", *TINY_TOY, "backbone.bottleneck.width=4", "backbone.bottleneck.batch_norm=false",
              "optim.momentum=0.0"]
    torch.manual_seed(0)
    slow = build_method(make_cfg(*common, *LR_MULT), (2,), 2)
    torch.manual_seed(0)
    full = build_method(make_cfg(*common), (2,), 2)
    before = copy.deepcopy(full)
    batch = Batch(fixed(6, 2), torch.tensor([0, 1, 0, 1, 1, 0]), fixed(6, 2, seed=1))
    for method in (slow, full):
        for group in method.optimizers["main"].param_groups:
            group["lr"] = 0.1 * group["lr_mult"]  # what the trainer does with a scheduled lr of 0.1
        method.step(batch, StepContext(step=0, max_steps=1, progress=0.0, grl_lambda=0.0, lr=0.1))
    mult = {"features.backbone": 0.1, "features.bottleneck": 0.5, "classifier": 1.0}
    old = dict(before.named_parameters())
    for (name, p_slow), (_, p_full) in zip(slow.named_parameters(), full.named_parameters()):
        m = next(v for k, v in mult.items() if name.startswith(k))
        assert torch.allclose(p_slow - old[name], m * (p_full - old[name]), atol=1e-7), name
        assert not torch.equal(p_full, old[name]), name


def test_sgd_nesterov_and_weight_decay_reach_the_optimizer():
    cfg = make_cfg("method=dann", *TINY_TOY, "optim.nesterov=true", "optim.weight_decay=0.001", "optim.momentum=0.8")
    method = build_method(cfg, (2,), 2)
    for group in method.optimizers["main"].param_groups:
        assert (group["nesterov"], group["weight_decay"], group["momentum"]) == (True, 0.001, 0.8)

    # Two steps on f(w) = w^2 / 2 (gradient w), by hand: g = w + wd * w, buf = m * buf + g, w -= lr * (g + m * buf).
    w = torch.nn.Parameter(torch.tensor([2.0]))
    optimizer = build_optimizer([{"params": [w]}], cfg.optim)
    lr, m, wd, value, buf = 0.01, 0.8, 0.001, 2.0, 0.0
    for _ in range(2):
        optimizer.zero_grad()
        (w ** 2 / 2).sum().backward()
        optimizer.step()
        g = value + wd * value
        buf = m * buf + g if buf else g
        value -= lr * (g + m * buf)
    assert w.item() == pytest.approx(value, rel=1e-6)


def test_group_momentum_replaces_momentum_for_the_groups_it_names():
    # AFN's reference optimiser: plain SGD on the backbone, momentum 0.9 on the bottleneck and the heads.
    cfg = make_cfg("method=source_only", *TINY_TOY, "backbone.bottleneck.width=4", "optim.momentum=0.9",
                   "optim.group_momentum.backbone=0.0")
    groups = {g["group"]: g["momentum"] for g in build_method(cfg, (2,), 2).optimizers["main"].param_groups}
    assert groups == {"backbone": 0.0, "bottleneck": 0.9, "heads": 0.9}


def test_mcd_feature_optimizer_uses_feature_momentum():
    method = build_method(make_cfg("method=mcd", *TINY_TOY, "optim.momentum=0.9"), (2,), 2)
    assert {g["momentum"] for g in method.optimizers["features"].param_groups} == {0.0}
    assert {g["momentum"] for g in method.optimizers["classifiers"].param_groups} == {0.9}
    method = build_method(make_cfg("method=mcd", *TINY_TOY, "method.feature_momentum=0.5"), (2,), 2)
    assert {g["momentum"] for g in method.optimizers["features"].param_groups} == {0.5}


# ---- method configs carry their reference architecture ---------------------------------------------------

def test_cdan_config_sets_a_wide_batch_norm_discriminator_on_the_full_map():
    cfg = make_cfg("method=cdan", *TINY_DIGITS)
    assert list(cfg.backbone.domain_head) == [1024, 1024] and cfg.backbone.domain_head_batch_norm
    method = build_method(cfg, (3, 28, 28), 10)
    assert method.random_map is None
    assert layer_types(method.discriminator) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d,
                                                 nn.ReLU, nn.Linear]
    # the full map of the 256-d BatchNorm bottleneck the method file adds to the 768-d network
    assert method.features.out_features == 256 and method.features.backbone.out_features == 768
    assert method.discriminator[0].in_features == 256 * 10 and method.discriminator[0].out_features == 1024
    # DANN on the same backbone keeps the paper's 100-1 head
    dann = build_method(make_cfg("method=dann", *TINY_DIGITS), (3, 28, 28), 10)
    assert layer_types(dann.discriminator) == [nn.Linear, nn.ReLU, nn.Linear] and dann.discriminator[0].out_features == 100


def test_method_architecture_wins_over_the_backbone_file_and_the_command_line_over_both():
    cfg = make_cfg("method=cdan", "backbone=mlp")  # mlp.yaml says [64]; the method file comes later
    assert list(cfg.backbone.domain_head) == [1024, 1024]
    cfg = make_cfg("method=cdan", *TINY_TOY, "backbone.domain_head=[64]")
    assert list(cfg.backbone.domain_head) == [64]
    method = build_method(cfg, (2,), 2)
    linears = [m for m in method.discriminator if isinstance(m, nn.Linear)]
    # the full map of the method file's 256-d bottleneck and 2 classes, into the command line's [64]
    assert [(l.in_features, l.out_features) for l in linears] == [(256 * 2, 64), (64, 1)]


def test_mdd_config_builds_a_1024_bottleneck_and_heads_on_it():
    method = build_method(make_cfg("method=mdd", *TINY_DIGITS), (3, 28, 28), 10)
    assert method.features.out_features == 1024
    assert layer_types(method.features.bottleneck) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert method.features.bottleneck[0].in_features == 768
    for head in (method.classifier, method.adversary):
        assert layer_types(head) == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
        assert (head[0].in_features, head[0].out_features, head[-1].out_features) == (1024, 1024, 10)


def test_afn_config_uses_l2_preserved_dropout_on_its_bottleneck():
    method = build_method(make_cfg("method=afn", *TINY_TOY), (2,), 2)
    assert layer_types(method.features.bottleneck) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, L2PreservedDropout]
    assert method.features.out_features == 1000 and method.classifier[0].in_features == 1000



def test_bnm_config_runs_the_domains_apart_on_a_batch_norm_bottleneck():
    # As the authors' code runs BNM (source and target in separate passes through a BatchNorm network):
    # on the DANN paper's network, which has no BatchNorm, the bottleneck supplies it (docs/benchmarks.md).
    cfg = make_cfg("method=bnm", *TINY_TOY)
    assert cfg.method.separate_forward is True
    method = build_method(cfg, (2,), 2)
    assert layer_types(method.features.bottleneck) == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert method.features.out_features == 256

# ---- class balance (MCD) and AFN's per-domain sum -----------------------------------------------------------

def test_class_balance_loss_matches_a_hand_computation():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0], [0.0, 0.0, math.log(5.0)]])
    # p = (1/3, 1/3, 1/3), (1/2, 1/4, 1/4), (1/7, 1/7, 5/7); mean over samples, then -mean_k log
    p = [[1 / 3, 1 / 3, 1 / 3], [1 / 2, 1 / 4, 1 / 4], [1 / 7, 1 / 7, 5 / 7]]
    mean = [sum(row[k] for row in p) / 3 for k in range(3)]
    expected = -sum(math.log(m + 1e-6) for m in mean) / 3
    assert class_balance_loss(logits).item() == pytest.approx(expected, rel=1e-6)
    # smallest (log C) when the batch's predictions spread evenly, larger when they collapse onto one class
    assert class_balance_loss(20 * torch.eye(4)).item() == pytest.approx(math.log(4), abs=1e-4)
    assert class_balance_loss(20 * torch.tensor([[1.0, 0, 0, 0]] * 4)).item() > 5.0


def mcd_toy(balance):
    return toy_method("mcd", f"method.balance_weight={balance}")


mcd_batch = toy_batch


def sgd_expected(module, loss, prefixes, lr=0.05):
    """Parameters of `module` after one plain SGD step on `loss` of the parameters under `prefixes`."""
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: p.detach() - lr * g if (g is not None and n.startswith(prefixes)) else p.detach().clone()
            for (n, p), g in zip(params.items(), grads)}


def assert_close(method, expected):
    for name, value in method.named_parameters():
        assert torch.allclose(value, expected[name], atol=1e-6), name


def test_mcd_updates_a_and_b_add_the_weighted_class_balance_of_both_classifiers():
    bw, batch = 0.5, mcd_batch()
    method = mcd_toy(bw)
    before = copy.deepcopy(method)
    c1, c2, g = before.classifier, before.classifier2, before.features

    # A: features and both classifiers descend CE_1 + CE_2 (source) + bw * (balance_1 + balance_2) (target),
    # each classifier run once over both domains' features (one BatchNorm batch, as the reference does).
    torch.manual_seed(5)
    f = g(torch.cat([batch.x_s, batch.x_t]))
    y1, y2 = c1(f), c2(f)
    loss_a = (F.cross_entropy(y1[:6], batch.y_s) + F.cross_entropy(y2[:6], batch.y_s)
              + bw * (class_balance_loss(y1[6:]) + class_balance_loss(y2[6:])))
    expected = sgd_expected(before, loss_a, ("features", "classifier"))
    torch.manual_seed(5)  # the same dropout masks in the heads
    method.update_source(batch)
    assert_close(method, expected)

    # B: only the classifiers, on fixed features: source CE + balance - discrepancy.
    with torch.no_grad():
        before.load_state_dict(method.state_dict())
    torch.manual_seed(6)
    with torch.no_grad():
        f = g(torch.cat([batch.x_s, batch.x_t]))
    y1, y2 = c1(f), c2(f)
    discrepancy = classifier_discrepancy(y1[6:], y2[6:])
    loss_b = (F.cross_entropy(y1[:6], batch.y_s) + F.cross_entropy(y2[:6], batch.y_s)
              + bw * (class_balance_loss(y1[6:]) + class_balance_loss(y2[6:])) - 0.7 * discrepancy)
    expected = sgd_expected(before, loss_b, ("classifier",))
    torch.manual_seed(6)
    method.update_classifiers(batch, 0.7)
    assert_close(method, expected)


@pytest.mark.parametrize("update", ["update_source", "update_classifiers"])
def test_mcd_balance_weight_changes_the_classifier_updates(update):
    batch, results = mcd_batch(), {}
    for bw in (0.0, 0.5):
        method = mcd_toy(bw)
        torch.manual_seed(5)
        getattr(method, update)(batch, *([1.0] if update == "update_classifiers" else []))
        results[bw] = dict(method.named_parameters())
    assert not torch.allclose(results[0.0]["classifier.0.weight"], results[0.5]["classifier.0.weight"])
    assert not torch.allclose(results[0.0]["classifier2.0.weight"], results[0.5]["classifier2.0.weight"])


def test_afn_sums_the_norm_terms_of_each_domain():
    f_s = torch.tensor([[3.0, 4.0], [0.0, 1.0]], requires_grad=True)  # norms 5, 1
    f_t = torch.tensor([[0.0, 3.0]], requires_grad=True)  # norm 3
    logits_s, logits_t = torch.zeros(2, 2), torch.zeros(1, 2)
    hard = build_method(make_cfg("method=afn", *TINY_TOY, "method.radius=3"), (2,), 2)
    loss, _ = hard.adaptation_term(f_s, f_t, logits_s, logits_t)
    assert loss.item() == pytest.approx(((3 - 5) ** 2 + (3 - 1) ** 2) / 2 + 0.0)  # 4 (the mean over all three: 8/3)
    assert loss.item() == pytest.approx((afn_loss(f_s, radius=3.0) + afn_loss(f_t, radius=3.0)).item())

    stepwise = build_method(make_cfg("method=afn", *TINY_TOY, "method.delta_r=0.2"), (2,), 2)
    loss, logs = stepwise.adaptation_term(f_s, f_t, logits_s, logits_t)
    assert loss.item() == pytest.approx(2 * 0.2 ** 2)  # delta_r^2 per domain
    grad_s, grad_t = torch.autograd.grad(loss, [f_s, f_t])
    # each domain's mean: -2 delta_r / N_domain * f / |f|
    assert torch.allclose(grad_s, -2 * 0.2 / 2 * torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    assert torch.allclose(grad_t, -2 * 0.2 / 1 * torch.tensor([[0.0, 1.0]]))
    assert logs["feature_norm_s"].item() == pytest.approx(3.0) and logs["feature_norm_t"].item() == pytest.approx(3.0)


BATCH_NORM_EVERYWHERE = ("backbone.bottleneck.width=4", "backbone.bottleneck.batch_norm=true",
                         "backbone.label_head_batch_norm=true", "backbone.domain_head_batch_norm=true")


@pytest.mark.parametrize("name, heads", [("dann", ["discriminator"]), ("cdan", ["discriminator"]), ("mdd", ["adversary"]),
                                         ("afn", [])])
def test_separate_forward_runs_every_network_once_per_domain(name, heads):
    method = toy_method(name, "method.separate_forward=true", *BATCH_NORM_EVERYWHERE)
    calls = []
    for tag in ["features", "classifier", *heads]:
        getattr(method, tag).register_forward_hook(lambda module, inputs, output, tag=tag: calls.append((tag, len(inputs[0]))))
    method.step(toy_batch(), ctx())
    n_s, n_t = len(toy_batch().x_s), len(toy_batch().x_t)
    assert sorted(calls) == sorted((tag, n) for tag in ["features", "classifier", *heads] for n in (n_s, n_t))


def test_separate_forward_normalises_each_domain_with_its_own_batch_statistics():
    batch = toy_batch()
    joint = toy_method("dann", *BATCH_NORM_EVERYWHERE)
    separate = toy_method("dann", "method.separate_forward=true", *BATCH_NORM_EVERYWHERE)
    separate.load_state_dict(joint.state_dict())
    _, _, logits, _ = separate.forward_both(batch)
    alone = [separate.classifier(separate.features(x)) for x in (batch.x_s, batch.x_t)]
    assert torch.allclose(logits, torch.cat(alone), atol=1e-6)
    _, _, joint_logits, _ = joint.forward_both(batch)
    assert not torch.allclose(joint_logits, logits, atol=1e-3)  # the shared batch mixes the domains' statistics


def test_domain_weight_scales_the_domain_loss():
    out = toy_method("dann", "method.domain_weight=2").step(toy_batch(), ctx())
    assert out["loss"].item() == pytest.approx((out["loss_cls"] + 2 * out["loss_domain"]).item(), rel=1e-6)
    with pytest.raises(UserError, match="method.domain_weight must be >= 0"):
        toy_method("dann", "method.domain_weight=-1")


@pytest.mark.parametrize("overrides, message", [
    (["grl=warm_start", "grl.max_iters=0"], "grl.max_iters must be a number > 0, got 0"),
    (["grl=linear", "grl.ramp_steps=-5"], "grl.ramp_steps must be null or a positive integer, got -5"),
    (["optim.gamma=-0.1"], "optim.gamma must be a number >= 0, got -0.1"),
    (["optim.decay=abc"], "optim.decay must be a number >= 0, got 'abc'"),
    (["optim.lr_mult.backbone=-1"], "optim.lr_mult must be a mapping {backbone, bottleneck, heads: a number >= 0}, got {'backbone': -1, 'bottleneck': 1.0, 'heads': 1.0}"),
    (["optim.group_momentum.heads=-0.5"], "optim.group_momentum must be a mapping {backbone, bottleneck, heads: null or a number >= 0}, got {'backbone': None, 'bottleneck': None, 'heads': -0.5}"),
    (["backbone.bottleneck.width=0"], "backbone.bottleneck.width must be null (no bottleneck) or a positive integer, got 0"),
    (["backbone.bottleneck.dropout=1.0"], "backbone.bottleneck.dropout must be a number in [0, 1), got 1.0"),
    (["backbone.domain_head_dropout=-0.5"], "backbone.domain_head_dropout must be a number in [0, 1), got -0.5"),
    (["method=mcd", "method.feature_momentum=-1"], "method.feature_momentum must be null (optim.momentum) or a number >= 0, got -1"),
])
def test_recipe_keys_are_checked_with_a_message_naming_the_key(overrides, message):
    with pytest.raises(UserError) as error:
        validate(make_cfg(*overrides))
    assert str(error.value) == message


def test_batch_statistics_losses_run_in_float32_under_autocast():
    """Covariances, kernels and singular values are computed in float32 even inside a float16 autocast
    region (their sums overflow float16), and their gradients reach the float16 activations."""
    from da_runner.nn.losses import bnm_loss, coral_loss, mk_mmd

    f_s = (fixed(16, 8, seed=1) * 100).requires_grad_()
    f_t = (fixed(16, 8, seed=2) * 100).requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        h_s, h_t = f_s.half(), f_t.half()  # activations as a float16 forward pass leaves them
        values = [coral_loss(h_s, h_t), mk_mmd(h_s, h_t), bnm_loss(h_s)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in values)
    assert torch.allclose(values[0], coral_loss(f_s, f_t), rtol=1e-2)  # in float16 the covariances overflow
    sum(values).backward()
    assert torch.isfinite(f_s.grad).all() and torch.isfinite(f_t.grad).all()


def test_coral_mean_term_adds_the_mean_squared_difference_of_the_feature_means():
    from da_runner.nn.losses import coral_loss

    f_s, f_t = fixed(32, 4, seed=1), fixed(32, 4, seed=2) + 3.0  # the target shifted by 3 in every dimension
    covariance = coral_loss(f_s, f_t)
    mean_gap = (f_s.mean(0) - f_t.mean(0)).pow(2).mean()
    assert mean_gap > 8  # about 3 ** 2
    assert torch.allclose(coral_loss(f_s, f_t, mean_weight=0.25), covariance + 0.25 * mean_gap)
    # a pure shift leaves the covariances, so the paper's loss does not see it
    assert torch.allclose(coral_loss(f_s, f_s + 3.0), torch.zeros(()), atol=1e-6)
    method = build_method(make_cfg("method=deepcoral", *TINY_TOY, "method.mean_weight=0.5"), (2,), 2)
    f_s2, f_t2 = fixed(8, 5, seed=3), fixed(8, 5, seed=4) + 1.0
    logits = fixed(8, 2)
    term, _ = method.adaptation_term(f_s2, f_t2, logits, logits)
    assert torch.allclose(term, coral_loss(f_s2, f_t2, 0.5))
