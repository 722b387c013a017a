import copy

import pytest
import torch

from da_runner.methods import Batch, StepContext, build_method
from da_runner.data import BatchStream, build_pair
from da_runner.trainer import target_pass
from conftest import TINY_DIGITS, TINY_TOY, classification_methods, make_cfg


def ctx(lam=0.5, lr=0.1, step=0):
    return StepContext(step=step, max_steps=10, progress=step / 10, grl_lambda=lam, lr=lr)


def set_lr(method, lr):
    for opt in method.optimizers.values():
        for group in opt.param_groups:
            group["lr"] = lr


def fixed_batch():
    g = torch.Generator().manual_seed(0)
    return Batch(x_s=torch.randn(4, 2, generator=g), y_s=torch.tensor([0, 1, 1, 0]), x_t=torch.randn(3, 2, generator=g))


def mlp_forward(x, layers, final_relu):
    """Linear layers with ReLU in between (and after the last one if final_relu)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1 or final_relu:
            x = x.clamp_min(0)
    return x


def linears(module):
    return [(m.weight, m.bias) for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("domain_outputs", [1, 2])
def test_dann_loss_and_update_match_hand_computation(domain_outputs):
    torch.manual_seed(0)
    cfg = make_cfg("method=dann", "data=toy2d", "backbone=mlp", "backbone.hidden=[5]", "backbone.domain_head=[4]",
                   f"method.domain_outputs={domain_outputs}", "optim.momentum=0.0")
    method = build_method(cfg, (2,), 2)
    before = copy.deepcopy(method)
    batch, lam, lr = fixed_batch(), 0.7, 0.05
    set_lr(method, lr)
    out = method.step(batch, ctx(lam=lam, lr=lr))

    # By hand, from the parameters before the step.
    params = {n: p.detach().clone().requires_grad_() for n, p in before.named_parameters()}
    feats = [(params[f"features.backbone.net.{i}.weight"], params[f"features.backbone.net.{i}.bias"]) for i in (1,)]
    f = mlp_forward(torch.cat([batch.x_s, batch.x_t]), feats, final_relu=True)
    cls = [(params["classifier.0.weight"], params["classifier.0.bias"])]
    logits = mlp_forward(f[:4], cls, final_relu=False)
    log_p = logits - logits.exp().sum(1, keepdim=True).log()
    loss_cls = -log_p[torch.arange(4), batch.y_s].mean()
    disc = [(params["discriminator.0.weight"], params["discriminator.0.bias"]),
            (params["discriminator.2.weight"], params["discriminator.2.bias"])]
    d = mlp_forward(f, disc, final_relu=False)
    is_source = torch.tensor([1.0] * 4 + [0.0] * 3)
    if domain_outputs == 1:
        prob = 1 / (1 + torch.exp(-d[:, 0]))
        loss_dom = -(is_source * prob.log() + (1 - is_source) * (1 - prob).log()).mean()
        acc = ((prob > 0.5).float() == is_source).float().mean()
    else:
        log_q = d - d.exp().sum(1, keepdim=True).log()
        loss_dom = -log_q[torch.arange(7), is_source.long()].mean()
        acc = (d.argmax(1) == is_source.long()).float().mean()
    assert out["loss_cls"].item() == pytest.approx(loss_cls.item(), abs=1e-6)
    assert out["loss_domain"].item() == pytest.approx(loss_dom.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx((loss_cls + loss_dom).item(), abs=1e-6)
    assert out["domain_acc"].item() == pytest.approx(acc.item())

    # The update: the classifier and discriminator descend their own losses; the features descend
    # the classification loss and *ascend* lambda times the domain loss (the reversed gradient).
    g_cls = dict(zip(params, torch.autograd.grad(loss_cls, list(params.values()), allow_unused=True, retain_graph=True)))
    g_dom = dict(zip(params, torch.autograd.grad(loss_dom, list(params.values()), allow_unused=True)))
    after = dict(method.named_parameters())
    for name, p0 in params.items():
        zero = torch.zeros_like(p0)
        gc, gd = g_cls[name] if g_cls[name] is not None else zero, g_dom[name] if g_dom[name] is not None else zero
        grad = gc - lam * gd if name.startswith("features") else gc + gd
        assert torch.allclose(after[name], p0 - lr * grad, atol=1e-6), name


def test_source_only_ignores_the_target():
    torch.manual_seed(0)
    cfg = make_cfg("method=source_only", *TINY_TOY)
    a = build_method(cfg, (2,), 2)
    b = copy.deepcopy(a)
    batch = fixed_batch()
    a.step(batch, ctx())
    b.step(Batch(batch.x_s, batch.y_s, torch.randn(9, 2)), ctx())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# Options that make a method use all of its parts within a few steps (FixMatch: every sample pseudo-labelled;
# DIRT-T: the teacher refreshed; SHOT: stage 2 from step 2, its pseudo-labels refreshed at steps 2 and 4;
# mean teacher: every sample in the consistency term).
SHORT_RUN_OPTIONS = {"adda": ["method.pretrain_steps=2"], "fixmatch": ["method.fixmatch_threshold=0.01"],
                     "dirt_t": ["method.teacher_every=2"],
                     "shot": ["method.pretrain_steps=2", "method.pseudo_label_every=2"],
                     "mean_teacher": ["method.confidence_threshold=0.01"]}


def next_batch(method, src, tgt, c: StepContext, pair) -> Batch:
    """The trainer's batch: target labels for the oracle only, the further target views the method asks
    for, the target samples' indices, after a pass over the target set when the method asks for one (SHOT)."""
    if method.wants_target_pass(c):
        target_pass(method, pair.target_train, 64)
    x_s, y_s = next(src)
    x_t_views = ()
    if method.extra_target_views:
        (x_t, *x_t_views), y_t = tgt.next_views(("weak", *method.extra_target_views))
    else:
        x_t, y_t = next(tgt)
    return Batch(x_s, y_s, x_t, y_t if method.uses_target_labels else None, tuple(x_t_views), idx_t=tgt.last_index)


@pytest.mark.parametrize("name", classification_methods())
@pytest.mark.parametrize("data", ["digits", "toy"])
def test_every_method_trains_five_steps_and_changes_its_parameters(name, data):
    torch.manual_seed(0)
    cfg = make_cfg(f"method={name}", *SHORT_RUN_OPTIONS.get(name, []), *(TINY_DIGITS if data == "digits" else TINY_TOY))
    pair = build_pair(cfg.data)
    method = build_method(cfg, pair.input_shape, pair.num_classes)
    if method.extra_target_views and not pair.is_image:
        pytest.skip("augmented views need images")
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    src, tgt = BatchStream(pair.source_train, 8, 1), BatchStream(pair.target_train, 8, 2)
    for step in range(5):
        c = ctx(step=step, lr=0.01)
        out = method.step(next_batch(method, src, tgt, c, pair), c)
        assert "loss" in out and all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    changed = [n for n, p in method.named_parameters() if not torch.equal(p, before[n])]
    assert changed == list(before)  # every parameter moved
    logits = method.predict(pair.target_test.batch(torch.arange(5))[0])
    assert logits.shape == (5, pair.num_classes + (name == "osbp"))  # OSBP's extra output: unknown


@pytest.mark.parametrize("name", classification_methods())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_method_trains_under_mixed_precision(name, dtype):
    """Every method's step under autocast (trainer.precision=bf16 | fp16; fp16 with the trainer's grad
    scaler): finite terms, every parameter moved, weights still float32."""
    torch.manual_seed(0)
    cfg = make_cfg(f"method={name}", *SHORT_RUN_OPTIONS.get(name, []), *TINY_DIGITS)
    pair = build_pair(cfg.data)
    method = build_method(cfg, pair.input_shape, pair.num_classes)
    if dtype == torch.float16:
        method.grad_scaler = torch.amp.GradScaler("cpu")
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    src, tgt = BatchStream(pair.source_train, 8, 1), BatchStream(pair.target_train, 8, 2)
    for step in range(5):
        c = ctx(step=step, lr=0.01)
        batch = next_batch(method, src, tgt, c, pair)
        with torch.autocast("cpu", dtype=dtype):
            out = method.step(batch, c)
        assert all(torch.isfinite(torch.as_tensor(v)) for v in out.values())
    assert [n for n, p in method.named_parameters() if not torch.equal(p, before[n])] == list(before)
    assert {p.dtype for p in method.parameters()} == {torch.float32}
