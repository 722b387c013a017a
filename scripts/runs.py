"""Helpers shared by the benchmark scripts: which configuration a run directory belongs to."""

from pathlib import Path

import yaml

# Overrides that do not change what a run computes, or that vary within a group of repeats.
IGNORED = ("seed", "trainer.progress", "hydra.")


def overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []


def group_key(run_dir: Path) -> str:
    """The run's command-line overrides minus seed and display-only keys: runs with the same key are
    repeats of one configuration."""
    return " ".join(o for o in overrides(run_dir) if not o.startswith(IGNORED)) or "(defaults)"


def seed_of(run_dir: Path) -> str:
    return next((o.split("=", 1)[1] for o in overrides(run_dir) if o.startswith("seed=")), "0")
