"""`da-summarize <sweep dir>`: one row per configuration of a sweep, mean ± std over its seeds.

A configuration is a job's command-line overrides minus `seed` and keys that do not change what is
trained (`trainer.progress`, `trainer.analysis`, `sweep=...`). Each row counts the completed runs (n), the failed and
the incomplete ones (still running, killed, or never started past Hydra's setup), and reports final
target accuracy and the target accuracy of the checkpoint chosen without target labels (mean ± std
over the completed seeds), the step budget and minutes per run. Works on a sweep that is still
running or partly failed. Runs of partial or open-set pairs (or any that report more target metrics
than accuracy: `target_metrics` in metrics.json) add a final and a selected column per metric: mean
per-class accuracy; OS, OS*, UNK, H-score. Prints the table and writes `summary.md` and `summary.csv`
into the folder.
"""

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from da_runner.status import read_status

# Overrides that do not change what a run computes, or that vary within a group of repeats.
IGNORED_OVERRIDES = ("seed=", "trainer.progress=", "trainer.analysis=", "sweep=", "hydra.", "resume=")


def overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []


def group_key(run_dir: Path) -> str:
    """The run's overrides minus seed and display-only keys: runs with the same key are repeats of
    one configuration."""
    return " ".join(o for o in overrides(run_dir) if not o.lstrip("+~").startswith(IGNORED_OVERRIDES)) or "(defaults)"


def find_runs(folder: Path) -> list[Path]:
    """Every run directory under folder (a directory Hydra set up: it has .hydra/overrides.yaml)."""
    return sorted(p.parent.parent for p in folder.rglob(".hydra/overrides.yaml"))


@dataclass
class Group:
    key: str
    seeds: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    failed: int = 0
    incomplete: int = 0
    errors: list[str] = field(default_factory=list)


def _seed(run_dir: Path) -> int:
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()) or {}
    return int(config.get("seed", 0))


def collect(folder: Path) -> list[Group]:
    groups: dict[str, Group] = {}
    for run_dir in find_runs(folder):
        key = group_key(run_dir)
        group = groups.setdefault(key, Group(key))
        status = read_status(run_dir)
        if status["status"] == "completed":
            group.seeds.append(_seed(run_dir))
            group.metrics.append(json.loads((run_dir / "metrics.json").read_text()))
        elif status["status"] == "failed":
            group.failed += 1
            group.errors.append(f"{run_dir.name}: {status.get('error', '?')}")
        else:
            group.incomplete += 1
    return [groups[k] for k in sorted(groups)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def setting_metrics(groups: list[Group]) -> list[str]:
    """The target metrics the runs report beside target_acc (their setting's: mean per-class accuracy;
    OS, OS*, UNK, H-score), in the order the runs list them."""
    names = (key for g in groups for m in g.metrics for key in m.get("target_metrics", ()))
    return [key for key in dict.fromkeys(names) if key != "target_acc"]


def rows(groups: list[Group]) -> list[dict]:
    extra = setting_metrics(groups)
    table = []
    for g in groups:
        final = _mean_std([m["target_acc"] for m in g.metrics])
        selected = _mean_std([m["selected_target_acc"] for m in g.metrics])
        minutes = [m["wall_time_s"] / 60 for m in g.metrics]
        oracle = any(m.get("uses_target_labels") for m in g.metrics)
        table.append({
            "configuration": g.key + (" (oracle: trained on target labels, not UDA)" if oracle else ""),
            "n": len(g.metrics),
            "failed": g.failed,
            "incomplete": g.incomplete,
            "seeds": ",".join(str(s) for s in sorted(g.seeds)),
            "steps": ",".join(str(s) for s in sorted({m["step"] for m in g.metrics})),
            "target_acc_mean": final[0], "target_acc_std": final[1],
            "selected_target_acc_mean": selected[0], "selected_target_acc_std": selected[1],
            "selected_by": ",".join(sorted({m["selected_by"] for m in g.metrics})),
            "minutes_per_run": statistics.median(minutes) if minutes else math.nan,
        })
        for key in extra:  # runs of another setting do not report the metric: left out of its mean
            for prefix in ("", "selected_"):
                mean, std = _mean_std([m[prefix + key] for m in g.metrics if m.get(prefix + key) is not None])
                table[-1].update({f"{prefix}{key}_mean": mean, f"{prefix}{key}_std": std})
    return table


def _pm(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def markdown(table: list[dict], extra: list[str] = ()) -> str:
    """The table; `extra`: the setting metrics (setting_metrics) as final and selected columns."""
    extra_header = "".join(f" | {key} (final) | {key} (selected)" for key in extra)
    lines = ["| configuration | n | failed | incomplete | seeds | steps | target acc (final) "
             "| target acc (selected, no target labels) | selected by | minutes/run" + extra_header + " |",
             "| --- " * (10 + 2 * len(extra)) + "|"]
    for r in table:
        minutes = "-" if math.isnan(r["minutes_per_run"]) else f"{r['minutes_per_run']:.1f}"
        extra_cells = "".join(f" | {_pm(r[f'{prefix}{key}_mean'], r[f'{prefix}{key}_std'])}"
                              for key in extra for prefix in ("", "selected_"))
        lines.append(f"| {r['configuration']} | {r['n']} | {r['failed']} | {r['incomplete']} | {r['seeds'] or '-'} "
                     f"| {r['steps'] or '-'} | {_pm(r['target_acc_mean'], r['target_acc_std'])} "
                     f"| {_pm(r['selected_target_acc_mean'], r['selected_target_acc_std'])} "
                     f"| {r['selected_by'] or '-'} | {minutes}{extra_cells} |")
    return "\n".join(lines) + "\n"


def method_by_pair(groups: list[Group]) -> str:
    """The benchmark layout of docs/benchmarks.md: one row per method, two columns per data pair
    (final target accuracy; target accuracy of the checkpoint chosen without target labels), each
    mean ± std over the completed seeds with their count. Configurations that differ in more than
    the method and the pair are pooled, so use it on sweeps like `sweep=digits_table`."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for g in groups:
        for m in g.metrics:
            cells.setdefault((m.get("method", "?"), m.get("data", "?")), []).append(m)
    methods = list(dict.fromkeys(method for method, _ in cells))
    pairs = sorted({pair for _, pair in cells})
    header = "| method | " + " | ".join(f"{p}: final | {p}: selected" for p in pairs) + " |"
    lines = [header, "| --- |" + " --- | --- |" * len(pairs)]
    for method in methods:
        row = [method + (" (target labels)" if any(m.get("uses_target_labels") for p in pairs
                                                    for m in cells.get((method, p), [])) else "")]
        for pair in pairs:
            runs = cells.get((method, pair), [])
            for key in ("target_acc", "selected_target_acc"):
                row.append(f"{_pm(*_mean_std([m[key] for m in runs]))} ({len(runs)})" if runs else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["configuration"])
        writer.writeheader()
        writer.writerows(table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="da-summarize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a sweep directory (or any folder holding run directories)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write summary.md and summary.csv (default: the folder itself)")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        print(f"da-summarize: error: {args.folder} is not a directory", file=sys.stderr)
        return 1
    groups = collect(args.folder)
    if not groups:
        print(f"da-summarize: error: no run directories (with .hydra/overrides.yaml) under {args.folder}",
              file=sys.stderr)
        return 1
    table = rows(groups)
    text = markdown(table, setting_metrics(groups))
    if len({m.get("method") for g in groups for m in g.metrics}) > 1:
        text += "\nBy method and pair (mean ± std (seeds); selected: without target labels):\n\n" + method_by_pair(groups)
    print(text, end="")
    for g in groups:
        for error in g.errors:
            print(f"failed: {error}")
    out = args.out or args.folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    write_csv(table, out / "summary.csv")
    print(f"written: {out / 'summary.md'}, {out / 'summary.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
