"""The config tree. In the repository it is the top-level configs/ folder; installed, it is the
package da_runner.configs (see pyproject.toml). da_runner/config_tree.py finds it in either place."""
