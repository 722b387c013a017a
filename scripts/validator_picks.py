"""How far each label-free validator's checkpoint lands from the oracle, over the runs of a sweep.

For every configuration (the overrides minus seed, as da-summarize groups them): the target accuracy
of the checkpoint each validator chooses, the oracle (best target accuracy over the evaluations,
chosen with target labels), the final checkpoint, and the proxy A-distance, as mean ± std over seeds.

    python scripts/validator_picks.py multirun/embedded_validators
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from da_runner.summarize import _mean_std, _pm, find_runs, group_key
from da_runner.status import read_status
from da_runner.validators import VALIDATORS


def mean_std(values: list[float]) -> str:
    return _pm(*_mean_std(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    groups = defaultdict(list)
    for run_dir in find_runs(args.folder):
        if read_status(run_dir)["status"] == "completed":
            metrics = json.loads((run_dir / "metrics.json").read_text())
            if "validators" in metrics:
                groups[group_key(run_dir)].append(metrics)

    columns = ["final", *VALIDATORS, "oracle"]
    print("Target accuracy of the checkpoint chosen by each criterion (mean ± std over seeds):\n")
    print("| configuration | n | " + " | ".join(columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    for key, runs in sorted(groups.items()):
        cells = [mean_std([m["target_acc"] for m in runs])]
        cells += [mean_std([m["validators"][v]["target_acc"] for m in runs if v in m["validators"]]) for v in VALIDATORS]
        cells.append(mean_std([m["oracle"]["target_acc"] for m in runs]))
        print(f"| {key} | {len(runs)} | " + " | ".join(cells) + " |")

    print("\nGap to the oracle in points (oracle - chosen; mean over seeds):\n")
    print("| configuration | " + " | ".join(VALIDATORS) + " |")
    print("| --- |" + " --- |" * len(VALIDATORS))
    for key, runs in sorted(groups.items()):
        gaps = []
        for v in VALIDATORS:
            values = [100 * (m["oracle"]["target_acc"] - m["validators"][v]["target_acc"])
                      for m in runs if v in m["validators"]]
            gaps.append(f"{statistics.mean(values):.1f}" if values else "-")
        print(f"| {key} | " + " | ".join(gaps) + " |")

    print("\nProxy A-distance of the final features (mean ± std over seeds):\n")
    print("| configuration | proxy A-distance | target ARI |")
    print("| --- | --- | --- |")
    for key, runs in sorted(groups.items()):
        pad = [m["proxy_a_distance"] for m in runs if "proxy_a_distance" in m]
        ari = [m["target_ari"] for m in runs if "target_ari" in m]
        print(f"| {key} | {mean_std(pad)} | {mean_std(ari)} |")


if __name__ == "__main__":
    main()
