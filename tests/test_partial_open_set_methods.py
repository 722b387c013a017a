"""PADA, IWAN and OSBP against hand computations, and their runs on partial and open-set pairs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_DIGITS, make_cfg
from da_runner.data.classes import LabelSpace
from da_runner.methods import Batch, StepContext, build_method
from da_runner.methods.iwan import importance_weights
from da_runner.methods.osbp import unknown_bce
from da_runner.nn.losses import domain_loss_and_acc
from da_runner.tasks import ClassificationTask, OpenSetTask
from da_runner.trainer import train

TOY = ["data=toy2d", "backbone=mlp", "backbone.hidden=[5]", "backbone.domain_head=[4]", "optim.momentum=0.0"]


def ctx(step=0, lam=0.5):
    return StepContext(step=step, max_steps=10, progress=step / 10, grl_lambda=lam, lr=0.1)


def toy_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(x_s=torch.randn(4, 2, generator=g), y_s=torch.tensor([0, 1, 1, 1]), x_t=torch.randn(3, 2, generator=g))


# --- PADA ---------------------------------------------------------------------------------------------

def test_pada_class_weights_follow_the_target_predictions_every_n_steps():
    method = build_method(make_cfg("method=pada", *TOY, "method.class_weight_update_every=2",
                                   "method.temperature=0.5"), (2,), 2)
    batch, f = toy_batch(), torch.zeros(7, 5)
    logits_a = torch.tensor([[9.0, 9.0]] * 4 + [[1.0, 0.0], [2.0, 0.0], [0.0, 0.5]])
    logits_b = torch.tensor([[0.0, 0.0]] * 4 + [[3.0, 0.0], [0.0, 0.0], [1.0, 0.0]])

    weights, _, _ = method.domain_weights(f, logits_a, batch, ctx(step=0))
    assert weights.tolist() == [1.0] * 7  # gamma starts at 1, and step 0 is not an update step
    method.domain_weights(f, logits_b, batch, ctx(step=1))  # the second step updates gamma

    target = torch.cat([logits_a[4:], logits_b[4:]])
    mean = F.softmax(target / 0.5, dim=1).mean(0)
    gamma = mean / mean.max()
    assert method.class_weight.tolist() == pytest.approx(gamma.tolist())
    assert gamma[1] < 1.0  # class 1 is predicted less often on the target

    weights, _, terms = method.domain_weights(f, logits_b, batch, ctx(step=2))
    w_s = gamma[batch.y_s]
    assert weights.tolist() == pytest.approx([*w_s.tolist(), *[w_s.mean().item()] * 3])
    assert terms["class_weight_min"].item() == pytest.approx(gamma.min().item())

    logits_s = torch.tensor([[1.0, -1.0], [0.5, 0.2], [-1.0, 2.0], [0.0, 0.0]])
    per_sample = F.cross_entropy(logits_s, batch.y_s, reduction="none")
    expected = (w_s * per_sample).sum() / w_s.sum()
    assert method.classification_loss(logits_s, batch.y_s).item() == pytest.approx(expected.item())


def test_pada_class_weights_are_in_the_checkpoint():
    cfg = make_cfg("method=pada", *TOY, "method.class_weight_update_every=1")
    method = build_method(cfg, (2,), 2)
    method.step(toy_batch(), ctx())
    assert not torch.equal(method.class_weight, torch.ones(2))
    restored = build_method(cfg, (2,), 2)
    restored.load_checkpoint_state(method.checkpoint_state())
    assert torch.equal(restored.class_weight, method.class_weight)
    assert torch.equal(restored.target_prediction_sum, method.target_prediction_sum)


# --- IWAN ---------------------------------------------------------------------------------------------

def test_iwan_importance_weights_by_hand():
    p = torch.tensor([0.9, 0.5, 0.1, 0.3])
    w = 1 - p
    assert importance_weights(p).tolist() == pytest.approx((w / w.mean()).tolist())


def test_iwan_weights_the_source_by_its_importance_discriminator_which_never_moves_the_features():
    torch.manual_seed(0)
    method = build_method(make_cfg("method=iwan", *TOY, "method.importance_weight=1.5"), (2,), 2)
    batch = toy_batch()
    f = torch.randn(7, 5, requires_grad=True)
    weights, loss_importance, terms = method.domain_weights(f, torch.zeros(7, 2), batch, ctx())

    d = method.importance_discriminator(f.detach())
    is_source = torch.tensor([1.0] * 4 + [0.0] * 3)
    expected_loss = domain_loss_and_acc(d, is_source)[0]
    assert loss_importance.item() == pytest.approx(1.5 * expected_loss.item())
    w = 1 - torch.sigmoid(d[:4, 0])
    assert weights.tolist() == pytest.approx([*(w / w.mean()).tolist(), 1.0, 1.0, 1.0])
    assert not weights.requires_grad
    loss_importance.backward()
    assert f.grad is None  # D learns on detached features
    assert method.importance_discriminator[0].weight.grad is not None
    assert {"loss_importance", "importance_acc", "source_weight_min", "source_weight_max"} <= set(terms)


def test_iwan_optimizer_holds_both_discriminators():
    method = build_method(make_cfg("method=iwan", *TOY), (2,), 2)
    optimized = {id(p) for group in method.optimizers["main"].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in method.parameters()}
    assert {id(p) for p in method.importance_discriminator.parameters()} <= optimized


# --- OSBP ---------------------------------------------------------------------------------------------

def test_osbp_unknown_bce_by_hand_and_finite_at_extreme_logits():
    logits = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, -1.0], [0.5, 0.5, 0.5]])
    p = F.softmax(logits, dim=1)[:, -1]
    t = 0.3
    expected = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert unknown_bce(logits, t).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.isfinite(unknown_bce(torch.tensor([[0.0, 0.0, 200.0], [300.0, 0.0, -300.0]]), 0.5))
    assert unknown_bce(torch.tensor([[0.0, 0.0]]), 0.5).item() == pytest.approx(-torch.tensor(0.5).log().item())


def test_osbp_step_trains_the_classifier_towards_t_and_the_features_away_from_it():
    """One SGD step against the gradients by hand: the classifier descends CE + L_adv, the feature
    extractor descends CE - lambda * L_adv (the gradient reversal layer)."""
    torch.manual_seed(0)
    cfg = make_cfg("method=osbp", *TOY, "method.unknown_target=0.4", "method.trade_off=2.0")
    method = build_method(cfg, (2,), 2)
    assert method.classifier[-1].out_features == 3  # 2 known classes + unknown
    before = copy.deepcopy(method)
    batch, lam, lr = toy_batch(), 0.7, 0.05
    for group in method.optimizers["main"].param_groups:
        group["lr"] = lr
    method.step(batch, ctx(lam=lam))

    f = before.features(torch.cat([batch.x_s, batch.x_t]))
    loss_cls = F.cross_entropy(before.classifier(f[:4]), batch.y_s)
    p = F.softmax(before.classifier(f[4:]), dim=1)[:, -1]
    loss_adv = -(0.4 * p.log() + 0.6 * (1 - p).log()).mean()
    classifier_params, feature_params = list(before.classifier.parameters()), list(before.features.parameters())
    g_cls = torch.autograd.grad(loss_cls, classifier_params + feature_params, retain_graph=True)
    g_adv = torch.autograd.grad(2.0 * loss_adv, classifier_params + feature_params)
    n = len(classifier_params)
    expected = [b - lr * (gc + ga) for b, gc, ga in zip(classifier_params, g_cls[:n], g_adv[:n])]
    expected += [b - lr * (gc - lam * ga) for b, gc, ga in zip(feature_params, g_cls[n:], g_adv[n:])]
    after = list(method.classifier.parameters()) + list(method.features.parameters())
    for new, want in zip(after, expected):
        assert torch.allclose(new, want, atol=1e-6)


def test_an_unknown_output_is_read_by_the_open_set_task_and_ignored_by_the_others():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.1, 3.0], [0.0, 2.0, -1.0]])  # K = 2, column 2 = unknown
    open_set = OpenSetTask(LabelSpace("open_set", ("a", "b"), (0, 1)), unknown_threshold=0.99)
    assert open_set.predict(logits).tolist() == [0, 2, 1]  # the argmax over K + 1; the threshold is unused
    assert open_set.predict(logits[:, :2]).tolist() == [2, 2, 2]  # K logits: the threshold decides
    partial = ClassificationTask(LabelSpace("partial", ("a", "b"), (0,)))
    assert partial.predict(logits).tolist() == [0, 1, 1]
    assert partial.known_logits(logits).shape == (3, 2)


# --- runs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["pada", "iwan", "dann"])
def test_partial_methods_run_on_a_partial_pair(tmp_path, method):
    cfg = make_cfg(*TINY_DIGITS, f"method={method}", "data.target_classes=[0,1,2,3,4]", "trainer.max_steps=4",
                   "trainer.eval_every=2", "method.class_weight_update_every=2" if method == "pada" else "seed=0")
    metrics = train(cfg, tmp_path)
    assert metrics["setting"] == "partial" and 0 <= metrics["target_mean_class_acc"] <= 1


def test_osbp_runs_on_an_open_set_pair_and_reports_its_unknown_predictions(tmp_path):
    cfg = make_cfg(*TINY_DIGITS, "method=osbp", "data.source_size=300", "data.source_classes=[0,1,2,3,4]",
                   "trainer.max_steps=6", "trainer.eval_every=3", "trainer.select=entropy", "trainer.log_every=1")
    metrics = train(cfg, tmp_path)
    assert metrics["setting"] == "open_set"
    for key in ("target_os", "target_os_star", "target_unk", "target_h_score", "entropy", "source_acc"):
        assert 0 <= metrics[key] <= (1 if key != "entropy" else 10), key
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    unknown_prob = [e.value for e in events.Scalars("train/target_unknown_prob")]
    assert len(unknown_prob) == 6 and all(0 < p < 1 for p in unknown_prob)
