"""A small OpenAI-wire-compatible server for tests: real HTTP/1.1 on 127.0.0.1, raw asyncio.

``POST /v1/chat/completions`` answers in OpenAI's format: with ``stream: true`` an SSE body of
``chat.completion.chunk`` objects, a finish chunk, the usage chunk when the request asked for
``stream_options.include_usage``, and ``data: [DONE]``; otherwise one ``chat.completion``.

Every request takes the next ``Reply`` from the script (``server.script(...)``), or the default
one, so a test can inject one fault per attempt: an HTTP error with headers (429 + Retry-After,
5xx, 401, 400, 404), a stall before the headers or mid-answer, a malformed chunk, a connection cut
mid-answer, a clean end without ``finish_reason``. Raw asyncio instead of an ASGI server because
the faults live below HTTP (an aborted TCP connection, an unterminated chunked body) and because
the server must see exactly when the client hangs up (``disconnects``).

Requests are recorded (``server.requests``) so tests can assert what the client sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OpenAIServer", "RecordedRequest", "Reply", "blackhole_port", "free_port"]


@dataclass
class Reply:
    """What the server does for one request."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "."])
    """Content deltas, one SSE chunk each (joined for a non-stream answer)."""
    status: int = 200
    """An error status answers with ``error_body`` (JSON) instead of a completion."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra response headers, e.g. ``{"retry-after": "1"}``."""
    error_message: str = "something went wrong"
    error_code: str | None = None
    error_body: bytes | None = None
    """When set, the error response's body as is (e.g. an HTML page or plain text from a proxy),
    sent with ``error_content_type``, instead of the JSON ``error`` object."""
    error_content_type: str = "text/html"
    usage: tuple[int, int] | None = (11, 4)
    """(prompt_tokens, completion_tokens) of the usage chunk / usage object; None: the server
    reports no usage (no usage chunk even when asked, no usage object), like some local servers."""
    delay: float = 0.0
    """Seconds before each content chunk."""
    hang_before_headers: bool = False
    """Read the request, then send nothing (the client's read timeout fires)."""
    stall_after: int | None = None
    """Send this many content chunks, then nothing more until the client hangs up."""
    cut_after: int | None = None
    """Send this many content chunks, then abort the TCP connection (no terminating chunk)."""
    end_after: int | None = None
    """Send this many content chunks, then end the body cleanly: no finish chunk, no [DONE]."""
    malformed_after: int | None = None
    """Send this many content chunks, then a ``data:`` line that is not JSON, then go on."""
    finish_reason: str = "stop"
    content: str | None = None
    """When set, the whole answer (overrides ``tokens``)."""

    def parts(self) -> list[str]:
        return [self.content] if self.content is not None else list(self.tokens)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = 0.0
    """``time.monotonic()`` when the request arrived."""


class OpenAIServer:
    """Serve until closed; use as ``async with OpenAIServer() as server:``."""

    def __init__(self, *, models: set[str] | None = None, api_key: str | None = None) -> None:
        self.models = models
        """When set, other model names get a 404 like OpenAI's ``model_not_found``."""
        self.api_key = api_key
        """When set, a request with another bearer token gets a 401."""
        self.default = Reply()
        self.json_default: Reply | None = None
        """When set, the default reply to a request with ``response_format`` (JSON stages)."""
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        """Responses the client abandoned before the server finished them."""
        self.disconnected = asyncio.Event()
        self.completed = 0
        """Responses sent to the end."""
        self._script: deque[Reply] = deque()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Answer the next requests with ``replies``, in order; then the default reply."""
        self._script.extend(replies)

    async def __aenter__(self) -> OpenAIServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()  # ends each connection's loop (reads see EOF)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                body = json.loads(raw) if raw else {}
                self.requests.append(RecordedRequest(method, path, headers, body, time.monotonic()))
                keep = await self._respond(reader, writer, path, headers, body)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        headers: dict[str, str],
        body: dict[str, Any],
    ) -> bool:
        if self._script:
            reply = self._script.popleft()
        elif self.json_default is not None and "response_format" in body:
            reply = self.json_default
        else:
            reply = self.default
        model = str(body.get("model", ""))
        if path != "/v1/chat/completions":
            return await self._error(writer, 404, {}, f"no route {path}", "not_found")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            # Like OpenAI, echo (part of) the key back: clients must never show this message.
            got = headers.get("authorization", "").removeprefix("Bearer ")
            message = f"Incorrect API key provided: {got}."
            return await self._error(writer, 401, {}, message, "invalid_api_key")
        if self.models is not None and model not in self.models:
            message = f"The model `{model}` does not exist or you do not have access to it."
            return await self._error(writer, 404, {}, message, "model_not_found")
        if reply.hang_before_headers:
            await self._wait_disconnect(reader)
            return False
        if reply.status != 200 and reply.error_body is not None:
            headers = {**reply.headers, "content-type": reply.error_content_type}
            await self._send(writer, reply.status, headers, reply.error_body)
            self.completed += 1
            return True
        if reply.status != 200:
            return await self._error(
                writer, reply.status, reply.headers, reply.error_message, reply.error_code
            )
        if body.get("stream"):
            return await self._stream(reader, writer, reply, body, model)
        return await self._complete(writer, reply, body, model)

    async def _error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
        message: str,
        code: str | None,
    ) -> bool:
        payload = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
        await self._send(writer, status, headers, json.dumps(payload).encode())
        self.completed += 1
        return True

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str], data: bytes
    ) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if "content-type" not in headers:
            head.append("content-type: application/json")
        head.append(f"content-length: {len(data)}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()

    async def _complete(
        self, writer: asyncio.StreamWriter, reply: Reply, body: dict[str, Any], model: str
    ) -> bool:
        payload: dict[str, Any] = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(reply.parts())},
                    "finish_reason": reply.finish_reason,
                }
            ],
        }
        if reply.usage is not None:
            payload["usage"] = _usage(*reply.usage)
        await self._send(writer, 200, reply.headers, json.dumps(payload).encode())
        self.completed += 1
        return True

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply: Reply,
        body: dict[str, Any],
        model: str,
    ) -> bool:
        head = [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream",
            "transfer-encoding: chunked",
            *(f"{k}: {v}" for k, v in reply.headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            for n, frame in enumerate(self._frames(reply, body, model)):
                if frame is _STALL:
                    await asyncio.wait({hangup})
                elif frame is _CUT:
                    writer.transport.abort()
                    self.completed += 1
                    return False
                elif frame is _END:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                    self.completed += 1
                    return True
                else:
                    assert isinstance(frame, bytes)
                    if reply.delay and n > 0:
                        await asyncio.wait({hangup}, timeout=reply.delay)
                    if not hangup.done():
                        writer.write(b"%x\r\n%s\r\n" % (len(frame), frame))
                        await writer.drain()
                if hangup.done():
                    self._hung_up()
                    return False
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            self._hung_up()
            return False
        finally:
            if not hangup.done():
                hangup.cancel()
        self.completed += 1
        return True

    def _frames(self, reply: Reply, body: dict[str, Any], model: str) -> Iterator[object]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            data = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        yield chunk({"role": "assistant", "content": ""})
        for i, text in enumerate(reply.parts()):
            if i == reply.stall_after:
                yield _STALL
            if i == reply.cut_after:
                yield _CUT
            if i == reply.end_after:
                yield _END
            if i == reply.malformed_after:
                yield b'data: {"id": "chatcmpl-test", "choices": [{"delta": {"content": "x\n\n'
            yield chunk({"content": text})
        yield chunk({}, reply.finish_reason)
        if reply.usage is not None and (body.get("stream_options") or {}).get("include_usage"):
            data = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "choices": [],
                "usage": _usage(*reply.usage),
            }
            yield b"data: " + json.dumps(data).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def _wait_disconnect(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(1024):
                pass
        self._hung_up()

    def _hung_up(self) -> None:
        self.disconnects += 1
        self.disconnected.set()

    async def wait_disconnect(self, timeout: float = 2.0) -> None:
        """Wait until a client abandoned a response (raises TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self.disconnected.wait(), timeout)


_STALL, _CUT, _END = object(), object(), object()
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def blackhole_port() -> AsyncIterator[int]:
    """A port whose accept queue is full, so a new connection hangs in connect (Linux drops
    the SYN while the queue is full): the client's connect timeout fires."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            fillers.append(sock)
        await asyncio.sleep(0.05)
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()
