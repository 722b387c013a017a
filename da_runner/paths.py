"""Where data lives when the config does not say: one per-user folder, so runs started from any
folder share one copy of each dataset.

`data.root` in every data config is `${da.data_root:}`, an OmegaConf resolver registered when the
package is imported (da_runner/__init__.py) that calls `default_data_root()`:

    $DA_DATA_ROOT                      when set (as before)
    $XDG_DATA_HOME/da_runner           else, when XDG_DATA_HOME is set (the XDG base-directory spec)
    ~/.local/share/da_runner           else

`data.root=<path>` on the command line replaces the interpolation, as any override does.
"""

import os
from pathlib import Path

DATA_ROOT_ENV = "DA_DATA_ROOT"
RESOLVER = "da.data_root"


def user_data_dir() -> Path:
    """The per-user data folder: $XDG_DATA_HOME/da_runner, else ~/.local/share/da_runner."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base).expanduser() / "da_runner"


def default_data_root() -> Path:
    """data.root when neither the command line nor the config sets it: $DA_DATA_ROOT, else user_data_dir()."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else user_data_dir()


def register_resolver() -> None:
    """`${da.data_root:}` in configs; resolved on every access (not cached), so it follows the environment."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, lambda: str(default_data_root()))
