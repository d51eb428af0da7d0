"""The FastAPI app factory. Nothing heavy happens at import time: ``create_app`` builds it all.

app = create_app(load_settings())                       # what `stagecast serve` runs
app = create_app(settings, models={"fake": MyModel()})   # tests: extra chat models by name
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from langchain_core.language_models import BaseChatModel
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stagecast.api.catalog import ChainCatalog
from stagecast.api.errors import TextSafeJSONResponse, error_response, install_error_handlers
from stagecast.api.eventlog import EventLog
from stagecast.api.memlog import InMemoryEventLog
from stagecast.api.metrics import Metrics
from stagecast.api.routes import STATIC_DIR, AppState, router
from stagecast.api.runs import RunManager
from stagecast.api.settings import ServerSettings
from stagecast.api.sse import DIRECT_SEND
from stagecast.engine.events import RUN_EVENT
from stagecast.engine.model_config import load_models_config
from stagecast.engine.providers import ModelRegistry
from stagecast.engine.resources import chain_dirs

__all__ = ["BodyLimitMiddleware", "StagecastApp", "create_app", "make_event_log"]

API_VERSION = "1.3"
SWEEP_SECONDS = 30.0


class BodyLimitMiddleware:
    """Answers 413 when a request body is over ``max_bytes`` (declared or actually sent).

    The body is read up front (bounded by the limit) and handed to the app unchanged; later
    ``receive`` calls (a streaming response waiting for the disconnect) go to the server.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad_request", "Content-Length is not a number")(
                    scope, receive, send
                )
                return
            if int(declared) > limit:
                await self._too_large(scope, receive, send, int(declared))
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(scope, receive, send, size)
                return
            if not message.get("more_body", False):
                break
        replay: list[Message] = [
            {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        ]

        async def replaying_receive() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replaying_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, size: int) -> None:
        response = error_response(
            413,
            "body_too_large",
            f"the request body ({size} bytes or more) is over the limit of {self.max_bytes} "
            "bytes (max_body_bytes)",
            {"limit": self.max_bytes},
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class StagecastApp(FastAPI):
    """The FastAPI app, which hands event streams the server's own ``send`` (``DIRECT_SEND``)
    for their body writes. Valid while no middleware rewrites response bodies (none here: the
    middleware below only reads requests or adds headers to ``http.response.start``); adding
    one that does (GZip, ``BaseHTTPMiddleware``) means dropping this."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        await super().__call__(scope, receive, send)


def release_memory() -> None:
    """Hand memory that expired runs freed back to the OS (glibc keeps it otherwise, so RSS
    would stay at its peak after a burst). Called by the sweeper when nothing is running."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    events = RUN_EVENT.json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in events.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components["RunEvent"] = events
    app.openapi_schema = schema
    return schema


def make_event_log(settings: ServerSettings) -> EventLog:
    """The event log ``settings.event_log`` names: in memory, or on Redis Streams."""
    if settings.event_log == "memory":
        return InMemoryEventLog(
            max_events=settings.max_events_per_run, ttl=settings.finished_run_ttl
        )
    from stagecast.api.redislog import RedisEventLog  # redis is only imported when configured

    return RedisEventLog(
        settings.event_log, max_events=settings.max_events_per_run, ttl=settings.finished_run_ttl
    )


def create_app(
    settings: ServerSettings | None = None,
    *,
    models: ModelRegistry | Mapping[str, BaseChatModel] | None = None,
    event_log: EventLog | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: server settings (``api.settings.load_settings()`` reads the config and env).
        models: a ModelRegistry, or chat models by name added to the configured ones.
        event_log: where events live; by default the one ``settings.event_log`` names
            (``make_event_log``), sized by the settings.
    """
    settings = settings or ServerSettings()
    if isinstance(models, ModelRegistry):
        registry = models
    else:
        registry = ModelRegistry(load_models_config(settings.models_file), overrides=models)
    log = event_log or make_event_log(settings)
    metrics = Metrics()
    manager = RunManager(settings, log, registry, metrics)
    catalog = ChainCatalog(settings.chains_dir if settings.chains_dir is not None else chain_dirs())
    state = AppState(settings, log, manager, catalog, metrics)
    cluster = None
    if settings.event_log != "memory":
        from stagecast.api.cluster import Cluster

        cluster = state.cluster = Cluster(
            settings.event_log, settings, manager, catalog, work=settings.work_runs
        )
    metrics.add_gauge(
        "stagecast_runs_active",
        "Runs not finished (waiting ones included).",
        lambda: manager.active,
    )
    metrics.add_gauge(
        "stagecast_runs_waiting_input", "Runs waiting for an answer.", lambda: manager.waiting
    )
    metrics.add_gauge(
        "stagecast_runs_kept", "Runs kept (running or within their TTL).", lambda: len(manager)
    )
    if isinstance(log, InMemoryEventLog):
        metrics.add_gauge("stagecast_eventlog_events", "Events held in memory.", log.stored_events)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweep() -> None:
            while True:
                await asyncio.sleep(min(SWEEP_SECONDS, max(settings.finished_run_ttl, 1.0)))
                if manager.expire() and not manager.active:
                    await asyncio.to_thread(release_memory)  # gc + trim: not on the loop

        async def watch_stalls() -> None:
            while True:
                await asyncio.sleep(min(1.0, settings.viewer_send_timeout / 4))
                state.stall_watch.sweep()

        sweeper = asyncio.get_running_loop().create_task(sweep())
        watcher = asyncio.get_running_loop().create_task(watch_stalls())
        if cluster is not None:
            await cluster.start()
        try:
            yield
        finally:
            sweeper.cancel()
            watcher.cancel()
            if cluster is not None:
                await cluster.stop_taking()
                await cluster.hand_over()  # the runs going on here continue elsewhere
            await manager.shutdown(settings.shutdown_timeout)
            if cluster is not None:
                await cluster.aclose()
            await log.aclose()  # after the last run-end: a shared log sends what it buffered
            await registry.aclose()  # the models' HTTP connections, in the loop that opened them

    app = StagecastApp(
        title="Stagecast",
        version=API_VERSION,
        description="Run YAML prompt chains and follow every stage as Server-Sent Events "
        "(event protocol v1).",
        lifespan=lifespan,
        default_response_class=TextSafeJSONResponse,
    )
    app.state.stagecast = state
    install_error_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["Location", "Content-Location", "X-Stagecast-Run-Id"],
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
