"""Where the config tree is: one place that every caller asks (`da-run`, `da-eval`, the scripts and
the tests).

The tree lives at the top of the repository, `configs/`, and is installed inside the package as
`da_runner/configs/` (pyproject.toml maps the folder to the package `da_runner.configs`), so an
installed `da-run` finds it from any folder. `config_dir()` looks beside the da_runner package that
was imported:

- `da_runner/configs/`: an installed wheel;
- `configs/` next to `da_runner/`: a source checkout, installed with `pip install -e .` or put on
  PYTHONPATH. A plain PYTHONPATH does not see the package mapping, and going by the imported
  package's own folder keeps a checkout from reading another checkout's tree through the import
  hooks of an editable install.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CANDIDATES = (_PACKAGE / "configs", _PACKAGE.parent / "configs")  # installed, source checkout


def config_dir() -> Path:
    """The folder that holds config.yaml and the config groups (method/, data/, ...)."""
    for candidate in _CANDIDATES:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError("no config tree: config.yaml is in neither " + " nor ".join(map(str, _CANDIDATES)))


def initialize_configs():
    """Hydra's compose API on the config tree, as `da-run` composes it:
    `with initialize_configs(): cfg = compose("config", overrides=[...])`."""
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(config_dir()), version_base="1.3")
