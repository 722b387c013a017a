"""Run a list of `da-run` jobs, several at a time, each in its own run directory.

    python scripts/run_queue.py JOBS.txt --out runs/table --parallel 8 [--deadline 3600]

JOBS.txt has one job per line: a name (the run directory under --out) followed by `da-run`
overrides, e.g. `mnistm/dann/s0 experiment=dann_mnist_mnistm_paper seed=0`; `#` starts a comment.
Jobs whose run directory already holds metrics.json are skipped, so re-running the command
continues an interrupted queue. Jobs start in file order; with --deadline, none starts after
that many seconds and running ones are stopped at it (their run directories stay, unfinished).
One GPU runs many small digit jobs at once faster than one after another (each job alone leaves
it mostly idle); on a CPU, give each job its share of the cores with OMP_NUM_THREADS.
"""

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def read_jobs(path: Path) -> list[tuple[str, list[str]]]:
    jobs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, *overrides = shlex.split(line)
            jobs.append((name, overrides))
    return jobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no job starts and running ones stop")
    args = parser.parse_args(argv)

    start = time.monotonic()
    pending = [(n, o) for n, o in read_jobs(args.jobs) if not (args.out / n / "metrics.json").is_file()]
    running: dict[str, subprocess.Popen] = {}
    failed = []
    print(f"{len(pending)} jobs to run, {args.parallel} at a time", flush=True)
    while pending or running:
        out_of_time = args.deadline is not None and time.monotonic() - start > args.deadline
        while pending and len(running) < args.parallel and not out_of_time:
            name, overrides = pending.pop(0)
            run_dir = args.out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "da_runner", *overrides, f"hydra.run.dir={run_dir}",
                       "trainer.progress=false"]
            with open(run_dir / "queue.log", "w") as log:
                running[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if out_of_time:
            for name, process in running.items():
                process.terminate()
                print(f"stopped at the deadline: {name}", flush=True)
            print(f"not started: {len(pending)} jobs", flush=True)
            return 1
        time.sleep(1)
        for name, process in list(running.items()):
            if process.poll() is not None:
                del running[name]
                elapsed = time.monotonic() - start
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                if process.returncode:
                    failed.append(name)
                print(f"[{elapsed:7.0f}s] {status}: {name}", flush=True)
    print(f"all jobs ended; {len(failed)} failed: {' '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
