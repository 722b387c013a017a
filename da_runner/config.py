"""The composed config: its checks (the rules of every key are declared in da_runner/schema.py), the
device it names, and comparisons of two configs."""

import torch
from omegaconf import DictConfig, OmegaConf

from da_runner import schema
from da_runner.errors import UserError

# Keys a resumed run takes from the new command line instead of the checkpoint: they change where
# and how the run is shown, never what it computes.
RUNTIME_KEYS = ("resume", "device", "trainer.progress")


def validate(cfg: DictConfig) -> None:
    """Raise UserError for the first invalid key, naming the key, the rule and the value given."""
    schema.check(cfg)


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return torch.device(name)


def differences(a: DictConfig, b: DictConfig, ignore=RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs (ignoring `ignore`)."""
    flat_a = flatten(OmegaConf.to_container(a, resolve=True))
    flat_b = flatten(OmegaConf.to_container(b, resolve=True))
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if k not in ignore and flat_a.get(k) != flat_b.get(k)]


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
