import json
import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from da_runner.errors import UserError
from da_runner.methods import METHODS, build_method
import da_runner.trainer as trainer_module
from da_runner.trainer import train
from conftest import TINY_DIGITS, TINY_TOY, classification_methods, crash_and_resume, load_ckpt, make_cfg, read_metrics

REQUIRED_TAGS = ["train/loss", "train/loss_cls", "train/loss_domain", "train/domain_acc", "train/grl_lambda",
                 "train/lr", "eval/source_acc", "eval/target_acc"]


def scalar_tags(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_run_dir_contents(tmp_path):
    cfg = make_cfg(*TINY_DIGITS, "trainer.max_steps=12", "trainer.eval_every=5", "trainer.ckpt_every=5",
                   "trainer.log_every=2")
    metrics = train(cfg, tmp_path)
    assert metrics == read_metrics(tmp_path)
    assert metrics["step"] == 12 and 0 <= metrics["target_acc"] <= 1 and 0 <= metrics["source_acc"] <= 1
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [5, 10, 12]
    assert history[-1]["target_acc"] == metrics["target_acc"]
    # best.pt is the evaluation with the highest source accuracy (latest among ties), never chosen by target
    best = max(history, key=lambda h: (h["source_acc"], h["step"]))
    assert metrics["selected_step"] == best["step"] and metrics["selected_target_acc"] == best["target_acc"]
    assert load_ckpt(tmp_path / "checkpoints" / "best.pt")["step"] == best["step"]
    assert load_ckpt(tmp_path / "checkpoints" / "last.pt")["step"] == 12

    events = scalar_tags(tmp_path)
    tags = events.Tags()
    assert set(REQUIRED_TAGS) <= set(tags["scalars"])
    assert {"data/source_samples", "data/target_samples"} <= set(tags["images"])
    assert [e.step for e in events.Scalars("eval/target_acc")] == [5, 10, 12]
    lam = [e.value for e in events.Scalars("train/grl_lambda")]
    assert lam[0] < lam[-1] <= 1.0  # Ganin's schedule rises
    # the hparams row: plugin data for the hparams dashboard plus the final metrics
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["method.name"].string_value == "dann" and hparams["trainer.max_steps"].number_value == 12
    assert events.Scalars("hparam/target_acc")[-1].value == pytest.approx(metrics["target_acc"])


def test_checkpoints_load_with_weights_only(tmp_path):
    train(make_cfg(*TINY_TOY, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3"), tmp_path)
    for name in ("last.pt", "best.pt"):
        state = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"step", "method", "streams", "rng", "config"} <= set(state)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    args = [*TINY_DIGITS, "trainer.max_steps=8", "trainer.eval_every=8"]
    a = train(make_cfg(*args), tmp_path / "a")
    b = train(make_cfg(*args), tmp_path / "b")
    train(make_cfg(*args, "seed=1"), tmp_path / "c")
    wa, wb, wc = (load_ckpt(tmp_path / r / "checkpoints" / "last.pt")["method"]["modules"] for r in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["target_acc"] == b["target_acc"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


# DIRT-T starts from a VADA run: tests/test_vada.py resumes it.
RESUME_CASES = [(name, 7) for name in classification_methods() if name != "dirt_t"] + [("dann", 10), ("adda", 10)]
# ADDA switches stages at step 6: crashing at 7 resumes from stage 1 (step 4), at 10 from stage 2 (step 8).
# PADA updates its class weights every 3 steps: the crash falls between two updates.
# SHOT switches stages at step 3 and refreshes its pseudo-labels every 60 // 8 = 7 steps (an epoch of the
# tiny target set): crashing at 7 resumes from step 4, in stage 2, with the labels of step 3's pass.
RESUME_OPTIONS = {"adda": "method.pretrain_steps=6", "pada": "method.class_weight_update_every=3",
                  "fixmatch": "method.fixmatch_threshold=0.01",  # FixMatch: every sample pseudo-labelled
                  "shot": "method.pretrain_steps=3",
                  "mean_teacher": "method.confidence_threshold=0.01"}  # mean teacher: every sample in the consistency term


@pytest.mark.parametrize("name, crash_at", RESUME_CASES)
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, name, crash_at):
    args = [*TINY_DIGITS, f"method={name}", RESUME_OPTIONS.get(name, "seed=0"),
            "trainer.max_steps=12", "trainer.eval_every=3", "trainer.ckpt_every=4", "trainer.log_every=1"]
    reference = train(make_cfg(*args), tmp_path / "ref")

    def last_checkpoint_is_the_one_before_the_crash():
        assert load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4 * (crash_at // 4)

    resumed = crash_and_resume(monkeypatch, name, crash_at, args, tmp_path / "run",
                               before_resume=last_checkpoint_is_the_one_before_the_crash)

    for key in ("target_acc", "source_acc", "selected_target_acc", "selected_step", "step"):
        assert resumed[key] == reference[key]
    ref_state = load_ckpt(tmp_path / "ref" / "checkpoints" / "last.pt")
    new_state = load_ckpt(tmp_path / "run" / "checkpoints" / "last.pt")
    for k, v in ref_state["method"]["modules"].items():
        assert torch.equal(v, new_state["method"]["modules"][k]), k
    ref_hist = (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ref_hist


def test_resume_keeps_the_saved_config(tmp_path):
    train(make_cfg(*TINY_TOY, "trainer.max_steps=4", "grl=constant"), tmp_path)
    # a bare `resume=true` composes the default grl; the run must go on with the one it started with
    metrics = train(make_cfg(*TINY_TOY, "trainer.max_steps=4", "resume=true"), tmp_path)
    assert load_ckpt(tmp_path / "checkpoints" / "last.pt")["config"]["grl"]["name"] == "constant"
    assert metrics["step"] == 4


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "trainer.max_steps must be a positive integer, got 0"),
    ("trainer.max_steps=-5", "trainer.max_steps must be a positive integer, got -5"),
    ("trainer.max_steps=abc", "trainer.max_steps must be a positive integer, got 'abc'"),
    ("trainer.batch_size=0", "trainer.batch_size must be a positive integer, got 0"),
    ("optim.lr=-0.1", "optim.lr must be a number > 0, got -0.1"),
    ("optim.lr=0", "optim.lr must be a number > 0, got 0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be a number >= 0"),
    ("device=tpu", "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("trainer.batch_size=100000", "trainer.batch_size=100000 is larger than"),
    ("trainer.precision=fp8", "trainer.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ("trainer.channels_last=yes", "trainer.channels_last must be true or false, got 'yes'"),
    ("trainer.compile=1", "trainer.compile must be true or false, got 1"),
    ("trainer.ema=1.0", "trainer.ema must be null (off) or a decay in (0, 1), e.g. 0.999, got 1.0"),
    ("trainer.ema=abc", "trainer.ema must be null (off) or a decay in (0, 1), e.g. 0.999, got 'abc'"),
    ("trainer.ema_select=true", "trainer.ema_select=true needs a weight average to select by"),
])
def test_invalid_config_names_key_and_rule(tmp_path, override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train(make_cfg(*TINY_TOY, override), tmp_path)


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path / "checkpoints" / "last.pt")):
        train(make_cfg(*TINY_TOY, "resume=true"), tmp_path)


def test_corrupt_checkpoint_is_reported_as_corrupt(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is corrupt"):
        train(make_cfg(*TINY_TOY, "resume=true"), tmp_path)


def test_checkpoint_of_another_format_version_is_named_as_such(tmp_path):
    from da_runner import checkpoint

    path = tmp_path / "old.pt"
    torch.save({"format_version": checkpoint.FORMAT_VERSION - 1, "step": 3}, path)
    with pytest.raises(UserError, match=r"another version of da_runner \(checkpoint format 1; this version reads format 2\)"):
        checkpoint.load(path)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("method", ["dann", "mcd", "adda"])
def test_mixed_precision_runs_the_forward_in_low_precision_and_keeps_float32_weights(tmp_path, monkeypatch, method,
                                                                                     precision, dtype):
    """trainer.precision=bf16 | fp16: the step's convolutions run in that dtype under autocast, the
    backward and the optimizers (several per step for MCD and ADDA) leave the weights in float32, and
    evaluation runs in float32. fp16 checkpoints its grad scaler."""
    seen, phase = [], ["setup"]
    conv_forward, evaluate, step = torch.nn.Conv2d.forward, trainer_module.evaluate, METHODS[method].step

    def recording_forward(self, x):
        out = conv_forward(self, x)
        seen.append((phase[0], out.dtype))
        return out

    def in_phase(name, fn):
        def wrapped(*args, **kwargs):
            phase[0] = name
            try:
                return fn(*args, **kwargs)
            finally:
                phase[0] = "other"
        return wrapped

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    monkeypatch.setattr(trainer_module, "evaluate", in_phase("evaluate", evaluate))
    monkeypatch.setattr(METHODS[method], "step", in_phase("step", step))
    run = tmp_path / method
    extra = ["method.pretrain_steps=2"] if method == "adda" else []
    train(make_cfg(*TINY_DIGITS, f"method={method}", "trainer.max_steps=4", f"trainer.precision={precision}", *extra), run)
    assert {out_dtype for name, out_dtype in seen if name == "step"} == {dtype}
    assert {out_dtype for name, out_dtype in seen if name == "evaluate"} == {torch.float32}
    state = load_ckpt(run / "checkpoints" / "last.pt")["method"]
    assert {t.dtype for t in state["modules"].values() if t.is_floating_point()} == {torch.float32}
    assert bool(state["grad_scaler"]) == (precision == "fp16")  # the scaler's factor, only where there is one
    assert read_metrics(run)["step"] == 4  # trained and evaluated to the end


def test_every_precision_has_an_autocast_dtype():
    from da_runner.schema import TRAINER

    assert set(trainer_module.AUTOCAST_DTYPES) == set(TRAINER["precision"].rule.options)


def test_fp16_grad_scaler_skips_a_step_with_overflowing_gradients_and_resumes_its_factor():
    """With fp16's scaler a backward whose scaled gradients overflow leaves the weights untouched and
    halves the factor, and the factor travels through the checkpoint state; without the scaler (fp32,
    bf16) the same step is taken."""
    methods = {}
    for name, scaler in (("fp32", torch.amp.GradScaler("cpu", enabled=False)), ("fp16", torch.amp.GradScaler("cpu"))):
        method = build_method(make_cfg(*TINY_TOY, "method=source_only"), (2,), 2)
        method.grad_scaler = scaler
        before = [p.detach().clone() for p in method.parameters()]
        # Finite in float32, but times the scaler's initial factor (2 ** 16) beyond float32's range.
        loss = 1e35 * sum(p.sum() for p in method.parameters())
        method.optimizer_step(method.optimizers["main"], loss)
        changed = any(not torch.equal(b, p) for b, p in zip(before, method.parameters()))
        methods[name] = (method, changed)
    assert methods["fp32"][1] and not methods["fp16"][1]
    fp16 = methods["fp16"][0]
    assert fp16.grad_scaler.get_scale() == 2.0 ** 15

    resumed = build_method(make_cfg(*TINY_TOY, "method=source_only"), (2,), 2)
    resumed.grad_scaler = torch.amp.GradScaler("cpu")
    resumed.load_checkpoint_state(fp16.checkpoint_state())
    assert resumed.grad_scaler.get_scale() == 2.0 ** 15


def test_fp32_is_the_default_precision(tmp_path, monkeypatch):
    seen = []
    conv_forward = torch.nn.Conv2d.forward

    def recording_forward(self, x):
        out = conv_forward(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    train(make_cfg(*TINY_DIGITS, "trainer.max_steps=2"), tmp_path)
    assert set(seen) == {torch.float32}


def test_channels_last_puts_conv_weights_and_batches_in_nhwc(tmp_path, monkeypatch):
    layouts = []
    conv_forward = torch.nn.Conv2d.forward

    def recording_forward(self, x):
        if self.training:
            layouts.append((self.weight.is_contiguous(memory_format=torch.channels_last),
                            x.is_contiguous(memory_format=torch.channels_last)))
        return conv_forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", recording_forward)
    train(make_cfg(*TINY_DIGITS, "trainer.max_steps=2", "trainer.channels_last=true"), tmp_path)
    assert layouts[0] == (True, True)  # the first convolution: NHWC weights and an NHWC batch
    assert all(weight_nhwc for weight_nhwc, _ in layouts)


def test_compile_compiles_every_network_in_place_and_keeps_checkpoints_interchangeable(tmp_path, monkeypatch):
    compiled = []
    module_compile = torch.nn.Module.compile

    def recording_compile(self, *args, **kwargs):
        compiled.append(id(self))
        return module_compile(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording_compile)
    args = [*TINY_TOY, "method=dann", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.ckpt_every=3",
            "device=cpu"]
    result = train(make_cfg(*args, "trainer.compile=true"), tmp_path / "compiled")
    assert len(compiled) == len(set(compiled)) >= 3  # backbone, label head, discriminator: each once
    compiled_by_the_compiled_run = len(compiled)
    eager = train(make_cfg(*args), tmp_path / "eager")
    assert len(compiled) == compiled_by_the_compiled_run  # the default compiles nothing
    # The same parameter names, so either run's checkpoint loads into the other kind of run.
    compiled_state = load_ckpt(tmp_path / "compiled" / "checkpoints" / "last.pt")["method"]["modules"]
    eager_state = load_ckpt(tmp_path / "eager" / "checkpoints" / "last.pt")["method"]["modules"]
    assert compiled_state.keys() == eager_state.keys()
    assert all(torch.allclose(compiled_state[k].float(), eager_state[k].float(), atol=1e-4) for k in eager_state)
    assert result["step"] == eager["step"] == 6
