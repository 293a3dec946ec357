"""Shared pytest fixtures: the tiny test models of tests/models.py, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests import models


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """The async tests (pytest.mark.anyio) run on asyncio, as the server does."""
    return "asyncio"


@pytest.fixture(scope="session")
def flan_hf_dir() -> Path:
    return models.hf_checkpoint("flan")


@pytest.fixture(scope="session")
def t5_hf_dir() -> Path:
    return models.hf_checkpoint("t5")


@pytest.fixture(scope="session")
def flan_model_dir() -> Path:
    return models.converted_model("flan", "float32")


@pytest.fixture(scope="session")
def t5_model_dir() -> Path:
    return models.converted_model("t5", "float32")


@pytest.fixture(scope="session")
def model_dir_factory() -> Callable[..., Path]:
    """``model_dir_factory(kind="flan", quantization="float32", seed=0)`` -> a converted model folder."""
    return models.converted_model
