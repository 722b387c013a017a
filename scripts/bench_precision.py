"""Training steps/s of the runner in float32, bfloat16 autocast, and bfloat16 with channels_last.

Each repeat trains the same configuration once per setting, one after another (so every setting sees
the same machine state), and reads `train_steps_per_s` from metrics.json (evaluation and
checkpointing excluded). Prints each setting's steps/s per repeat and the median of the per-repeat
ratios to float32.

    python scripts/bench_precision.py                                  # DANN on the embedded pair
    python scripts/bench_precision.py experiment=digits_mnistm method=cdan --steps 400 --repeats 3
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from hydra import compose

from da_runner.config_tree import initialize_configs
from da_runner.trainer import train

SETTINGS = {
    "fp32": ["trainer.precision=fp32", "trainer.channels_last=false"],
    "bf16": ["trainer.precision=bf16", "trainer.channels_last=false"],
    "bf16 + channels_last": ["trainer.precision=bf16", "trainer.channels_last=true"],
}


def steps_per_s(overrides: list[str], steps: int) -> float:
    with initialize_configs():
        cfg = compose("config", overrides=[*overrides, f"trainer.max_steps={steps}", f"trainer.eval_every={steps}",
                                           f"trainer.ckpt_every={steps}", "trainer.progress=false",
                                           "trainer.analysis=false"])
    with tempfile.TemporaryDirectory() as run_dir:
        train(cfg, run_dir)
        return json.loads((Path(run_dir) / "metrics.json").read_text())["train_steps_per_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="da-run overrides, e.g. method=cdan")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    results = {name: [] for name in SETTINGS}
    for repeat in range(args.repeats):
        for name, setting in SETTINGS.items():
            results[name].append(steps_per_s([*args.overrides, *setting], args.steps))
            print(f"repeat {repeat + 1}: {name}: {results[name][-1]:.1f} steps/s", flush=True)
    print(f"\n{' '.join(args.overrides) or 'default run'}, {args.steps} steps, {args.repeats} repeats")
    print("| setting | steps/s per repeat | / fp32 (median) |\n| --- | --- | --- |")
    for name, values in results.items():
        ratio = statistics.median(v / f for v, f in zip(values, results["fp32"]))
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
