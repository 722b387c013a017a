"""Command-line entry points. `da-run` (= `python -m da_runner`) composes the config with Hydra and
calls `trainer.train`; tests and scripts call `train(cfg, run_dir)` directly."""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from da_runner.errors import UserError


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def run(cfg: DictConfig) -> float:
    from da_runner.trainer import train  # imported here so `da-run --help` answers without loading torch

    try:
        metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"da-run: error: {err}", file=sys.stderr)
        sys.exit(1)
    # The value a Hydra sweeper optimises: a label-free criterion, never target accuracy.
    return metrics["selected_source_acc"]


def main() -> None:
    run()


if __name__ == "__main__":
    main()
