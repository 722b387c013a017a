"""Command-line entry points. `da-run` (= `python -m da_runner`) composes the config with Hydra and
calls `trainer.train`; tests and scripts call `train(cfg, run_dir)` directly.

`torchrun --nproc_per_node=N -m da_runner ...` (or `srun` with N tasks) trains one run on N processes
(da_runner/distributed.py): they agree on one run directory, and rank 0 alone writes to it.

Inside a sweep (`da-run -m ...`) every job is independent: a job that fails records its error in its
run directory (`status.json`) and the sweep goes on; re-running the sweep skips jobs that completed
and resumes unfinished ones from their last checkpoint.
"""

import json
import logging
import math
import os
import re
import sys
import traceback
from datetime import datetime
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from da_runner.config_tree import config_dir
from da_runner.errors import UserError
from da_runner.status import read_status, write_status
from da_runner.world import from_environment

log = logging.getLogger("da_runner")


def _threads_per_parallel_job(hydra_cfg) -> int | None:
    """CPU threads for each job when a launcher runs several jobs at once on this machine (joblib):
    the cores divided among the jobs, so that they do not oversubscribe the CPU (each torch process
    would otherwise start one thread per core). None for launchers that run one job per machine."""
    launcher = hydra_cfg.launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return None
    cpus = os.cpu_count() or 1
    n_jobs = int(launcher.get("n_jobs") or -1)
    parallel = n_jobs if n_jobs > 0 else max(1, cpus + 1 + n_jobs)  # joblib: -1 = all cores, -2 = all but one
    return max(1, cpus // parallel)


def _run_job(cfg: DictConfig, run_dir: Path, in_sweep: bool) -> float:
    # Imported here so that `da-run --help` answers without loading torch.
    from da_runner.config import validate
    from da_runner.nn.backbones import without_initial_weights
    from da_runner.trainer import train

    is_main = from_environment().is_main
    if not is_main:  # one of several processes: the other ranks report warnings and errors only
        log.setLevel(logging.WARNING)

    if in_sweep:
        if read_status(run_dir)["status"] == "completed":
            log.info("skipping %s: it completed before (delete its status.json to run it again)", run_dir)
            return json.loads((run_dir / "metrics.json").read_text())["selected_source_acc"]
        if (run_dir / "checkpoints" / "last.pt").is_file() and not cfg.resume:
            log.info("resuming the unfinished job in %s", run_dir)
            cfg.resume = True
        threads = _threads_per_parallel_job(HydraConfig.get())
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
            log.info("parallel jobs: %d CPU thread(s) for this one", threads)

    if not in_sweep:  # a bad value ends the run here, before its directory holds more than Hydra's files
        validate(without_initial_weights(cfg) if cfg.resume else cfg)
    if is_main:
        write_status(run_dir, "running")
    try:
        metrics = train(cfg, run_dir)
    except Exception as err:
        message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        if is_main:
            write_status(run_dir, "failed", error=message, traceback=traceback.format_exc())
        if not in_sweep:
            raise
        # The sweep goes on: the error is in this job's log and status.json, and in the sweep's report.
        log.error("job failed: %s", message)
        return math.nan
    if is_main:
        write_status(run_dir, "completed")
    # The value a Hydra sweeper optimises: a label-free criterion, never target accuracy.
    return metrics["selected_source_acc"]


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def run(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        return _run_job(cfg, Path(hydra_cfg.runtime.output_dir), in_sweep)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"da-run: error: {err}", file=sys.stderr)
        sys.exit(1)


class SweepReport(Callback):
    """At the end of `da-run -m ...`: the sweep's table (as `da-summarize` prints it) and the failed
    jobs with their errors; exit code 1 when any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from da_runner.summarize import collect, markdown, rows

        sweep_dir = Path(config.hydra.sweep.dir)
        groups = collect(sweep_dir) if sweep_dir.is_dir() else []
        if not groups:
            return
        log.info("sweep %s:\n%s", sweep_dir, markdown(rows(groups)))
        errors = [e for g in groups for e in g.errors]
        if errors:
            log.error("%d job(s) failed:\n  %s\n(re-running the same command retries them and skips the "
                      "completed ones)", len(errors), "\n  ".join(errors))
            sys.exit(1)


def _keys_help(*, _root_: DictConfig) -> str:
    """`${da.keys_help:}` in the --help template: every key of the composition being asked about, with its
    value, its rule and its documentation (da_runner/schema.py)."""
    from da_runner import schema

    return schema.help_text(_root_).replace("$", "$$")  # the template is a string.Template


def _join_processes() -> bool:
    """Under torchrun (or srun with several tasks) for one run: join the process group before Hydra
    starts, so that every rank writes to the run directory rank 0 chose (Hydra's default one is named by
    the clock, which the ranks read at different moments) and only rank 0 writes Hydra's own files
    there. Returns whether this process is one of several."""
    if from_environment().size == 1:
        return False
    from da_runner import distributed

    args = sys.argv[1:]
    if any(arg in ("-m", "--multirun") for arg in args):
        print("da-run: error: a sweep (-m) cannot run under torchrun or srun: each of its jobs would be trained "
              "by every process. Sweep with hydra/launcher=slurm_ddp instead, which starts one multi-process job "
              "per run (docs/distributed.md)", file=sys.stderr)
        sys.exit(1)
    world = distributed.init()
    if not any(arg.startswith("hydra.run.dir=") for arg in args):
        started = distributed.from_main(datetime.now())
        pattern = OmegaConf.to_container(OmegaConf.load(config_dir() / "config.yaml"))["hydra"]["run"]["dir"]
        run_dir = re.sub(r"\$\{now:([^}]*)\}", lambda match: started.strftime(match.group(1)), pattern)
        sys.argv.append(f"hydra.run.dir={run_dir}")
    if not world.is_main:  # no .hydra/ files and no log file of their own in rank 0's run directory
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    return True


def main() -> None:
    if not OmegaConf.has_resolver("da.keys_help"):
        OmegaConf.register_new_resolver("da.keys_help", _keys_help)
    several = _join_processes()
    succeeded = False
    try:
        run()
        succeeded = True
    finally:
        if several:
            from da_runner import distributed

            distributed.finish(succeeded)


if __name__ == "__main__":
    main()
