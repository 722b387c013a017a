"""One run on two processes (gloo, CPU): torchrun through the installed CLI, and spawned ranks that call
`train` directly. A run on two processes must end where one process fed the same global batches ends."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TINY_TOY, Crash, load_ckpt, make_cfg, read_metrics, run_cli
from da_runner import distributed
from da_runner.data.domain import EpochOrder
from da_runner.errors import UserError
from da_runner.trainer import train

# No dropout and no BatchNorm anywhere, and no loss that mixes a batch's samples (MCD's class-balance
# term does): then the mean of two half-batch gradients is exactly the full batch's gradient.
PLAIN_TOY = [*TINY_TOY, "trainer.max_steps=12", "trainer.eval_every=6", "trainer.ckpt_every=6"]
PLAIN_MCD = ["method=mcd", "backbone.label_head_batch_norm=false", "backbone.label_head_dropout=0",
             "method.balance_weight=0"]


def torchrun(args, cwd, nproc=2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(free_port()), "-m", "da_runner", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_weight_difference(run_a, run_b) -> float:
    a = load_ckpt(run_a / "checkpoints" / "last.pt")["method"]["modules"]
    b = load_ckpt(run_b / "checkpoints" / "last.pt")["method"]["modules"]
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("method", [["method=dann"], PLAIN_MCD], ids=["dann", "mcd"])
def test_two_processes_match_one_process_fed_the_same_global_batches(tmp_path, method):
    args = [*PLAIN_TOY, *method]
    result = torchrun([*args, f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    one = train(make_cfg(*args), tmp_path / "one")
    two = read_metrics(tmp_path / "two")
    assert two["processes"] == 2 and one["processes"] == 1
    assert max_weight_difference(tmp_path / "one", tmp_path / "two") < 1e-5
    for key in ("target_acc", "source_acc", "selected_step"):
        assert two[key] == one[key]
    assert abs(two["entropy"] - one["entropy"]) < 1e-5


def test_rank_zero_alone_writes_into_one_run_directory(tmp_path):
    """Without hydra.run.dir the ranks still share one run directory (named by rank 0's clock), with one
    TensorBoard file, one .hydra/ and one log."""
    result = torchrun([*PLAIN_TOY, "trainer.max_steps=4"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = [d for day in (tmp_path / "outputs").iterdir() for d in day.iterdir()]
    assert len(run_dirs) == 1, run_dirs
    names = {p.name for p in run_dirs[0].iterdir()}
    events = {name for name in names if name.startswith("events.out.tfevents")}
    assert len(events) == 1, names
    assert names - events == {".hydra", "checkpoints", "cli.log", "metrics.json", "metrics.jsonl", "status.json"}
    assert sorted(p.name for p in (run_dirs[0] / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert read_metrics(run_dirs[0])["processes"] == 2


def test_a_sweep_job_of_two_tasks_trains_one_run_on_two_processes(tmp_path):
    """What hydra/launcher=slurm_ddp does on a cluster, on this machine: submitit's local executor starts
    the job's two tasks, each one rank of the run (the same launcher code, SUBMITIT_LOCAL_* for SLURM_*)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [*PLAIN_TOY, "method=dann"]
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                      f"hydra.sweep.dir={tmp_path / 'sweep'}", *args], cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    (job,) = [d for d in (tmp_path / "sweep").iterdir() if (d / "metrics.json").is_file()]
    assert read_metrics(job)["processes"] == 2
    train(make_cfg(*args), tmp_path / "one")
    assert max_weight_difference(tmp_path / "one", job) < 1e-5


def test_a_sweep_under_torchrun_is_refused_with_a_pointer(tmp_path):
    result = run_cli(["-m", "seed=0,1"], cwd=tmp_path, env_extra={"RANK": "0", "WORLD_SIZE": "2"})
    assert result.returncode == 1
    assert "hydra/launcher=slurm_ddp" in result.stderr and "Traceback" not in result.stderr


# --- ranks spawned here, each calling train() (what torchrun's processes run, with a crash injected) ---

def _rank(rank: int, port: int, runs: list, errors) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from da_runner.methods import METHODS

    succeeded = False
    try:
        for args, run_dir, crash_at in runs:
            if crash_at is not None:
                original = METHODS["dann"].step

                def crashing(self, batch, ctx, original=original):
                    if ctx.step == crash_at:
                        raise Crash
                    return original(self, batch, ctx)

                METHODS["dann"].step = crashing
                try:
                    train(make_cfg(*args), run_dir)
                except Crash:
                    pass
                finally:
                    METHODS["dann"].step = original
            else:
                train(make_cfg(*args), run_dir)
        succeeded = True
    except UserError as err:
        errors.put((rank, str(err)))
    finally:
        distributed.finish(succeeded)


def spawn_two(runs) -> list:
    """Train `runs` ([(overrides, run_dir, step at which dann's step crashes or None), ...]) in order on
    two spawned ranks; returns the UserErrors they raised as (rank, message)."""
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(free_port(), runs, errors), nprocs=2, join=True)
    found = []
    while not errors.empty():
        found.append(errors.get())
    return found


def test_a_two_process_run_resumes_exactly(tmp_path):
    args = [*PLAIN_TOY, "method=dann"]
    crashed = tmp_path / "crashed"
    assert spawn_two([(args, tmp_path / "full", None), (args, crashed, 8), ([*args, "resume=true"], crashed, None)]) == []
    assert load_ckpt(crashed / "checkpoints" / "last.pt")["world_size"] == 2
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(crashed)
    for key in ("target_acc", "source_acc", "entropy", "step"):
        assert resumed[key] == full[key]
    assert max_weight_difference(tmp_path / "full", crashed) == 0.0


def test_resume_needs_as_many_processes_and_batches_must_split(tmp_path):
    train(make_cfg(*PLAIN_TOY, "trainer.max_steps=6"), tmp_path / "one")
    errors = spawn_two([([*PLAIN_TOY, "trainer.max_steps=6", "resume=true"], tmp_path / "one", None)])
    assert {rank for rank, _ in errors} == {0, 1}
    assert "written by a run on 1 process(es); resume it on as many (this one has 2)" in errors[0][1]
    errors = spawn_two([([*PLAIN_TOY, "trainer.batch_size=15"], tmp_path / "odd", None)])
    assert "trainer.batch_size=15 (per domain, over all processes) does not split evenly over 2 processes" in errors[0][1]
    errors = spawn_two([([*PLAIN_TOY, "trainer.sync_bn=true"], tmp_path / "sync", None)])
    assert "trainer.sync_bn=true needs GPUs" in errors[0][1]


def _every_method_rank(rank: int, port: int, runs: list, digests) -> None:
    """Train every run of `runs` on this rank; put (rank, method, digest of the final weights) in `digests`."""
    from da_runner.trainer import Run

    finish = Run.finish

    def finish_and_record(self):
        state = self.method.state_dict()
        digest = [round(float(v.double().sum()), 9) for v in state.values() if v.is_floating_point()]
        digests.put((rank, self.cfg.method.name, digest))
        return finish(self)

    Run.finish = finish_and_record
    _rank(rank, port, runs, digests)


def test_every_method_trains_on_two_processes_with_the_ranks_in_step(tmp_path):
    """Multi-optimizer (MCD, MDD, ADDA's stages, VADA's discriminator), BatchNorm, dropout and
    target-pass (SHOT) methods alike: after training, both ranks hold the same weights and statistics."""
    from conftest import TINY_DIGITS, classification_methods
    from test_methods import SHORT_RUN_OPTIONS

    names = [name for name in classification_methods() if name != "dirt_t"]  # DIRT-T starts from a VADA run
    runs = [([*TINY_DIGITS, f"method={name}", *SHORT_RUN_OPTIONS.get(name, []), "trainer.max_steps=4",
              "trainer.eval_every=4"], tmp_path / name, None) for name in names]
    digests = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_every_method_rank, args=(free_port(), runs, digests), nprocs=2, join=True)
    found = {}
    while not digests.empty():
        rank, name, digest = digests.get()
        found.setdefault(name, {})[rank] = digest
    assert sorted(found) == sorted(names)
    for name, by_rank in found.items():
        assert by_rank[0] == by_rank[1], name
        assert read_metrics(tmp_path / name)["processes"] == 2


def _finishing_rank(rank: int, port: int, times) -> None:
    """Join a two-rank group, let rank 0 arrive late at `finish`, and record when each rank left it."""
    import time

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    distributed.init()
    if rank == 0:
        time.sleep(1.0)  # rank 0 still evaluating and writing while rank 1 is done
    arrived = time.time()
    distributed.finish(succeeded=True)
    times.put((rank, arrived, time.time(), torch.distributed.is_initialized()))


def test_after_a_run_every_rank_waits_for_the_others_before_leaving_the_group():
    times = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_finishing_rank, args=(free_port(), times), nprocs=2, join=True)
    found = {}
    while not times.empty():
        rank, arrived, left, still_in_group = times.get()
        found[rank] = (arrived, left, still_in_group)
    assert sorted(found) == [0, 1]
    assert found[1][1] >= found[0][0]  # rank 1 left only once rank 0 had arrived
    assert not found[0][2] and not found[1][2]


# --- pieces ---

def test_shards_of_a_batch_are_its_rows_in_rank_order_with_their_positions():
    one = EpochOrder(10, 4, seed=3)
    shards = [EpochOrder(10, 4, seed=3) for _ in range(2)]
    for rank, order in enumerate(shards):
        order.shard(rank, 2)
    for _ in range(5):  # across an epoch boundary (10 samples, batches of 4: two per epoch)
        index, epoch, start = one.next_batch()
        parts = [order.next_batch() for order in shards]
        assert torch.equal(torch.cat([p[0] for p in parts]), index)
        assert [(p[1], p[2]) for p in parts] == [(epoch, start), (epoch, start + 2)]
    copy = shards[1].copy()
    assert torch.equal(copy.next_batch()[0], shards[1].next_batch()[0])
    with pytest.raises(ValueError, match="does not split into 3 equal shares"):
        EpochOrder(10, 4, seed=0).shard(0, 3)


def test_the_world_is_read_from_torchrun_or_slurm():
    assert distributed.from_environment({}) == distributed.World(0, 1, 0)
    assert distributed.from_environment({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == distributed.World(3, 4, 1)
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"}
    assert distributed.from_environment(slurm) == distributed.World(5, 8, 1)
    assert distributed.from_environment({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}).size == 1
    # a batch script of an 8-task allocation that runs da-run itself, without srun: one process
    assert distributed.from_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).size == 1
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_LOCALID": "1"}
    assert distributed.from_environment(local) == distributed.World(1, 2, 1)


def test_sync_batch_norm_keeps_the_parameters_the_optimizer_holds():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = list(net.parameters())
    converted = distributed.use_sync_batch_norm(net)
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)
    assert all(a is b for a, b in zip(params, converted.parameters()))
