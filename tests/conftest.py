"""Shared pytest fixtures: the tiny test models of tests/models.py, built once per session; a
Redis server for the session and an empty job store of each kind."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from engine.serving.store.base import JobStore
from engine.serving.store.sqlite import SqliteJobStore
from harness.processes import redis_server
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


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str | None]:
    """A throwaway redis-server for the session (None where redis-server is not installed)."""
    if shutil.which("redis-server") is None:
        yield None
        return
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_stores(redis_url: str | None) -> Callable[[], JobStore]:
    """Opens Redis job stores that share one fresh prefix (servers of one fleet); skips the test
    where redis-server is not installed."""
    if redis_url is None:
        pytest.skip("redis-server is not installed (make system-deps installs it)")
    from engine.serving.store.redis import RedisJobStore

    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda: RedisJobStore(redis_url, prefix=prefix)


@pytest.fixture(params=["sqlite", "redis"])
def job_store(request: pytest.FixtureRequest, redis_url: str | None) -> Iterator[JobStore]:
    """An empty job store of each kind: SQLite in memory, and Redis under a fresh prefix."""
    if request.param == "sqlite":
        store: JobStore = SqliteJobStore(":memory:")
    else:
        if redis_url is None:
            pytest.skip("redis-server is not installed (make system-deps installs it)")
        from engine.serving.store.redis import RedisJobStore

        store = RedisJobStore(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    yield store
    store.close()
