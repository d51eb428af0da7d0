"""Shared fixtures for the API tests: scripted chat models and a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from stagecast.api.app import create_app
from stagecast.api.settings import ServerSettings
from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.providers import ModelRegistry

CHAINS = Path(__file__).parent / "chains"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedModel(BaseChatModel):
    """Streams ``tokens`` (forever when ``forever``), one chunk each, after ``delay_ms``.

    ``record`` (a shared list) gets "open" when a stream starts and "done" or "closed" when it
    ends normally or is closed early (cancelled / aclose'd).
    """

    tokens: list[str] = ["alpha ", "beta ", "gamma"]
    delay_ms: float = 0.0
    forever: bool = False
    record: Any = None

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage("".join(self.tokens)))])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        record = self.record if self.record is not None else []
        record.append("open")
        finished = False
        try:
            i = 0
            while self.forever or i < len(self.tokens):
                await asyncio.sleep(self.delay_ms / 1000)
                yield ChatGenerationChunk(
                    message=AIMessageChunk(content=self.tokens[i % len(self.tokens)])
                )
                i += 1
            finished = True
        finally:
            record.append("done" if finished else "closed")


def registry(models: Mapping[str, BaseChatModel]) -> ModelRegistry:
    config = ModelsConfig(default="offline", models={"offline": ModelEntry(provider="offline")})
    return ModelRegistry(config, overrides=models, environ={})


def settings(**overrides: Any) -> ServerSettings:
    return ServerSettings(chains_dir=CHAINS, **overrides)


def make_app(models: Mapping[str, BaseChatModel] | None = None, **overrides: Any) -> FastAPI:
    default_models: dict[str, BaseChatModel] = {
        "fake": ScriptedModel(delay_ms=1),
        "endless": ScriptedModel(forever=True, delay_ms=2),
    }
    default_models.update(models or {})
    return create_app(settings(**overrides), models=registry(default_models))


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:  # uvicorn offers no event to wait on; bounded poll of its flag
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.005)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(models=..., **settings)`` starts a live server and returns its base URL."""
    with contextlib.ExitStack() as stack:

        def start(models: Mapping[str, BaseChatModel] | None = None, **overrides: Any) -> str:
            return stack.enter_context(live_server(make_app(models, **overrides)))

        yield start


@pytest.fixture(params=["memory", "redis"])
def serve_on_both_logs(request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """``serve`` on the in-memory log, then on Redis (``event_log``: the run queue, registry and
    streams of a deployment on a real redis-server; skipped outside CI when there is none)."""
    log = "memory" if request.param == "memory" else request.getfixturevalue("redis_url")
    with contextlib.ExitStack() as stack:

        def start(models: Mapping[str, BaseChatModel] | None = None, **overrides: Any) -> str:
            overrides.setdefault("event_log", log)
            return stack.enter_context(live_server(make_app(models, **overrides)))

        yield start
