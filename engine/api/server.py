"""``engine serve``: the model, the job store, the job service, the gRPC server and the REST shim
in one process (or, with ``--grpc-target``, the REST shim alone in front of a remote gRPC server).

Start order: resolve and load the model, open the stores, start the job service (which takes up
jobs left by the last process), start gRPC, start HTTP, then log a line containing ``ready``.
SIGTERM or SIGINT stops gracefully: the job service stops accepting (503 / UNAVAILABLE), lets the
running batch finish (or requeues it), then both servers close.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import uvicorn

from engine.api.access_log import AccessLog
from engine.api.auth import Authenticator
from engine.api.body import lingering_http_protocol
from engine.api.client import EngineClient, InProcessClient, RemoteClient
from engine.api.grpc_service import EngineServicer, GrpcServer, ServerInfo
from engine.api.openai_routes import mount as mount_openai_routes
from engine.api.rest import create_app
from engine.config import Config
from engine.errors import NotReady
from engine.metrics import Metrics

log = logging.getLogger("engine.serve")

DRAIN_TIMEOUT_S = 30.0
HTTP_GRACE_S = 5.0


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` owns SIGTERM/SIGINT so that the job
    service drains before the sockets close."""

    def capture_signals(self) -> Any:
        return nullcontext()

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return None


def serve(config: Config) -> int:
    try:
        import uvloop  # uvicorn[standard] brings it; uvicorn itself would pick it too
    except ImportError:
        return asyncio.run(_serve(config))
    return uvloop.run(_serve(config))


def _resolve_model(cfg: Config) -> tuple[Config, bool]:
    """(config with model_dir set, whether its weights are random)."""
    if cfg.model_dir is not None:
        from engine.model.manifest import Manifest

        return cfg, Manifest.load(cfg.model_dir).random_weights
    from engine.model.default import resolve_default_model

    path, random_weights = resolve_default_model(Path("models"), allow_demo=cfg.allow_demo_model)
    return cfg.with_overrides(model_dir=str(path)), random_weights


async def _serve(cfg: Config) -> int:
    metrics = Metrics()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if cfg.grpc_target:
        return await _serve_shim(cfg, metrics, stop)

    from engine.runtime.engine import Engine
    from engine.serving.service import JobService
    from engine.serving.store.base import open_store
    from engine.serving.store.keys import open_key_store
    from engine.serving.store.url import parse_store_url
    from engine.serving.worker import run_in_new_thread

    # The store first: a second server on a SQLite file in use fails at once (it holds no lock
    # and has changed nothing), not after loading a model.
    store_url = parse_store_url(cfg.store_url)
    store = open_store(store_url)
    keys = open_key_store(store_url)
    try:
        cfg, random_weights = await asyncio.to_thread(_resolve_model, cfg)
        # Loaded on a thread of its own: CTranslate2's workers inherit its scheduling policy.
        engine = await run_in_new_thread(Engine.from_config, cfg, batch_scheduling=cfg.batch_scheduling)
    except BaseException:
        keys.close()
        store.close()
        raise
    if not cfg.auth_disabled and keys.count() == 0:
        log.warning(
            "no API keys yet: every request will answer 401 until you create one with "
            "`engine keys create --name NAME --store %s`",
            store_url.redacted,
        )
    auth = Authenticator(keys, rate_limit_per_minute=cfg.rate_limit_per_minute, disabled=cfg.auth_disabled)
    service = JobService(cfg, store, engine, metrics)
    await service.start()
    info = ServerInfo(
        model=service.model_name,
        random_weights=random_weights,
        device=engine.device,
        compute_type=engine.compute_type,
        auth_required=not cfg.auth_disabled,
        limits=cfg.request_limits,
        model_source=engine.manifest.source,
    )
    metrics.model_info.labels(model=info.model, device=info.device, compute_type=info.compute_type).set(1)
    servicer = EngineServicer(
        service, auth, info, metrics=metrics, decode=engine.tokenizer.decode, piece=engine.tokenizer.piece
    )
    # Everything loaded so far lives as long as the process: out of the collector's sight, a full
    # collection no longer walks it (50-70 ms pauses of the event loop under load, every few
    # seconds, before).
    gc.freeze()
    grpc_server: GrpcServer | None = None
    http: _HttpServer | None = None
    http_task: asyncio.Task[None] | None = None
    try:
        grpc_server = GrpcServer(servicer, f"{cfg.grpc_host}:{cfg.grpc_port}")
        await grpc_server.start()
        http, http_task = await _start_http(cfg, InProcessClient(servicer), metrics)
        log.info(
            "ready: REST on http://%s:%d (playground at /), gRPC on %s:%d, model %s (%s, %s)%s",
            cfg.http_host,
            _bound_port(http, cfg.http_port),
            cfg.grpc_host,
            grpc_server.port,
            info.model,
            info.device,
            info.compute_type,
            " -- DEMO MODEL WITH RANDOM WEIGHTS: outputs are not meaningful text" if random_weights else "",
        )
        await _until_stopped(stop, http_task)
        log.info("stopping: no new jobs; draining the running batch (up to %.0f s)", DRAIN_TIMEOUT_S)
        return 0 if stop.is_set() else 1
    finally:
        # Draining, both servers still answer: polls read results, waits for jobs that finish in
        # time get them, and every wait for one that does not gets 503 / UNAVAILABLE. The store
        # closes last, once no request can read it any more.
        await service.stop(drain_timeout_s=min(DRAIN_TIMEOUT_S, cfg.job_timeout_s), close_store=False)
        if grpc_server is not None:
            await grpc_server.stop(grace_s=2.0)
        await _stop_http(http, http_task)
        store.close()
        keys.close()
        log.info("stopped")


async def _serve_shim(cfg: Config, metrics: Metrics, stop: asyncio.Event) -> int:
    assert cfg.grpc_target is not None
    client: EngineClient = RemoteClient(cfg.grpc_target)
    http, http_task = await _start_http(cfg, client, metrics)
    try:
        log.info(
            "ready: REST shim on http://%s:%d forwarding to the gRPC server at %s%s",
            cfg.http_host,
            _bound_port(http, cfg.http_port),
            cfg.grpc_target,
            "" if await client.ready() else " (not answering yet: /readyz says 503 until it does)",
        )
        await _until_stopped(stop, http_task)
        return 0 if stop.is_set() else 1
    finally:
        await _stop_http(http, http_task)
        await client.close()
        log.info("stopped")


async def _start_http(
    cfg: Config, client: EngineClient, metrics: Metrics
) -> tuple[_HttpServer, asyncio.Task[None]]:
    app: Any = create_app(client, metrics, public_url=cfg.public_url, limits=cfg.request_limits)
    mount_openai_routes(app, client)
    if cfg.access_log:
        app = AccessLog(app)
    config = uvicorn.Config(
        app,
        host=cfg.http_host,
        port=cfg.http_port,
        log_config=None,  # keep the CLI's logging format
        access_log=False,  # uvicorn's own: ours (--access-log) has job ids, key names and JSON
        lifespan="off",
        timeout_graceful_shutdown=int(HTTP_GRACE_S),
        http=lingering_http_protocol(),
    )
    http = _HttpServer(config)
    task = asyncio.get_running_loop().create_task(_run_http(http))
    while not http.started:
        if task.done():
            task.result()  # raises what stopped it
        await asyncio.sleep(0.01)
    return http, task


async def _run_http(http: _HttpServer) -> None:
    try:
        await http.serve()
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise NotReady(
            f"cannot listen for HTTP on {http.config.host}:{http.config.port} (in use?); "
            "choose another with --http-port"
        ) from exc
    if not http.started:
        raise NotReady(f"cannot listen for HTTP on {http.config.host}:{http.config.port} (in use?)")


async def _until_stopped(stop: asyncio.Event, http_task: asyncio.Task[None]) -> None:
    waiter = asyncio.get_running_loop().create_task(stop.wait())
    await asyncio.wait({waiter, http_task}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if http_task.done() and not stop.is_set():
        http_task.result()


async def _stop_http(http: _HttpServer | None, task: asyncio.Task[None] | None) -> None:
    if http is None or task is None:
        return
    http.should_exit = True
    with suppress(Exception):
        await asyncio.wait_for(task, HTTP_GRACE_S + 5.0)


def _bound_port(http: _HttpServer, configured: int) -> int:
    for server in getattr(http, "servers", []):
        for sock in server.sockets:
            return int(sock.getsockname()[1])
    return configured
