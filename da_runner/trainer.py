"""The one training loop (`train`, a screenful) and the run it drives (`Run`: setup and resume, the
batch and the step, evaluation and model selection, checkpoints, the final report). It knows
schedules, data streams, evaluation and checkpoints; it does not know which method it runs:
everything method-specific happens inside `method.step`."""

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

from da_runner import checkpoint, distributed
from da_runner import validators as V
from da_runner.analysis import log_decision_boundary, run_analysis
from da_runner.config import differences, resolve_device, validate
from da_runner.data import build_pair
from da_runner.data.augment import Inversion
from da_runner.ema import WeightAverage
from da_runner.errors import UserError
from da_runner.evaluation import ValidationData, evaluate
from da_runner.logging import RunLogger
from da_runner.methods import Batch, StepContext, build_method
from da_runner.nn.backbones import without_initial_weights
from da_runner.schedules import grl_lambda, lr_factor
from da_runner.tasks import build_task

log = logging.getLogger(__name__)

# trainer.precision (its choices: schema.TRAINER) -> the dtype of the training step's autocast (None: no autocast)
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _config_for_resume(cfg: DictConfig, state: dict, run_dir: Path, write: bool = True) -> DictConfig:
    """A resumed run continues with the configuration it started with; runtime keys come from `cfg`."""
    saved = OmegaConf.create(state["config"])
    changed = differences(saved, cfg)
    if changed:
        log.warning("resume: keeping the run's saved configuration; ignoring new values for %s", ", ".join(changed))
    for key in ("device", "trainer.progress"):
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key))
    saved.resume = True
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if write and hydra_config.exists():  # Hydra just overwrote it with the new command line's composition
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


@torch.no_grad()
def target_pass(method, domain, batch_size: int) -> None:
    """Hand `method.target_pass` the whole target training split `domain`: (inputs, dataset indices)
    in order, unaugmented, without labels, the method in eval mode (no dropout draws, BatchNorm's
    running statistics) and no gradients, as evaluation sees it. The trainer calls it before each
    step for which `method.wants_target_pass(ctx)` is true; it draws no global random numbers."""

    def inputs_and_indices():
        start = 0
        for x, _ in domain.batches(batch_size):  # the labels stay here
            yield x, torch.arange(start, start + len(x), device=x.device)
            start += len(x)

    was_training = method.training
    method.eval()
    try:
        method.target_pass(inputs_and_indices())
    finally:
        method.train(was_training)


def train(cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Train `cfg.method` on `cfg.data`, writing TensorBoard events, checkpoints and metrics to run_dir.

    Returns the final metrics (also written to run_dir/metrics.json).
    """
    run = Run(cfg, Path(run_dir))
    tcfg = run.cfg.trainer
    for step in range(run.start_step, run.max_steps):
        ctx = run.step_context(step)
        terms = run.train_step(ctx)
        done = step + 1
        log_now, eval_now, ckpt_now = (done % every == 0 or done == run.max_steps
                                       for every in (tcfg.log_every, tcfg.eval_every, tcfg.ckpt_every))
        if log_now or eval_now or ckpt_now:
            run.stop_if_loss_not_finite(terms, done)
        if log_now:
            run.log_training(terms, ctx, done)
        if eval_now or ckpt_now:
            run.evaluate_and_save(done, evaluate_now=eval_now, save_now=ckpt_now)
    return run.finish()


class Run:
    """One training run: what `train`'s loop works with, and each of the loop's parts.

    It knows schedules, data streams, evaluation and checkpoints; it does not know which method it
    runs (everything method-specific happens inside `method.step`) nor the pair's setting (the task
    object answers for it)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.start_time = time.perf_counter()
        self.run_dir = run_dir
        # torchrun / srun with several tasks: this process is one rank of the run (da_runner/distributed.py).
        # Every rank trains; rank 0 alone evaluates and writes.
        self.world = world = distributed.init()
        self.last_path, self.best_path = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
        resumed = None
        if cfg.resume:
            if not self.last_path.is_file():
                raise UserError(f"resume=true but there is no checkpoint at {self.last_path}; "
                                f"point hydra.run.dir at the run directory to resume")
            resumed = checkpoint.load(self.last_path)
            if resumed.get("world_size", 1) != world.size:
                raise UserError(f"{self.last_path} was written by a run on {resumed.get('world_size', 1)} process(es); "
                                f"resume it on as many (this one has {world.size})")
            cfg = _config_for_resume(cfg, resumed, run_dir, write=world.is_main)
        self.cfg = cfg
        # A resumed run's weights come from its checkpoint: its backbone fetches no pretrained or local ones.
        build_cfg = without_initial_weights(cfg) if resumed is not None else cfg
        validate(build_cfg)
        self.device = device = resolve_device(cfg.device)
        if world.size > 1 and device.type == "cuda":
            # One GPU per rank: its local rank among the GPUs it sees (all of the node's, or one where
            # SLURM binds a GPU to each task).
            self.device = device = torch.device("cuda", world.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        tcfg = cfg.trainer
        if tcfg.batch_size % world.size:
            raise UserError(f"trainer.batch_size={tcfg.batch_size} (per domain, over all processes) does not split "
                            f"evenly over {world.size} processes")
        self.max_steps = int(tcfg.max_steps)
        # .get: runs saved before the key existed resume in fp32. Autocast covers the training step only.
        self.autocast_dtype = AUTOCAST_DTYPES[tcfg.get("precision", "fp32")]

        seed_everything(int(cfg.seed))
        self.pair = pair = build_pair(cfg.data).to(device)
        for split in ("source_train", "target_train"):
            if tcfg.batch_size > len(getattr(pair, split)):
                raise UserError(f"trainer.batch_size={tcfg.batch_size} is larger than the {len(getattr(pair, split))} "
                                f"samples of {split} in data={pair.name}")
        # What depends on the pair's setting (closed, partial, open-set): the prediction rule, the target
        # metrics, the validators that apply. The loop only hands the task what it needs.
        self.task = build_task(pair, cfg.data)
        self.method = method = build_method(build_cfg, pair.input_shape, pair.num_classes).to(device)
        self.task.check_method(method)
        if tcfg.get("sync_bn", False) and world.size > 1:
            if device.type != "cuda":
                raise UserError("trainer.sync_bn=true needs GPUs: torch's SyncBatchNorm runs on CUDA devices only "
                                "(on CPUs, trainer.sync_bn=false keeps per-rank batch statistics)")
            self.method = method = distributed.use_sync_batch_norm(method)
        if self.autocast_dtype == torch.float16:
            # float16's narrow range underflows small gradients: the loss is scaled up before backward and
            # the gradients scaled down before each step (Method.backward / step_optimizers).
            method.grad_scaler = torch.amp.GradScaler(device.type)
        self.channels_last = bool(tcfg.get("channels_last", False)) and pair.is_image
        if self.channels_last:
            method.to(memory_format=torch.channels_last)
        if tcfg.get("compile", False):
            # Each network in place (nn.Module.compile), not wrapped: parameter names, and so checkpoints,
            # stay those of the eager modules, and a compiled run resumes an eager one and the reverse.
            for module in method.children():
                module.compile()
        method.train()
        # trainer.ema: a moving average of the weights, evaluated beside them (da_runner/ema.py); with
        # trainer.ema_select the validators, best.pt and the oracle go by the average's evaluation.
        self.ema = WeightAverage(method, float(tcfg.ema)) if tcfg.get("ema") is not None else None
        self.ema_select = self.ema is not None and bool(tcfg.get("ema_select", False))
        if method.uses_target_labels:
            log.warning("method=%s trains on TARGET LABELS: an upper bound for comparison, not domain adaptation",
                        cfg.method.name)
        # Each domain's batches come from a generator of its own, so adding a method that draws random
        # numbers (dropout, random matrices) never changes which samples a run sees. The domain picks
        # its stream: batches by index from memory, or decoded from files by DataLoader workers.
        # data.augment (none | weak | strong) applies to both domains' training batches; evaluation never augments.
        self.augment = cfg.data.get("augment")
        invert = Inversion.from_config(cfg.data)  # data.invert(_channels): training images' colours inverted at random
        # Read once, not every step: the augmentation levels of further views of each target batch the
        # method trains on (FixMatch's strong view, mean teacher's second view); usually none.
        self.target_views = tuple(method.extra_target_views)
        self.source = pair.source_train.stream(int(tcfg.batch_size), seed=2 * int(cfg.seed) + 1,
                                               augment=self.augment, invert=invert)
        self.target = pair.target_train.stream(int(tcfg.batch_size), seed=2 * int(cfg.seed) + 2,
                                               augment=self.augment, invert=invert)
        for stream in (self.source, self.target):  # several processes: each takes its share of every batch
            stream.order.shard(world.rank, world.size)

        # Label-free model selection: every validator in trainer.validators is computed at each evaluation
        # and remembers the evaluation it would choose; best.pt is the choice of trainer.select. Target
        # labels only report accuracy, and the oracle (best target accuracy) is recorded as such.
        self.select = str(tcfg.select)
        self.validator_names = self.task.validators(list(tcfg.validators), self.select)
        self.validation_data = ValidationData.of(pair, int(tcfg.validation_samples), seed=int(cfg.data.get("seed", 0)))
        self.start_step, self.picks, self.oracle, self.train_time = 0, {}, None, 0.0
        self.last_eval = self.last_ema_eval = None
        if resumed is not None:
            self.restore(resumed)

        self.logger = RunLogger(run_dir, self.start_step) if world.is_main else None
        self.draw_boundary = bool(tcfg.analysis) and pair.input_shape == (2,)
        if self.start_step == 0 and pair.is_image and world.is_main:
            for name, domain in (("source", pair.source_train), ("target", pair.target_train)):
                self.logger.images(f"data/{name}_samples", domain.unnormalize(next(domain.batches(32))[0]))
        self.bar = tqdm(total=self.max_steps, initial=self.start_step, desc=f"{cfg.method.name} on {pair.name}",
                        disable=not (tcfg.progress and world.is_main), dynamic_ncols=True, mininterval=0.5)
        self.loop_start = time.perf_counter()
        self.outside_loop = 0.0  # seconds spent evaluating and checkpointing, excluded from the steps/s figure
        # A device tensor, so checking every step's loss costs no GPU synchronisation; it is read (and the
        # run stopped) only where the trainer synchronises anyway: logging, evaluation, checkpoints.
        self.loss_not_finite = torch.zeros((), dtype=torch.bool, device=device)
        self.last_checked = self.start_step

    def restore(self, resumed: dict) -> None:
        """Continue from a checkpoint: weights and optimizers, stream positions, RNG and the selection so far."""
        self.method.load_checkpoint_state(resumed["method"])
        self.source.load_state_dict(resumed["streams"]["source"])
        self.target.load_state_dict(resumed["streams"]["target"])
        checkpoint.set_rng_state(resumed["rng"])
        self.start_step, self.picks, self.oracle = resumed["step"], resumed["picks"], resumed["oracle"]
        self.last_eval, self.last_ema_eval = resumed["last_eval"], resumed.get("last_ema_eval")
        self.train_time = resumed["train_time_s"]
        if self.ema is not None:
            self.ema.load_state_dict(resumed["ema"])
        log.info("resuming %s from step %d of %d", self.run_dir, self.start_step, self.max_steps)

    def state_at(self, step: int) -> dict:
        """Everything a checkpoint holds: enough to resume exactly, or to evaluate with `da-eval`."""
        return {
            "step": step,
            "method": self.method.checkpoint_state(),
            "streams": {"source": self.source.state_dict(), "target": self.target.state_dict()},
            "rng": checkpoint.rng_state(),
            "picks": self.picks,
            "oracle": self.oracle,
            "last_eval": self.last_eval,
            "last_ema_eval": self.last_ema_eval,
            "train_time_s": self.train_time,
            "world_size": self.world.size,  # a resumed run needs as many processes (its batches are split so)
            "ema": None if self.ema is None else self.ema.state_dict(),
            "selected_weights": "ema" if self.ema_select else "raw",  # the weights da-eval evaluates by default
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def step_context(self, step: int) -> StepContext:
        """Where training stands at `step`; sets the scheduled learning rate of every param group with an lr_mult."""
        cfg = self.cfg
        ctx = StepContext(step=step, max_steps=self.max_steps, progress=step / self.max_steps,
                          grl_lambda=grl_lambda(step, self.max_steps, cfg.grl),
                          lr=float(cfg.optim.lr) * lr_factor(step, self.max_steps, cfg.optim))
        for optimizer in self.method.optimizers.values():
            for group in optimizer.param_groups:
                if "lr_mult" in group:  # groups without it keep a constant lr of their own
                    group["lr"] = ctx.lr * group["lr_mult"]
        return ctx

    def next_batch(self) -> Batch:
        x_s, y_s = next(self.source)
        x_t_views = ()
        if self.target_views:  # the same target images again, once per level, each with its own draws
            (x_t, *x_t_views), y_t = self.target.next_views((self.augment or "none", *self.target_views))
        else:
            x_t, y_t = next(self.target)
        if self.channels_last:
            x_s, x_t, *x_t_views = (x.contiguous(memory_format=torch.channels_last) for x in (x_s, x_t, *x_t_views))
        # Target labels are dropped here for every UDA method; only an oracle may see them. The target
        # samples' dataset indices line per-sample results of a target pass up with the batch.
        return Batch(x_s=x_s, y_s=y_s, x_t=x_t, y_t=y_t if self.method.uses_target_labels else None,
                     x_t_views=tuple(x_t_views), idx_t=self.target.last_index)

    def train_step(self, ctx: StepContext) -> dict:
        """One step of the method on the next batch (after a pass over the whole target training set
        when the method asks for one); returns its terms."""
        if self.method.wants_target_pass(ctx):  # e.g. SHOT's pseudo-labels, every epoch of its stage 2
            target_pass(self.method, self.pair.target_train, int(self.cfg.trainer.eval_batch_size))
        batch = self.next_batch()
        # trainer.precision=bf16 | fp16: the step's forward passes in that dtype (Method.backward leaves autocast).
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            terms = self.method.step(batch, ctx)
        distributed.broadcast_buffers(self.method)  # several processes: BatchNorm statistics follow rank 0
        if self.ema is not None:
            self.ema.update()
        self.bar.update(1)
        self.loss_not_finite |= ~torch.isfinite(torch.as_tensor(terms["loss"]))
        return terms

    def stop_if_loss_not_finite(self, terms: dict, done: int) -> None:
        if distributed.any_rank(self.loss_not_finite):  # every rank stops together
            self.bar.close()
            if self.logger is not None:
                self.logger.close()
            cfg = self.cfg
            raise UserError(
                f"the training loss of method={cfg.method.name} was not finite (now {float(terms['loss'])}) "
                f"between steps {self.last_checked + 1} and {done}; stopping rather than training on garbage. Try a "
                f"lower optim.lr (now {cfg.optim.lr}) or a smaller grl.hi. checkpoints/last.pt keeps the last "
                f"state saved before it.")
        self.last_checked = done

    def log_training(self, terms: dict, ctx: StepContext, done: int) -> None:
        if not self.world.is_main:
            return
        # .item() waits for the device, so it happens only on logging steps.
        values = {k: float(v) for k, v in terms.items()}
        self.logger.scalars("train", {**values, "grl_lambda": ctx.grl_lambda, "lr": ctx.lr}, done)
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", lam=f"{ctx.grl_lambda:.2f}",
                             tgt_acc="-" if self.last_eval is None else f"{self.last_eval['target_acc']:.3f}",
                             refresh=False)

    def evaluate(self, done: int) -> None:
        """Evaluate (and the weight average, with trainer.ema), log it, update the validators' picks,
        best.pt and the oracle."""
        def record() -> dict:
            return {"step": done, **evaluate(self.method, self.validation_data, self.task, self.validator_names,
                                             int(self.cfg.trainer.eval_batch_size))}

        self.last_eval = record()
        if self.ema is not None:
            with self.ema.applied(self.method):
                self.last_ema_eval = record()
        self.logger.evaluation(self.last_eval, ema=self.last_ema_eval if self.ema is not None else None)
        chosen = self.last_ema_eval if self.ema_select else self.last_eval
        if self.select in update_picks(self.picks, chosen, self.validator_names, self.task.metric_names):
            checkpoint.save(self.state_at(done), self.best_path)
        primary = self.task.primary_metric  # target_acc; target_miou for segmentation
        if self.oracle is None or chosen[primary] > self.oracle.get(primary, float("-inf")):
            self.oracle = {"step": done, "target_acc": chosen["target_acc"], primary: chosen[primary]}
        for tag, images in self.task.evaluation_images(self.method, self.pair).items():
            self.logger.images(tag, images, done)  # segmentation: input, prediction, ground truth
        if self.draw_boundary:  # 2-D data: the decision boundary at every evaluation (a slider in TensorBoard)
            log_decision_boundary(self.method, self.pair, self.run_dir, self.logger, done, self.max_steps,
                                  self.cfg.method.name)

    def evaluate_and_save(self, done: int, evaluate_now: bool, save_now: bool) -> None:
        """Evaluation and/or last.pt, their time kept out of the training time (rank 0 only)."""
        if not self.world.is_main:
            return
        pause = time.perf_counter()
        if evaluate_now:
            self.evaluate(done)
        if save_now:
            self.train_time += pause - self.loop_start - self.outside_loop
            self.loop_start, self.outside_loop = time.perf_counter(), 0.0
            checkpoint.save(self.state_at(done), self.last_path)
        else:
            self.outside_loop += time.perf_counter() - pause

    def finish(self) -> dict:
        """The final report (rank 0); every rank returns its metrics."""
        self.bar.close()
        return distributed.from_main(self.report() if self.world.is_main else None)

    def report(self) -> dict:
        """The end-of-run analysis, metrics.json, the hparams row; returns the final metrics."""
        cfg, tcfg, task, picks, select = self.cfg, self.cfg.trainer, self.task, self.picks, self.select
        analysis = {}
        if tcfg.analysis and not task.feature_analysis:
            log.info("analysis: skipped, it applies to classification pairs (one label per sample)")
        elif tcfg.analysis:
            log.info("analysis: proxy A-distance, t-SNE of %d samples per domain, projector", int(tcfg.analysis_samples))
            analysis = run_analysis(self.method, self.pair, self.run_dir, self.logger, self.max_steps,
                                    int(tcfg.analysis_samples), int(tcfg.eval_batch_size), seed=int(cfg.seed))
        metrics = {
            "method": cfg.method.name,
            "data": self.pair.name,
            "uses_target_labels": self.method.uses_target_labels,  # true: an oracle, not a UDA result
            "setting": task.setting,  # closed | partial | open_set: which target metrics follow
            "target_metrics": list(task.metric_names),
            **self.last_eval,  # source_acc, target_acc and the setting's target metrics (+ per-head accuracies)
            # trainer.ema: the average's last evaluation; `selected_*` below are of the weights `select` looked at
            **({"ema": {k: v for k, v in self.last_ema_eval.items() if k != "step"}} if self.ema is not None else {}),
            "selected_weights": "ema" if self.ema_select else "raw",
            "selected_by": select,
            "selected_step": picks[select]["step"],
            "selected_source_acc": picks[select]["source_acc"],
            # selected_target_acc and the setting's other target metrics at the checkpoint chosen by `select`
            # (.get: a run resumed from a checkpoint older than a metric has none for picks made before)
            **{f"selected_{key}": picks[select].get(key) for key in task.metric_names},
            # For each validator: the evaluation it would choose and that checkpoint's target accuracy.
            "validators": picks,
            # The best target accuracy over all evaluations: chosen WITH target labels, for reference only.
            "oracle": {**self.oracle, "uses_target_labels": True},
            "train_time_s": round(self.train_time, 3),
            "train_steps_per_s": round(self.max_steps / self.train_time, 2) if self.train_time > 0 else None,
            "processes": self.world.size,  # torchrun / srun: the ranks that shared each batch
            **analysis,  # proxy_a_distance, target_ari
            "wall_time_s": round(time.perf_counter() - self.start_time, 3),
        }
        _write_json(self.run_dir / "metrics.json", metrics)
        hparam_keys = ("source_acc", "step", *task.metric_names, *(f"selected_{key}" for key in task.metric_names))
        self.logger.hparams(cfg, {k: metrics[k] for k in hparam_keys if metrics[k] is not None})
        self.logger.close()
        log.info("done: target_acc %.4f, source_acc %.4f, selected (by %s, step %d) target_acc %.4f -> %s",
                 metrics["target_acc"], metrics["source_acc"], select, metrics["selected_step"],
                 metrics["selected_target_acc"], self.run_dir)
        return metrics
