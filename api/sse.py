"""Server-Sent Events: the only module that knows the wire format.

Each event is one frame::

    id: <seq>
    event: <type>
    data: <the event's JSON, one line, the same as the CLI's NDJSON>

The stream opens at once with ``retry: <ms>`` and a comment (proxies and gzip layers that hold
headers until the first body byte let go), sends ``: ping`` when idle for the ping interval
(load balancers drop idle connections), and ends after the run's last event.

Why not sse-starlette: it sends each event with its own ``send`` inside an anyio timeout scope
and formats every event per viewer (FIELD-NOTES measured ~11 µs of server CPU per event). Here
the log already holds each event's JSON; a frame is one f-string, and every batch the log hands
over (everything that arrived since the last write) goes out in a single ``send``. Measured with
``python tests/api/bench_sse.py`` — see its docstring.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from api.eventlog import EventLogError, LogEntry

__all__ = [
    "PING",
    "SSE_HEADERS",
    "EventStreamResponse",
    "encode_entries",
    "encode_entry",
    "open_frame",
]

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS: dict[str, str] = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
PING = b": ping\n\n"


def encode_entry(entry: LogEntry) -> str:
    """One event as an SSE frame (the JSON is one line: JSON escapes every newline)."""
    return f"id: {entry.seq}\nevent: {entry.type}\ndata: {entry.data}\n\n"


def encode_entries(entries: Iterable[LogEntry]) -> bytes:
    """Several frames as one write."""
    return "".join([f"id: {e.seq}\nevent: {e.type}\ndata: {e.data}\n\n" for e in entries]).encode()


def open_frame(retry_ms: int) -> bytes:
    """What the stream starts with: the reconnect delay and a comment."""
    return f"retry: {retry_ms}\n: stagecast event stream v1\n\n".encode()


class EventStreamResponse(Response):
    """Streams batches of log entries as SSE; an empty batch means "idle: send a ping".

    Args:
        batches: e.g. ``EventLog.follow(run_id, after, heartbeat=ping_interval)``.
        retry_ms: the ``retry:`` field sent first.
        headers: extra headers (e.g. ``Content-Location``).
        on_sent: called with the number of events after each write (metrics).
        on_close: called once when the stream ends, with True when the client went away first.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        batches: AsyncIterator[list[LogEntry]],
        *,
        retry_ms: int = 2000,
        headers: Mapping[str, str] | None = None,
        on_sent: Callable[[int], None] | None = None,
        on_close: Callable[[bool], None] | None = None,
    ) -> None:
        super().__init__(
            content=None,
            status_code=200,
            headers={**SSE_HEADERS, **(headers or {})},
            media_type=f"{SSE_MEDIA_TYPE}; charset=utf-8",
        )
        # A stream has no length: drop the Content-Length: 0 that Response adds for no body.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.batches = batches
        self.retry_ms = retry_ms
        self.on_sent = on_sent
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            await send(
                {"type": "http.response.body", "body": open_frame(self.retry_ms), "more_body": True}
            )
            async with anyio.create_task_group() as group:

                async def watch_disconnect() -> None:
                    nonlocal disconnected
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            disconnected = True
                            group.cancel_scope.cancel()
                            return

                group.start_soon(watch_disconnect)
                await self._stream(send)
                group.cancel_scope.cancel()
        except OSError:  # the server reports a send to a closed connection
            disconnected = True
        finally:
            aclose: Any = getattr(self.batches, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self.on_close is not None:
                self.on_close(disconnected)

    async def _stream(self, send: Send) -> None:
        on_sent = self.on_sent
        try:
            async for batch in self.batches:
                body = encode_entries(batch) if batch else PING
                await send({"type": "http.response.body", "body": body, "more_body": True})
                if on_sent is not None and batch:
                    on_sent(len(batch))
        except EventLogError:
            pass  # the run expired under a slow viewer: end the stream like a finished one
        await send({"type": "http.response.body", "body": b"", "more_body": False})
