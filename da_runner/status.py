"""A run directory's status record, `status.json`: what a sweep reads to skip finished jobs, resume
unfinished ones and report failures.

    {"status": "running" | "completed" | "failed", "time": "...", "error": "..." (failed only)}
"""

import json
import os
import time
from pathlib import Path

STATUS_FILE = "status.json"


def write_status(run_dir: str | os.PathLike, status: str, **details) -> None:
    path = Path(run_dir) / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **details}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: str | os.PathLike) -> dict:
    """The run's status record. Run directories without one count as completed when they hold
    metrics.json (written only at the end of training), else as incomplete."""
    run_dir = Path(run_dir)
    path = run_dir / STATUS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"status": "completed" if (run_dir / "metrics.json").is_file() else "incomplete"}
