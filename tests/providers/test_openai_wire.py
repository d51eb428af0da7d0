"""engine/openai_wire.py at the byte level: a raw server writes exactly the given responses, so
framing, keep-alive, a pooled connection the server closed, redirects and error bodies are
each checked on the wire client alone (test_openai_faults.py runs it through whole chains)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import openai
import pytest

from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.openai_stream import stream_pieces
from stagecast.engine.openai_wire import WireFallback, WireTarget, wire_target
from stagecast.engine.providers import ModelRegistry
from tests.providers.conftest import KEY, entry_fields

pytestmark = pytest.mark.anyio

Responder = Callable[[int], list[bytes]]
"""Request number (0, 1, ...) -> the writes of its response (b"" in the list: close now)."""


def sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def chunked(body: bytes, size: int = 7) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


STREAM = sse(b'{"choices":[{"delta":{"content":"a"}}]}', b'{"choices":[{"delta":{"content":"b"}}]}')
OK_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(
    STREAM + sse(b"[DONE]")
)


class RawServer:
    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                number = len(self.requests)
                self.requests.append((head, body))
                for part in self.respond(number):
                    if not part:
                        writer.close()
                        return
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.01)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        finally:
            self.writers.discard(writer)

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def models() -> AsyncIterator[Callable[[str], ModelRegistry]]:
    made: list[ModelRegistry] = []

    def make(base_url: str) -> ModelRegistry:
        entry = ModelEntry.model_validate(entry_fields(base_url=base_url, fast_stream=True))
        registry = ModelRegistry(
            ModelsConfig(models={"local": entry}), environ={"STAGECAST_TEST_KEY": KEY}
        )
        made.append(registry)
        return registry

    yield make
    for registry in made:
        await registry.aclose()


def target_of(registry: ModelRegistry) -> WireTarget:
    target = wire_target(registry.resolve("local").chat_model.root_async_client)  # type: ignore[attr-defined]
    assert target is not None
    return target


async def payloads(target: WireTarget, body: bytes = b"{}") -> list[bytes]:
    with anyio.fail_after(5):
        return [p async for p in target.stream(body)]


WANTED = [b'{"choices":[{"delta":{"content":"a"}}]}', b'{"choices":[{"delta":{"content":"b"}}]}']


async def test_the_request_is_the_sdks_and_the_connection_is_kept_alive(models: Any) -> None:
    async with RawServer(lambda n: [OK_CHUNKED]) as server:
        target = target_of(models(server.base_url))
        assert await payloads(target, b'{"x":1}') == WANTED
        assert await payloads(target, b'{"x":2}') == WANTED
    assert server.connections == 1
    head, body = server.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    lowered = head.lower()
    assert f"authorization: bearer {KEY}".lower().encode() in lowered
    assert b"content-type: application/json" in lowered
    assert b"accept-encoding: identity" in lowered
    assert b"x-stainless-read-timeout: 5.0" in lowered
    assert (body, server.requests[1][1]) == (b'{"x":1}', b'{"x":2}')


async def test_a_pooled_connection_the_server_closed_is_replaced(models: Any) -> None:
    async with RawServer(lambda n: [OK_CHUNKED, b""]) as server:  # closes after each answer
        target = target_of(models(server.base_url))
        assert await payloads(target) == WANTED
        await asyncio.sleep(0.05)
        assert await payloads(target) == WANTED
    assert server.connections == 2


async def test_a_pooled_connection_closed_unnoticed_is_retried_once(models: Any) -> None:
    # the server reads the second request, then closes without a byte: as if it had closed the
    # idle connection just as the request went out
    async with RawServer(lambda n: [OK_CHUNKED] if n != 1 else [b""]) as server:
        target = target_of(models(server.base_url))
        assert await payloads(target) == WANTED
        assert await payloads(target) == WANTED
    assert server.connections == 2 and len(server.requests) == 3


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(STREAM + sse(b"[DONE]"))
        + STREAM
        + sse(b"[DONE]"),
        b"HTTP/1.0 200 OK\r\n\r\n" + STREAM,  # ends with the connection, no [DONE]
        b"HTTP/1.1 100 Continue\r\n\r\n" + OK_CHUNKED,
        b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
        + chunked(gzip.compress(STREAM + sse(b"[DONE]"))),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(STREAM + sse(b"[DONE]"), 1).replace(b"0\r\n\r\n", b"0\r\nx-trailer: 1\r\n\r\n"),
    ],
    ids=["content-length", "until-close", "100-continue", "gzip", "one-byte-chunks-trailer"],
)
async def test_every_body_framing_gives_the_same_events(models: Any, response: bytes) -> None:
    parts = [response[i : i + 5] for i in range(0, len(response), 5)]  # split anywhere
    closing = response.startswith(b"HTTP/1.0")
    async with RawServer(lambda n: [*parts, b""] if closing else parts) as server:
        assert await payloads(target_of(models(server.base_url))) == WANTED


async def test_an_error_status_is_the_sdks_exception_with_body_and_headers(models: Any) -> None:
    error = json.dumps({"error": {"message": "overloaded", "code": "busy"}}).encode()
    response = (
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ntransfer-encoding: chunked\r\n"
        b"content-type: application/json\r\n\r\n" + chunked(error)
    )
    async with RawServer(lambda n: [response] if n == 0 else [OK_CHUNKED]) as server:
        target = target_of(models(server.base_url))
        with pytest.raises(openai.InternalServerError) as caught:
            await payloads(target)
        assert caught.value.status_code == 503
        assert caught.value.body == {"message": "overloaded", "code": "busy"}
        assert caught.value.response.headers["retry-after"] == "7"
        assert str(caught.value) == "Error code: 503 - overloaded"
        assert await payloads(target) == WANTED  # the connection was read to its end, reused
    assert server.connections == 1


async def test_a_redirect_goes_back_to_the_sdk_which_follows_it(models: Any) -> None:
    moved = (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: /v2/chat/completions\r\n"
        b"content-length: 0\r\n\r\n"
    )
    finish = sse(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}', b"[DONE]")
    ok = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(STREAM + finish)
    async with RawServer(lambda n: [moved] if n < 3 else [ok]) as server:
        registry = models(server.base_url)
        with pytest.raises(WireFallback):
            await payloads(target_of(registry))
        model = registry.resolve("local").chat_model
        with anyio.fail_after(5):
            pieces = [p.content async for p in stream_pieces(model, [], {})]
    assert pieces == ["a", "b"]
    # the wire client alone; then stream_pieces: the wire client, the SDK, the SDK following
    assert [r[0].split(b" ")[1] for r in server.requests] == [
        b"/v1/chat/completions",
        b"/v1/chat/completions",
        b"/v1/chat/completions",
        b"/v2/chat/completions",
    ]
