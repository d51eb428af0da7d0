"""The provider paths over HTTPS: the test server with a certificate of a test CA (trustme),
trusted through ``SSL_CERT_FILE`` as a deployment would; every test runs on every path."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from stagecast.engine.openai_wire import wire_target
from stagecast.engine.orchestrator import ChainRun
from tests.providers.openai_server import OpenAIServer, Reply
from tests.providers.test_openai_faults import (
    ONE_STAGE,
    chain_of,
    collect,
    ended,
    registry,
    short,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("stream_path")]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def trusted(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test CA is what the clients built from now on trust (as SSL_CERT_FILE does)."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    yield


@pytest.fixture
async def tls_server(ca: trustme.CA) -> AsyncIterator[OpenAIServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    async with OpenAIServer(ssl=context) as server:
        yield server


@pytest.mark.usefixtures("trusted")
async def test_streams_over_https_and_reuses_the_connection(tls_server: OpenAIServer) -> None:
    assert tls_server.base_url.startswith("https://127.0.0.1:")
    tls_server.script(Reply(tokens=["Hi", " there"], usage=(7, 2)))
    text = ONE_STAGE + "  - id: again\n    kind: llm\n    prompt: Once more.\n    needs: [answer]\n"
    events = await collect(registry(tls_server.base_url), text)
    assert [s for s in short(events) if s.startswith("token")] == [
        "token 1 'Hi'",
        "token 1 ' there'",
        "token 1 'Hello'",
        "token 1 ','",
        "token 1 ' world'",
        "token 1 '.'",
    ]
    first = ended(events)
    assert (first.output, first.usage.input_tokens, first.usage.output_tokens) == ("Hi there", 7, 2)
    assert events[-1].status == "succeeded"
    assert len(tls_server.requests) == 2


@pytest.mark.usefixtures("trusted")
async def test_https_entries_are_read_by_the_wire_client(tls_server: OpenAIServer) -> None:
    model: Any = registry(tls_server.base_url).resolve("local").chat_model
    target = wire_target(model.root_async_client)
    assert target is not None and target.ssl is not None
    assert (target.host, target.port) == ("127.0.0.1", tls_server.port)


@pytest.mark.usefixtures("trusted")
async def test_a_connection_cut_over_https_is_retried(tls_server: OpenAIServer) -> None:
    tls_server.script(Reply(cut_after=1))
    events = await collect(registry(tls_server.base_url, max_retries=1))
    assert short(events)[:4] == [
        "run-start",
        "stage-start",
        "token 1 'Hello'",
        "retry 1 connection_error",
    ]
    assert "dropped mid-answer" in events[3].error.message
    assert ended(events).output == "Hello, world."


async def test_an_untrusted_certificate_fails_the_connect(tls_server: OpenAIServer) -> None:
    events = await collect(registry(tls_server.base_url))
    end = ended(events)
    assert (end.status, end.error.type) == ("failed", "connection_error")
    assert end.error.message.startswith("model 'local': cannot connect to https://127.0.0.1:")
    assert tls_server.requests == []


@pytest.mark.usefixtures("trusted")
async def test_cancelling_closes_the_https_stream(tls_server: OpenAIServer) -> None:
    tls_server.script(Reply(tokens=[f"t{i} " for i in range(200)], delay=0.02))
    events: list[Any] = []
    got_token = asyncio.Event()

    def sink(event: Any) -> None:
        events.append(event)
        if event.type == "token":
            got_token.set()

    run = ChainRun(chain_of(ONE_STAGE), {}, models=registry(tls_server.base_url), sink=sink)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        await got_token.wait()
        run.cancel()
        await task
        await tls_server.wait_disconnect(2)
    await run.registry.aclose()
    assert short(events)[-2:] == ["stage-end cancelled", "run-end cancelled"]
    assert tls_server.disconnects == 1 and tls_server.completed == 0
