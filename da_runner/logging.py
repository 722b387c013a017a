"""Run outputs: TensorBoard event files and the per-evaluation history `metrics.jsonl`.

Tags have one namespace per phase: `train/...` for training terms, `eval/...` for evaluations,
`data/...` for sample images; the hparams dashboard gets one row per run.
"""

import json
from pathlib import Path

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from da_runner.config import flatten


class RunLogger:
    def __init__(self, run_dir: Path, start_step: int = 0):
        self.run_dir = Path(run_dir)
        # purge_step hides events that a crashed run wrote after its last checkpoint.
        self.writer = SummaryWriter(str(self.run_dir), purge_step=start_step + 1 if start_step else None)
        self.history_path = self.run_dir / "metrics.jsonl"
        self._truncate_history(start_step)

    def _truncate_history(self, start_step: int) -> None:
        """Drop evaluations past the checkpoint we resume from: they will be recomputed."""
        if not self.history_path.exists():
            return
        if start_step == 0:
            self.history_path.unlink()
            return
        kept = [line for line in self.history_path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step]
        self.history_path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def evaluation(self, record: dict, ema: dict | None = None) -> None:
        """One evaluation: eval/* scalars and a line of metrics.jsonl; `ema`, the evaluation of the
        weight average (trainer.ema), goes to eval_ema/* and the line's "ema" entry."""
        self.scalars("eval", {k: v for k, v in record.items() if k != "step"}, record["step"])
        line = dict(record)
        if ema is not None:
            line["ema"] = {k: v for k, v in ema.items() if k != "step"}
            self.scalars("eval_ema", line["ema"], record["step"])
        with self.history_path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        self.writer.flush()

    def images(self, tag: str, images, step: int = 0) -> None:
        from torchvision.utils import make_grid

        self.writer.add_image(tag, make_grid(images.detach().cpu(), nrow=8), step)

    def figure(self, tag: str, fig, step: int) -> None:
        """A matplotlib figure as an image (TensorBoard's Images tab); the figure is closed."""
        self.writer.add_figure(tag, fig, step, close=True)

    def hparams(self, cfg, metrics: dict[str, float]) -> None:
        """One row in TensorBoard's hparams tab: every scalar option of the config + final metrics.

        Written into the run's own event file (not a timestamped sub-run as add_hparams does), so
        `tensorboard --logdir <sweep>` lists each run once, under its own directory name.
        """
        options = flatten_scalars(OmegaConf.to_container(cfg, resolve=True))
        metric_tags = {f"hparam/{k}": float(v) for k, v in metrics.items()}
        for summary in hparams(options, metric_tags):
            self.writer.file_writer.add_summary(summary)
        step = int(metrics.get("step", 0))
        for tag, value in metric_tags.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def flatten_scalars(tree: dict) -> dict:
    """Dotted keys -> values TensorBoard's hparams accept (lists and None become strings)."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flatten(tree).items()}
