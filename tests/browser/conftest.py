"""Browser tests: the demo page in headless Chromium, against a real server on 127.0.0.1.

Chromium is Debian's package at /usr/bin/chromium, installed by ``tests/setup.sh`` (part of the
README's test command; as root, with apt-get; no browser download). Without it the tests are
skipped — unless ``CI=true`` or ``STAGECAST_REQUIRE_BROWSER=1``, which makes that a failure.

The server is ``api.app.create_app`` under uvicorn in a thread, on a free port, serving the
shipped chains (plus one test chain, ``xss_echo``) with a test models file whose offline models
stream slowly enough to watch progress but keep the suite fast:

    fast  8 ms per token     slow  35 ms per token     echo  repeats its prompt, 4 ms per token
    demo  25 ms per token (the built-in `demo` entry: what a person trying the page watches)

``cut_page`` is a page loaded through ``streamcut.StreamCutter``, a proxy that cuts the event
streams on demand.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from langchain_core.messages import BaseMessage

from stagecast.api.app import create_app
from stagecast.api.settings import ServerSettings
from stagecast.engine.offline import OfflineChatModel
from stagecast.engine.resources import SHIPPED_CHAINS
from tests.browser.streamcut import StreamCutter
from tests.setup_needed import not_set_up

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = Path(os.environ.get("STAGECAST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 20_000

MODELS_YAML = """\
default: fast
models:
  fast: {provider: offline, delay_ms: 8}
  slow: {provider: offline, delay_ms: 35}
  demo: {provider: offline, delay_ms: 25}
  offline: {provider: offline}
"""


class EchoChatModel(OfflineChatModel):
    """Answers with its prompt, word by word: model output the page must show as text."""

    def answer(self, messages: Sequence[BaseMessage]) -> str:
        return "\n".join(str(m.content) for m in messages if m.type == "human")


def _ensure_chromium() -> None:
    # installing is tests/setup.sh's job (the README's test command runs it), never pytest's
    if CHROMIUM.exists():
        return
    not_set_up(
        f"{CHROMIUM} is missing: run `sh tests/setup.sh` (installs Debian's chromium)",
        also="STAGECAST_REQUIRE_BROWSER",
    )


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("stagecast-browser")
    chains = base / "chains"
    chains.mkdir()
    for path in [*SHIPPED_CHAINS.glob("*.yaml"), *(HERE / "chains").glob("*.yaml")]:
        shutil.copy(path, chains / path.name)
    # docs_qa reads the sample collection beside it (its `collection` is a folder relative to it)
    shutil.copytree(
        SHIPPED_CHAINS / "collections",
        chains / "collections",
        ignore=shutil.ignore_patterns(".stagecast-index"),
    )
    schema = SHIPPED_CHAINS / "chain.schema.json"
    if schema.exists():
        shutil.copy(schema, chains / schema.name)
    models = base / "models.yaml"
    models.write_text(MODELS_YAML, encoding="utf-8")
    settings = ServerSettings(
        chains_dir=chains, models_file=models, ping_interval=5, retry_ms=500, shutdown_timeout=2
    )
    app = create_app(settings, models={"echo": EchoChatModel(delay_ms=4)})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="stagecast-test-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 15 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")  # not session: sync_playwright keeps an event loop running on
def browser() -> Iterator[Any]:  # this thread, which would break later tests' asyncio.run()
    _ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, server_url: str) -> Iterator[Any]:
    with _page(browser, server_url) as pg:
        yield pg


@pytest.fixture
def cut_page(browser: Any, server_url: str) -> Iterator[tuple[Any, StreamCutter]]:
    """A page whose requests (its event stream too) go through a proxy that cuts on demand."""
    with StreamCutter(int(server_url.rsplit(":", 1)[1])) as cutter:
        with _page(browser, f"http://127.0.0.1:{cutter.port}") as pg:
            yield pg, cutter


@contextmanager
def _page(browser: Any, base_url: str) -> Iterator[Any]:
    context = browser.new_context(base_url=base_url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))

    def on_console(msg: Any) -> None:
        # HTTP error statuses are expected (GET /v1/models may 404, a bad input gets 422);
        # the tests check what the page shows for them. Script errors are never expected.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            errors.append(msg.text)

    pg.on("console", on_console)
    try:
        yield pg
    finally:
        context.close()
    assert not errors, f"the page logged errors: {errors}"


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
