"""Datasets and domain pairs. `build_pair(cfg.data)` calls the builder named by `data._target_`
(a function taking the `data` config node and returning a DomainPair), so a new pair is a new
config file, and a new kind of data one function. The class subsets of `data.source_classes` /
`data.target_classes` apply to every pair here, after its builder (da_runner/data/classes.py)."""

from hydra.utils import get_method

from da_runner.data.classes import LabelSpace, select_classes
from da_runner.data.domain import Domain, DomainPair
from da_runner.data.memory import BatchStream, InMemoryDomain
from da_runner.errors import UserError


def build_pair(cfg) -> DomainPair:
    target = cfg.get("_target_")
    if not target:
        raise UserError(f"data config {cfg.get('name', '?')!r} has no _target_ naming its builder function")
    try:
        builder = get_method(target)
    except Exception as err:
        raise UserError(f"data._target_={target} cannot be imported ({err})") from err
    return select_classes(builder(cfg), cfg)


__all__ = ["BatchStream", "Domain", "DomainPair", "InMemoryDomain", "LabelSpace", "build_pair"]
