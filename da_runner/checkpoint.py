"""Checkpoints that load with `torch.load(path, weights_only=True)`: tensors and plain types only.

A checkpoint holds everything a resumed run needs to continue bit for bit: modules, optimizers,
the step, the batch streams, every random number generator, the model-selection state and the
run's configuration (as YAML text).
"""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

from da_runner.errors import UserError

FORMAT_VERSION = 2  # 2: per-validator selections (picks) and the oracle


def rng_state() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss), "kind": str(np_kind)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(state: dict, path: Path) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact, never a broken one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint found at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as err:
        raise UserError(f"checkpoint {path} is corrupt or not a da_runner checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from err
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"checkpoint {path} is corrupt or not a da_runner checkpoint (no format version)")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} was written by another version of da_runner (checkpoint format "
                        f"{state['format_version']}; this version reads format {FORMAT_VERSION})")
    return state
