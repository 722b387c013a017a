"""da_runner: a config-driven experiment runner for unsupervised domain adaptation."""

__version__ = "0.1.0"
