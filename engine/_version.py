"""The project's one version: pyproject.toml reads it (setuptools' dynamic version), `engine
--version` and /v1/info show it."""

__version__ = "0.1.0"
