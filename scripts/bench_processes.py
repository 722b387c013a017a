"""Training steps/s of one run on 1 process and on N processes (torchrun), same global batch.

    python scripts/bench_processes.py [--nproc 2] [--steps 300] [--repeats 3] [-- da-run overrides...]

Each configuration runs `--repeats` times, alternating, and reports the median of the runner's own
`train_steps_per_s` (metrics.json: training time without evaluation and checkpoints). Threads: one
process gets every core (OMP_NUM_THREADS = cores), N processes get cores / N each, so both use the
whole machine. On a CPU the comparison says what splitting a batch over processes costs or gains
against intra-op threading; on N GPUs it measures the scaling that matters.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(nproc: int, threads: int, steps: int, overrides: list[str], run_dir: Path) -> float:
    common = [f"trainer.max_steps={steps}", f"trainer.eval_every={steps}", f"trainer.ckpt_every={steps}",
              "trainer.analysis=false", "trainer.progress=false", f"hydra.run.dir={run_dir}", *overrides]
    if nproc == 1:
        command = [sys.executable, "-m", "da_runner", *common]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "-m", "da_runner",
                   *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, env=env, check=True, capture_output=True)
    return json.loads((run_dir / "metrics.json").read_text())["train_steps_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="da-run overrides (after --)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    configs = {1: cores, args.nproc: max(1, cores // args.nproc)}
    rates: dict[int, list[float]] = {n: [] for n in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for nproc, threads in configs.items():
                rate = run(nproc, threads, args.steps, args.overrides, Path(tmp) / f"{nproc}_{repeat}")
                rates[nproc].append(rate)
                print(f"repeat {repeat}: {nproc} process(es) x {threads} thread(s): {rate:.2f} steps/s", flush=True)
    base = statistics.median(rates[1])
    for nproc, threads in configs.items():
        median = statistics.median(rates[nproc])
        print(f"{nproc} process(es) x {threads} thread(s): median {median:.2f} steps/s "
              f"({', '.join(f'{r:.2f}' for r in rates[nproc])}); {median / base:.2f}x one process")


if __name__ == "__main__":
    main()
