"""da_runner: a config-driven experiment runner for unsupervised domain adaptation."""

from da_runner.paths import register_resolver

__version__ = "0.1.0"

register_resolver()  # `${da.data_root:}`, the default data.root of the data configs (da_runner/paths.py)
