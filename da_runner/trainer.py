"""The one training loop. It knows schedules, data streams, evaluation and checkpoints; it does not
know which method it runs: everything method-specific happens inside `method.step`."""

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from da_runner import checkpoint
from da_runner import validators as V
from da_runner.analysis import log_decision_boundary, run_analysis
from da_runner.config import differences, resolve_device, validate
from da_runner.data import build_pair
from da_runner.ema import WeightAverage
from da_runner.errors import UserError
from da_runner.evaluation import ValidationData, evaluate
from da_runner.logging import RunLogger
from da_runner.methods import Batch, StepContext, build_method
from da_runner.nn.backbones import without_initial_weights
from da_runner.schedules import grl_lambda, lr_factor
from da_runner.tasks import build_task

log = logging.getLogger(__name__)

# trainer.precision (config.PRECISIONS) -> the dtype of the training step's autocast (None: no autocast)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_for_resume(cfg: DictConfig, state: dict, run_dir: Path) -> DictConfig:
    """A resumed run continues with the configuration it started with; runtime keys come from `cfg`."""
    saved = OmegaConf.create(state["config"])
    changed = differences(saved, cfg)
    if changed:
        log.warning("resume: keeping the run's saved configuration; ignoring new values for %s", ", ".join(changed))
    for key in ("device", "trainer.progress"):
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key))
    saved.resume = True
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.exists():  # Hydra just overwrote it with the new command line's composition
        OmegaConf.save(saved, hydra_config)
    return saved


def update_picks(picks: dict, record: dict, names, target_metrics=("target_acc",)) -> list[str]:
    """Make `record` (one evaluation) the pick of every validator in `names` whose score it matches
    or improves (>=: among equal scores the later, more adapted checkpoint); returns their names.
    A pick keeps the record's `target_metrics` (those of the pair's setting)."""
    improved = []
    for name in names:
        if name not in picks or V.score(name, record[name]) >= V.score(name, picks[name]["value"]):
            picks[name] = {"step": record["step"], "value": record[name], "source_acc": record["source_acc"],
                           **{key: record[key] for key in target_metrics}}
            improved.append(name)
    return improved


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Train `cfg.method` on `cfg.data`, writing TensorBoard events, checkpoints and metrics to run_dir.

    Returns the final metrics (also written to run_dir/metrics.json).
    """
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    last_path, best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    resumed = None
    if cfg.resume:
        if not last_path.is_file():
            raise UserError(f"resume=true but there is no checkpoint at {last_path}; "
                            f"point hydra.run.dir at the run directory to resume")
        resumed = checkpoint.load(last_path)
        cfg = _config_for_resume(cfg, resumed, run_dir)
    # A resumed run's weights come from its checkpoint: its backbone fetches no pretrained or local ones.
    build_cfg = without_initial_weights(cfg) if resumed is not None else cfg
    validate(build_cfg)
    device = resolve_device(cfg.device)
    tcfg = cfg.trainer
    max_steps = int(tcfg.max_steps)
    # .get: runs saved before the key existed resume in fp32. Autocast covers the training step only.
    autocast_dtype = AUTOCAST_DTYPES[tcfg.get("precision", "fp32")]

    seed_everything(int(cfg.seed))
    pair = build_pair(cfg.data).to(device)
    for split in ("source_train", "target_train"):
        if tcfg.batch_size > len(getattr(pair, split)):
            raise UserError(f"trainer.batch_size={tcfg.batch_size} is larger than the {len(getattr(pair, split))} "
                            f"samples of {split} in data={pair.name}")
    # What depends on the pair's setting (closed, partial, open-set): the prediction rule, the target
    # metrics, the validators that apply. The loop below only hands the task what it needs.
    task = build_task(pair, cfg.data)
    method = build_method(build_cfg, pair.input_shape, pair.num_classes).to(device)
    task.check_method(method)
    if autocast_dtype == torch.float16:
        # float16's narrow range underflows small gradients: the loss is scaled up before backward and
        # the gradients scaled down before each step (Method.backward / step_optimizers).
        method.grad_scaler = torch.amp.GradScaler(device.type)
    channels_last = bool(tcfg.get("channels_last", False)) and pair.is_image
    if channels_last:
        method.to(memory_format=torch.channels_last)
    if tcfg.get("compile", False):
        # Each network in place (nn.Module.compile), not wrapped: parameter names, and so checkpoints,
        # stay those of the eager modules, and a compiled run resumes an eager one and the reverse.
        for module in method.children():
            module.compile()
    method.train()
    # trainer.ema: a moving average of the weights, evaluated beside them (da_runner/ema.py); with
    # trainer.ema_select the validators, best.pt and the oracle go by the average's evaluation.
    ema = WeightAverage(method, float(tcfg.ema)) if tcfg.get("ema") is not None else None
    ema_select = ema is not None and bool(tcfg.get("ema_select", False))
    if method.uses_target_labels:
        log.warning("method=%s trains on TARGET LABELS: an upper bound for comparison, not domain adaptation",
                    cfg.method.name)
    # Each domain's batches come from a generator of its own, so adding a method that draws random
    # numbers (dropout, random matrices) never changes which samples a run sees. The domain picks
    # its stream: batches by index from memory, or decoded from files by DataLoader workers.
    # data.augment (none | weak | strong) applies to both domains' training batches; evaluation never augments.
    augment = cfg.data.get("augment")
    source = pair.source_train.stream(int(tcfg.batch_size), seed=2 * int(cfg.seed) + 1, augment=augment)
    target = pair.target_train.stream(int(tcfg.batch_size), seed=2 * int(cfg.seed) + 2, augment=augment)

    # Label-free model selection: every validator in trainer.validators is computed at each evaluation
    # and remembers the evaluation it would choose; best.pt is the choice of trainer.select. Target
    # labels only report accuracy, and the oracle (best target accuracy) is recorded as such.
    select = str(tcfg.select)
    validator_names = task.validators(list(tcfg.validators), select)
    validation_data = ValidationData.of(pair, int(tcfg.validation_samples), seed=int(cfg.data.get("seed", 0)))
    start_step, picks, oracle, last_eval, train_time = 0, {}, None, None, 0.0
    last_ema_eval = None
    if resumed is not None:
        method.load_checkpoint_state(resumed["method"])
        source.load_state_dict(resumed["streams"]["source"])
        target.load_state_dict(resumed["streams"]["target"])
        checkpoint.set_rng_state(resumed["rng"])
        start_step, picks, oracle, last_eval = resumed["step"], resumed["picks"], resumed["oracle"], resumed["last_eval"]
        last_ema_eval = resumed.get("last_ema_eval")
        train_time = resumed["train_time_s"]
        if ema is not None:
            ema.load_state_dict(resumed["ema"])
        log.info("resuming %s from step %d of %d", run_dir, start_step, max_steps)

    def state_at(step: int) -> dict:
        return {
            "step": step,
            "method": method.checkpoint_state(),
            "streams": {"source": source.state_dict(), "target": target.state_dict()},
            "rng": checkpoint.rng_state(),
            "picks": picks,
            "oracle": oracle,
            "last_eval": last_eval,
            "last_ema_eval": last_ema_eval,
            "train_time_s": train_time,
            "ema": None if ema is None else ema.state_dict(),
            "selected_weights": "ema" if ema_select else "raw",  # the weights da-eval evaluates by default
            "config": OmegaConf.to_container(cfg, resolve=True),
        }

    logger = RunLogger(run_dir, start_step)
    draw_boundary = bool(tcfg.analysis) and pair.input_shape == (2,)
    if start_step == 0 and pair.is_image:
        for name, domain in (("source", pair.source_train), ("target", pair.target_train)):
            logger.images(f"data/{name}_samples", domain.unnormalize(next(domain.batches(32))[0]))

    bar = tqdm(total=max_steps, initial=start_step, desc=f"{cfg.method.name} on {pair.name}",
               disable=not tcfg.progress, dynamic_ncols=True, mininterval=0.5)
    loop_start = time.perf_counter()
    outside_loop = 0.0  # seconds spent evaluating and checkpointing, excluded from the steps/s figure
    # A device tensor, so checking every step's loss costs no GPU synchronisation; it is read (and the
    # run stopped) only where the trainer synchronises anyway: logging, evaluation, checkpoints.
    loss_not_finite = torch.zeros((), dtype=torch.bool, device=device)
    last_checked = start_step
    for step in range(start_step, max_steps):
        p = step / max_steps
        ctx = StepContext(step=step, max_steps=max_steps, progress=p, grl_lambda=grl_lambda(step, max_steps, cfg.grl),
                          lr=float(cfg.optim.lr) * lr_factor(step, max_steps, cfg.optim))
        for optimizer in method.optimizers.values():
            for group in optimizer.param_groups:
                if "lr_mult" in group:  # groups without it keep a constant lr of their own
                    group["lr"] = ctx.lr * group["lr_mult"]

        x_s, y_s = next(source)
        x_t_strong = None
        if method.wants_strong_target_view:  # FixMatch: the same target images at data.augment's `strong` level too
            (x_t, x_t_strong), y_t = target.next_views((augment or "none", "strong"))
        else:
            x_t, y_t = next(target)
        if channels_last:
            x_s, x_t = x_s.contiguous(memory_format=torch.channels_last), x_t.contiguous(memory_format=torch.channels_last)
            if x_t_strong is not None:
                x_t_strong = x_t_strong.contiguous(memory_format=torch.channels_last)
        # Target labels are dropped here for every UDA method; only an oracle may see them.
        batch = Batch(x_s=x_s, y_s=y_s, x_t=x_t, y_t=y_t if method.uses_target_labels else None, x_t_strong=x_t_strong)
        # trainer.precision=bf16 | fp16: the step's forward passes in that dtype (Method.backward leaves autocast).
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            terms = method.step(batch, ctx)
        if ema is not None:
            ema.update()
        done = step + 1
        bar.update(1)
        loss_not_finite |= ~torch.isfinite(torch.as_tensor(terms["loss"]))

        log_now = done % tcfg.log_every == 0 or done == max_steps
        eval_now = done % tcfg.eval_every == 0 or done == max_steps
        ckpt_now = done % tcfg.ckpt_every == 0 or done == max_steps
        if log_now or eval_now or ckpt_now:
            if loss_not_finite:
                bar.close()
                logger.close()
                raise UserError(
                    f"the training loss of method={cfg.method.name} was not finite (now {float(terms['loss'])}) "
                    f"between steps {last_checked + 1} and {done}; stopping rather than training on garbage. Try a lower "
                    f"optim.lr (now {cfg.optim.lr}) or a smaller grl.hi. checkpoints/last.pt keeps the last "
                    f"state saved before it.")
            last_checked = done

        if log_now:
            # .item() waits for the device, so it happens only on logging steps.
            values = {k: float(v) for k, v in terms.items()}
            logger.scalars("train", {**values, "grl_lambda": ctx.grl_lambda, "lr": ctx.lr}, done)
            bar.set_postfix(loss=f"{values['loss']:.3f}", lam=f"{ctx.grl_lambda:.2f}",
                            tgt_acc="-" if last_eval is None else f"{last_eval['target_acc']:.3f}", refresh=False)

        if eval_now or ckpt_now:
            pause = time.perf_counter()
            if eval_now:
                last_eval = {"step": done, **evaluate(method, validation_data, task, validator_names,
                                                      int(tcfg.eval_batch_size))}
                if ema is not None:
                    with ema.applied(method):
                        last_ema_eval = {"step": done, **evaluate(method, validation_data, task, validator_names,
                                                                  int(tcfg.eval_batch_size))}
                logger.evaluation(last_eval, ema=last_ema_eval if ema is not None else None)
                chosen = last_ema_eval if ema_select else last_eval
                if select in update_picks(picks, chosen, validator_names, task.metric_names):
                    checkpoint.save(state_at(done), best_path)
                if oracle is None or chosen["target_acc"] > oracle["target_acc"]:
                    oracle = {"step": done, "target_acc": chosen["target_acc"]}
                if draw_boundary:  # 2-D data: the decision boundary at every evaluation (a slider in TensorBoard)
                    log_decision_boundary(method, pair, run_dir, logger, done, max_steps, cfg.method.name)
            if ckpt_now:
                train_time += pause - loop_start - outside_loop
                loop_start, outside_loop = time.perf_counter(), 0.0
                checkpoint.save(state_at(done), last_path)
            else:
                outside_loop += time.perf_counter() - pause
    bar.close()

    analysis = {}
    if tcfg.analysis:
        log.info("analysis: proxy A-distance, t-SNE of %d samples per domain, projector", int(tcfg.analysis_samples))
        analysis = run_analysis(method, pair, run_dir, logger, max_steps, int(tcfg.analysis_samples),
                                int(tcfg.eval_batch_size), seed=int(cfg.seed))
    metrics = {
        "method": cfg.method.name,
        "data": pair.name,
        "uses_target_labels": method.uses_target_labels,  # true: an oracle, not a UDA result
        "setting": task.setting,  # closed | partial | open_set: which target metrics follow
        "target_metrics": list(task.metric_names),
        **last_eval,  # source_acc, target_acc and the setting's target metrics (+ per-head accuracies)
        # trainer.ema: the average's last evaluation; `selected_*` below are of the weights `select` looked at
        **({"ema": {k: v for k, v in last_ema_eval.items() if k != "step"}} if ema is not None else {}),
        "selected_weights": "ema" if ema_select else "raw",
        "selected_by": select,
        "selected_step": picks[select]["step"],
        "selected_source_acc": picks[select]["source_acc"],
        # selected_target_acc and the setting's other target metrics at the checkpoint chosen by `select`
        # (.get: a run resumed from a checkpoint older than a metric has none for picks made before)
        **{f"selected_{key}": picks[select].get(key) for key in task.metric_names},
        # For each validator: the evaluation it would choose and that checkpoint's target accuracy.
        "validators": picks,
        # The best target accuracy over all evaluations: chosen WITH target labels, for reference only.
        "oracle": {**oracle, "uses_target_labels": True},
        "train_time_s": round(train_time, 3),
        "train_steps_per_s": round(max_steps / train_time, 2) if train_time > 0 else None,
        **analysis,  # proxy_a_distance, target_ari
        "wall_time_s": round(time.perf_counter() - start_time, 3),
    }
    _write_json(run_dir / "metrics.json", metrics)
    hparam_keys = ("source_acc", "step", *task.metric_names, *(f"selected_{key}" for key in task.metric_names))
    logger.hparams(cfg, {k: metrics[k] for k in hparam_keys if metrics[k] is not None})
    logger.close()
    log.info("done: target_acc %.4f, source_acc %.4f, selected (by %s, step %d) target_acc %.4f -> %s",
             metrics["target_acc"], metrics["source_acc"], select, metrics["selected_step"],
             metrics["selected_target_acc"], run_dir)
    return metrics
