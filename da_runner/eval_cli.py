"""`da-eval ckpt=<path> [data=<pair>] [data.<key>=<value> ...] [out=<file.json>] [device=auto] [weights=auto]`

Evaluates a checkpoint on the held-out source split and the target test split of the pair it was
trained on (or of another pair, `data=...`): accuracy, per-class accuracy and the confusion matrix
(rows: true class, columns: predicted) of each, and the target metrics of the pair's setting
(docs/settings.md; an open-set pair's `unknown` is the last class), printed and written as JSON
(default: next to the checkpoint, `<run dir>/eval_<checkpoint>_<pair>.json`). A run trained with
`trainer.ema` holds two sets of weights: `weights=raw` evaluates the trained ones, `weights=ema`
their moving average, `weights=auto` (default) those the run selected by (`trainer.ema_select`).

    da-eval ckpt=outputs/2026-11-23/10-00-00_dann_embedded_digits/checkpoints/best.pt
    da-eval ckpt=.../best.pt data=mnist_mnistm data.root=/data
"""

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from da_runner.errors import UserError

USAGE = ("usage: da-eval ckpt=<path> [data=<pair>] [data.<key>=<value> ...] [out=<file.json>] [device=auto|cpu|cuda] "
         "[weights=auto|raw|ema]")
WEIGHTS = ("auto", "raw", "ema")


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """key=value arguments -> (options, data overrides)."""
    options, data_overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"arguments are key=value, got {arg!r}\n{USAGE}")
        if key == "data" or key.startswith("data."):
            data_overrides.append(arg)
        elif key in ("ckpt", "out", "device", "batch_size", "weights"):
            options[key] = value
        else:
            raise UserError(f"unknown argument {key!r}\n{USAGE}")
    if "ckpt" not in options:
        raise UserError(f"ckpt=<path> is required\n{USAGE}")
    if options.get("weights", "auto") not in WEIGHTS:
        raise UserError(f"weights must be one of {', '.join(WEIGHTS)}, got {options['weights']!r}")
    return options, data_overrides


def domain_report(method, domain, task, batch_size: int, target: bool = False) -> dict:
    """Accuracy, per-class accuracy and the confusion matrix of one split. On the target, predictions
    follow the pair's task (an open-set pair's `unknown` is one more row and column) and the report
    adds the setting's target metrics."""
    from da_runner.evaluation import outputs
    from da_runner.tasks import accuracy, confusion_matrix

    out = outputs(method, domain, batch_size)
    # The source holds only the source's classes: its predictions are the argmax over them.
    predicted = task.predict(out.logits) if target else task.predict_known(out.logits)
    class_names = task.class_names if target else task.label_space.class_names
    matrix = confusion_matrix(predicted.cpu(), out.labels.cpu(), len(class_names))
    per_class = matrix.diag().double() / matrix.sum(1).clamp_min(1).double()
    report = {"samples": len(domain), "accuracy": accuracy(predicted, out.labels),
              "class_names": list(class_names),
              "per_class_accuracy": [round(v, 6) for v in per_class.tolist()],
              "confusion_matrix": matrix.tolist()}
    if target:
        report["metrics"] = task.target_metrics(out.logits, out.labels)
    return report


def format_report(name: str, report: dict) -> str:
    matrix = report["confusion_matrix"]
    width = max(5, len(str(max(max(row) for row in matrix))) + 1)
    lines = [f"{name}: accuracy {report['accuracy']:.4f} on {report['samples']} samples",
             *(["  " + "  ".join(f"{key}: {value:.4f}" for key, value in report["metrics"].items())]
               if "metrics" in report else []),
             "  per-class accuracy: " + "  ".join(f"{c}:{a:.3f}" for c, a in enumerate(report["per_class_accuracy"])),
             "  confusion matrix (rows: true class, columns: predicted)",
             "  " + " " * 4 + "".join(f"{c:>{width}}" for c in range(len(matrix)))]
    lines += ["  " + f"{c:>4}" + "".join(f"{v:>{width}}" for v in row) for c, row in enumerate(matrix)]
    return "\n".join(lines)


def evaluate_checkpoint(ckpt: Path, data_overrides: list[str], device: str = "auto", batch_size: int = 1024,
                        weights: str = "auto") -> dict:
    from hydra import compose
    from hydra.errors import HydraException

    from da_runner import checkpoint
    from da_runner.config import resolve_device
    from da_runner.config_tree import initialize_configs
    from da_runner.data import build_pair
    from da_runner.ema import WeightAverage
    from da_runner.methods import build_method
    from da_runner.nn.backbones import without_initial_weights
    from da_runner.tasks import build_task

    state = checkpoint.load(ckpt)
    cfg = OmegaConf.create(state["config"])
    if data_overrides:
        # Compose the data group as `da-run data=... data.root=...` would.
        try:
            with initialize_configs():
                cfg.data = compose("config", overrides=data_overrides).data
        except HydraException as err:
            raise UserError(str(err).split("\nConfig search path")[0]) from err
    pair = build_pair(cfg.data).to(resolve_device(device))
    # The checkpoint holds every weight: no pretrained download or local weights file needed.
    method = build_method(without_initial_weights(cfg), pair.input_shape, pair.num_classes)
    try:
        method.load_checkpoint_state(state["method"])
    except RuntimeError as err:  # e.g. 3-channel weights on 1-channel data
        raise UserError(f"the checkpoint's model does not fit data={pair.name} (inputs {pair.input_shape}, "
                        f"{pair.num_classes} classes): {str(err).splitlines()[0]}") from err
    if weights == "auto":
        weights = state.get("selected_weights", "raw")
    if weights == "ema":
        if state.get("ema") is None:
            raise UserError(f"weights=ema: {ckpt} holds no weight average (the run had trainer.ema=null)")
        average = WeightAverage(method, state["ema"]["decay"])
        average.load_state_dict(state["ema"])
        method.load_state_dict(average.average)
    method.to(resolve_device(device))
    task = build_task(pair, cfg.data)
    return {
        "checkpoint": str(ckpt), "step": state["step"], "method": cfg.method.name, "data": pair.name,
        "setting": task.setting, "weights": weights,
        "source_val": domain_report(method, pair.source_val, task, batch_size),
        "target_test": domain_report(method, pair.target_test, task, batch_size, target=True),
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 1
    try:
        options, data_overrides = parse_args(argv)
        ckpt = Path(options["ckpt"])
        result = evaluate_checkpoint(ckpt, data_overrides, options.get("device", "auto"),
                                     int(options.get("batch_size", 1024)), options.get("weights", "auto"))
    except UserError as err:
        print(f"da-eval: error: {err}", file=sys.stderr)
        return 1
    print(f"{result['method']} checkpoint at step {result['step']} on {result['data']} ({result['weights']} weights)")
    print(format_report("source (held-out validation split)", result["source_val"]))
    print(format_report("target (test split)", result["target_test"]))
    out = Path(options["out"]) if "out" in options else ckpt.parent.parent / f"eval_{ckpt.stem}_{result['data']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
