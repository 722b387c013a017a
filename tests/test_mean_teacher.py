"""Mean teacher (self-ensembling): its losses against hand computations, the teacher's moving average,
that no gradient reaches the teacher, that evaluation uses it, the second target view the trainer hands
it, exact resume and the config checks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from da_runner.errors import UserError
from da_runner.methods import METHODS, Batch, StepContext, build_method
from da_runner.nn.losses import class_balance_bce, consistency_loss
from da_runner.trainer import train
from conftest import TINY_DIGITS, TINY_TOY, crash_and_resume, load_ckpt, make_cfg
from test_trainer import scalar_tags


def test_consistency_loss_and_mask_against_a_hand_computation():
    # sample 0: teacher confident (0.98 >= 0.968), kept; sample 1: teacher unsure (0.5), masked out
    logits_teacher = torch.log(torch.tensor([[0.98, 0.01, 0.01], [0.5, 0.3, 0.2]]))
    logits_student = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])).requires_grad_()
    loss, mask = consistency_loss(logits_student, logits_teacher, threshold=0.968)
    assert mask.tolist() == [1.0, 0.0]
    # sample 0: ((0.7 - 0.98)^2 + (0.2 - 0.01)^2 + (0.1 - 0.01)^2) / 3; sample 1 counts 0; the mean is over both
    by_hand = ((0.7 - 0.98) ** 2 + (0.2 - 0.01) ** 2 + (0.1 - 0.01) ** 2) / 3 / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    loss.backward()
    assert logits_student.grad[1].abs().sum() == 0  # no gradient from the masked sample
    assert logits_student.grad[0].abs().sum() > 0


def test_the_teachers_side_of_the_consistency_gets_no_gradient():
    logits_teacher = torch.tensor([[4.0, 0.0]], requires_grad=True)
    loss, _ = consistency_loss(torch.tensor([[0.0, 1.0]], requires_grad=True), logits_teacher, threshold=0.5)
    loss.backward()
    assert logits_teacher.grad is None


def test_class_balance_against_a_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    mean = [0.6, 0.25, 0.15]  # per class over the batch; the uniform share is 1/3
    by_hand = -sum(torch.log(torch.tensor(a + 1e-6)) / 3 + torch.log(torch.tensor(1 - a + 1e-6)) * 2 / 3 for a in mean)
    assert class_balance_bce(torch.log(probs)).item() == pytest.approx(by_hand.item(), rel=1e-5)
    balanced = torch.log(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).clamp_min(1e-9))
    assert class_balance_bce(balanced) < class_balance_bce(torch.log(probs))  # even spread: smaller


def toy_method(*overrides):
    torch.manual_seed(0)
    return build_method(make_cfg("method=mean_teacher", *TINY_TOY, *overrides), (2,), 2)


def toy_batch():
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, 2, generator=g)
    return Batch(x_s=torch.randn(5, 2, generator=g), y_s=torch.tensor([0, 1, 1, 0, 1]), x_t=x_t,
                 x_t_views=(x_t + 0.1 * torch.randn(6, 2, generator=g),))


def ctx(step=0):
    return StepContext(step=step, max_steps=10, progress=step / 10, grl_lambda=0.5, lr=1e-3)


def perturb_teacher(method, scale=0.5):
    """Move the teacher away from the student, so that the tests below tell the two apart."""
    with torch.no_grad():
        for p in (*method.teacher_features.parameters(), *method.teacher_classifier.parameters()):
            p.add_(scale * torch.randn_like(p))


def test_step_loss_against_a_hand_computation():
    method = toy_method("method.confidence_threshold=0.6", "method.class_balance_weight=0.5")
    perturb_teacher(method, 0.1)  # teacher probabilities 0.52 - 0.68 on this batch
    before, batch = copy.deepcopy(method), toy_batch()
    out = method.step(batch, ctx())

    logits_s = before.classifier(before.features(batch.x_s))
    logits_t = before.classifier(before.features(batch.x_t))
    q = F.softmax(before.teacher_classifier(before.teacher_features(batch.x_t_views[0])), dim=1)
    p = F.softmax(logits_t, dim=1)
    mask = (q.max(1).values >= 0.6).float()
    assert 0 < mask.mean() < 1  # the threshold splits this batch: the mask is tested on both sides
    loss_cls = F.cross_entropy(logits_s, batch.y_s)
    loss_con = (((p - q) ** 2).mean(1) * mask).mean()
    a = p.mean(0)
    loss_bal = -(0.5 * torch.log(a + 1e-6) + 0.5 * torch.log(1 - a + 1e-6)).sum()
    expected = loss_cls + 3.0 * (loss_con + 0.5 * mask.mean() * loss_bal)
    assert out["loss_cls"].item() == pytest.approx(loss_cls.item(), rel=1e-5)
    assert out["loss_consistency"].item() == pytest.approx(loss_con.item(), rel=1e-5)
    assert out["loss_class_balance"].item() == pytest.approx(loss_bal.item(), rel=1e-5)
    assert out["consistency_mask"].item() == pytest.approx(mask.mean().item())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.99, 0.5])
def test_the_teacher_is_the_moving_average_of_the_student_after_each_step(alpha):
    method = toy_method(f"method.teacher_alpha={alpha}")
    perturb_teacher(method)
    teacher_before = {n: p.detach().clone() for n, p in method.named_parameters() if n.startswith("teacher_")}
    method.step(toy_batch(), ctx())
    params = dict(method.named_parameters())
    for name, before in teacher_before.items():
        student = params[name.removeprefix("teacher_")]  # teacher_features.x <-> features.x
        assert torch.allclose(params[name], alpha * before + (1 - alpha) * student, atol=1e-6), name
        assert not torch.equal(params[name], before), name  # it moved


def test_no_gradient_and_no_optimizer_reach_the_teacher():
    method = toy_method()
    method.step(toy_batch(), ctx())
    teacher = [*method.teacher_features.parameters(), *method.teacher_classifier.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert all(p.grad is not None for p in (*method.features.parameters(), *method.classifier.parameters()))
    optimized = {id(p) for group in method.optimizers["main"].param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher)


def test_evaluation_uses_the_teacher_and_reports_the_student_beside_it():
    method = toy_method()
    perturb_teacher(method)
    method.eval()
    x = torch.randn(7, 2)
    f, logits = method.embed(x)
    with torch.no_grad():
        assert torch.equal(f, method.teacher_features(x))
        assert torch.equal(logits, method.teacher_classifier(method.teacher_features(x)))
        student = method.classifier(method.features(x))
    assert not torch.allclose(logits, student)
    assert torch.equal(method.predict_heads(x)["student"], student)


def capture_batches(monkeypatch):
    seen, original = [], METHODS["mean_teacher"].step

    def step(self, batch, ctx):
        seen.append(batch)
        return original(self, batch, ctx)

    monkeypatch.setattr(METHODS["mean_teacher"], "step", step)
    return seen


@pytest.mark.parametrize("augment", ["weak", "none"])
def test_the_trainer_hands_a_second_view_of_the_same_target_images(tmp_path, monkeypatch, augment):
    seen = capture_batches(monkeypatch)
    train(make_cfg(*TINY_DIGITS, "method=mean_teacher", f"data.augment={augment}", "trainer.max_steps=3"), tmp_path)
    assert len(seen) == 3 and all(len(b.x_t_views) == 1 and b.x_t_views[0].shape == b.x_t.shape for b in seen)
    if augment == "none":  # the same images: unaugmented, the two views are equal
        assert all(torch.equal(b.x_t_views[0], b.x_t) for b in seen)
    else:  # each view draws its own translation
        assert all(not torch.equal(b.x_t_views[0], b.x_t) for b in seen)


def test_a_short_run_trains_logs_its_terms_and_keeps_the_teacher_in_its_checkpoint(tmp_path):
    metrics = train(make_cfg(*TINY_DIGITS, "method=mean_teacher", "method.confidence_threshold=0.01",
                             "trainer.max_steps=4", "trainer.log_every=1"), tmp_path)
    events = scalar_tags(tmp_path)
    assert [e.value for e in events.Scalars("train/consistency_mask")] == [1.0] * 4  # threshold 0.01: all kept
    assert all(e.value > 0 for e in events.Scalars("train/loss_consistency"))
    assert all(e.value > 0 for e in events.Scalars("train/loss_class_balance"))
    assert "target_acc_student" in metrics
    modules = load_ckpt(tmp_path / "checkpoints" / "last.pt")["method"]["modules"]
    teacher = [k for k in modules if k.startswith("teacher_")]
    assert teacher and all(k.removeprefix("teacher_") in modules for k in teacher)
    # 4 steps in, the average lags the student: the checkpoint holds a teacher of its own
    assert any(not torch.equal(modules[k], modules[k.removeprefix("teacher_")]) for k in teacher)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    args = [*TINY_DIGITS, "method=mean_teacher", "method.confidence_threshold=0.01", "trainer.max_steps=10",
            "trainer.eval_every=3", "trainer.ckpt_every=4"]
    reference = train(make_cfg(*args), tmp_path / "ref")
    resumed = crash_and_resume(monkeypatch, "mean_teacher", 6, args, tmp_path / "run")
    for key in ("target_acc", "target_acc_student", "source_acc", "selected_target_acc", "step"):
        assert resumed[key] == reference[key], key
    ref = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")["method"]["modules"]
    new = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")["method"]["modules"]
    assert any(k.startswith("teacher_") for k in ref)
    assert all(torch.equal(v, new[k]) for k, v in ref.items())


def test_mean_teacher_refuses_feature_data(tmp_path):
    with pytest.raises(UserError, match="augmented views .* need images"):
        train(make_cfg(*TINY_TOY, "method=mean_teacher", "data.augment=none", "trainer.max_steps=2"), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("method.confidence_threshold=1.5", r"method.confidence_threshold must be a probability in \(0, 1\], got 1.5"),
    ("method.confidence_threshold=0", r"method.confidence_threshold must be a probability in \(0, 1\], got 0"),
    ("method.teacher_alpha=1.0", r"method.teacher_alpha must be a number in \[0, 1\) .*got 1.0"),
    ("method.teacher_alpha=-0.1", r"method.teacher_alpha must be a number in \[0, 1\) .*got -0.1"),
    ("method.consistency_weight=-1", r"method.consistency_weight must be a number >= 0, got -1"),
])
def test_bad_options_are_refused(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(make_cfg(*TINY_DIGITS, "method=mean_teacher", override, "trainer.max_steps=2"), tmp_path)
