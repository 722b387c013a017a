"""Target accuracy against training steps, from the metrics.jsonl of the runs under a folder.

Groups runs like da-summarize (overrides minus seed), averages over seeds at each evaluated
step, prints a Markdown table and, with --plot, writes a PNG.

    python scripts/accuracy_vs_steps.py multirun/mnistm --plot docs/mnistm_accuracy_vs_steps.png
"""

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from da_runner.summarize import group_key


def load_curves(folder: Path) -> dict[str, dict[int, list[float]]]:
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for history in sorted(folder.rglob("metrics.jsonl")):
        key = group_key(history.parent)
        for line in history.read_text().splitlines():
            record = json.loads(line)
            curves[key][record["step"]].append(record["target_acc"])
    return curves


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--plot", type=Path, help="write a PNG of the curves here")
    parser.add_argument("--reference", type=float, action="append", default=[],
                        help="draw a horizontal line at this accuracy (a published number); repeatable")
    parser.add_argument("--reference-label", action="append", default=[], help="the legend entry of each --reference")
    args = parser.parse_args()
    curves = load_curves(args.folder)
    keys = sorted(curves)
    steps = sorted({s for key in keys for s in curves[key]})
    print("| step | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for step in steps:
        cells = []
        for key in keys:
            values = curves[key].get(step, [])
            cells.append(f"{statistics.mean(values):.4f} (n={len(values)})" if values else "")
        print(f"| {step} | " + " | ".join(cells) + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in keys:
            xs = sorted(curves[key])
            line, = ax.plot(xs, [statistics.mean(curves[key][x]) for x in xs], marker="o", markersize=3,
                            label=f"{key} (mean of {max(len(v) for v in curves[key].values())})")
            runs = max(len(v) for v in curves[key].values())
            for i in range(runs if runs > 1 else 0):  # each run, thin, in the mean's colour
                ax.plot([x for x in xs if len(curves[key][x]) > i], [curves[key][x][i] for x in xs if len(curves[key][x]) > i],
                        color=line.get_color(), alpha=0.3, linewidth=0.8)
        for i, value in enumerate(args.reference):
            label = args.reference_label[i] if i < len(args.reference_label) else f"reference {value}"
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel("target test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
