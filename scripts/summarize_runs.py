"""Mean ± std over seeds of the runs under a folder (e.g. a `da-run -m ...` sweep directory).

Runs are grouped by their command-line overrides minus `seed` (and display-only keys); each group
reports final target accuracy, the target accuracy of the checkpoint chosen by source validation
accuracy (no target labels), and minutes per run.

    python scripts/summarize_runs.py multirun/2026-11-23/10-00-00
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from runs import group_key, seed_of


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    groups = defaultdict(list)
    for metrics_path in sorted(args.folder.rglob("metrics.json")):
        run_dir = metrics_path.parent
        groups[group_key(run_dir)].append((seed_of(run_dir), json.loads(metrics_path.read_text())))
    print("| configuration | n | seeds | target acc (final) | target acc (selected by source val) | minutes/run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key, runs in sorted(groups.items()):
        if any(m.get("uses_target_labels") for _, m in runs):
            key += " **(oracle: trained on target labels, not UDA)**"
        final = [m["target_acc"] for _, m in runs]
        selected = [m["selected_target_acc"] for _, m in runs]
        minutes = [m["wall_time_s"] / 60 for _, m in runs]
        seeds = ",".join(s for s, _ in runs)
        print(f"| {key} | {len(runs)} | {seeds} | {mean_std(final)} | {mean_std(selected)} | "
              f"{statistics.median(minutes):.1f} |")


if __name__ == "__main__":
    main()
