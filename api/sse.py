"""Server-Sent Events: the only module that knows the wire format.

Each event is one frame::

    event: <type>
    data: <the event's JSON, one line, the same as the CLI's NDJSON>
    id: <seq>
    <blank line>

``id:`` comes last: a client that commits the id the moment it parses the line
(@microsoft/fetch-event-source does, before the blank line that ends the frame) never moves its
Last-Event-ID past a frame whose data it did not get. The window left is the one byte between the
id line's newline and the blank line.

The stream opens at once with ``retry: <ms>`` and a comment line (proxies and gzip layers that
hold headers until the first body byte let go), sends a ``: ping`` comment line when idle for the
ping interval (load balancers drop idle connections), and ends after the run's last event. The
opener and the pings are lines with no blank line after them: a blank line is what dispatches a
message, and some clients (fetch-event-source, httpx-sse for ``retry:``) hand an empty message to
the application for a block with no data. A comment line inside the next frame's block is ignored
by every parser that follows the SSE spec, so nothing but events ever reaches an application.

A viewer that stops reading cannot grow the server's memory: uvicorn stops a write at the
transport's high-water mark (asyncio's 64 KiB) until it drains, so a stream holds at most one
write (``WRITE_BYTES``, 256 KiB) beyond it, and the run never waits for it (the log is shared).
A write that has not drained after ``viewer_send_timeout`` seconds drops the viewer
(``StallWatch``, one sweep a second for every open stream, no timer per write): it may resume
with ``Last-Event-ID`` like after any cut.

Why not sse-starlette: it sends each event with its own ``send`` inside an anyio timeout scope
and formats every event per viewer (FIELD-NOTES measured ~11 µs of server CPU per event). Here
each event is encoded once, when the run appends it: the in-memory log stores the frames
(``SSE_CODEC``) and hands a viewer everything that arrived since its last write as one ``bytes``
slice (``FrameBatch``), which goes out in a single ``send``. Measured with
``python tests/api/bench_sse.py`` and ``bench/bench_concurrency.py``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from stagecast.api.eventlog import (
    EventLogError,
    EventLogUnavailable,
    EventsExpired,
    FrameBatch,
    FrameCodec,
    LogEntry,
    UnknownRun,
)

__all__ = [
    "DIRECT_SEND",
    "PING",
    "SSE_CODEC",
    "SSE_HEADERS",
    "EventStreamResponse",
    "StallWatch",
    "decode_frame",
    "encode_entries",
    "encode_entry",
    "encode_frame",
    "open_frame",
]

SSE_MEDIA_TYPE = "text/event-stream"
SSE_HEADERS: dict[str, str] = {
    "cache-control": "no-cache",
    "x-accel-buffering": "no",
}
PING = b": ping\n"


def ended_comment(exc: EventLogError) -> bytes:
    """The comment line a stream cut short by the event log ends with: ``: ended <code>: <why>``,
    the code being the HTTP error code a resume would get (a comment: never a message)."""
    if isinstance(exc, EventLogUnavailable):
        code = "event_log_unavailable"
    elif isinstance(exc, EventsExpired):
        code = "events_expired"
    elif isinstance(exc, UnknownRun):
        code = "unknown_run"
    else:
        code = "event_log_error"
    why = " ".join(str(exc).split())  # one line whatever the message holds
    return f": ended {code}: {why}\n".encode("utf-8", "backslashreplace")


DIRECT_SEND = "stagecast.direct_send"
"""Scope key of the server's own ``send`` (set by the app, ``api.app.StagecastApp``): an event
stream writes its body through it, past the middleware wrappers of ``send`` (error handlers,
CORS), which only look at ``http.response.start`` -- it still goes through them. One write per
event at 1,000 streams made those wrappers ~5 % of the server's CPU (bench/RESULTS.md)."""


def encode_entry(entry: LogEntry) -> str:
    """One event as an SSE frame (the JSON is one line: JSON escapes every newline)."""
    return f"event: {entry.type}\ndata: {entry.data}\nid: {entry.seq}\n\n"


# A lone surrogate (a split emoji from a model, "\ud800" in posted JSON) can only sit inside a
# JSON string, where backslashreplace writes it as the valid JSON escape \udXXX; valid text costs
# nothing extra.
_LONE_SURROGATES = "backslashreplace"


def encode_entries(entries: Iterable[LogEntry]) -> bytes:
    """Several frames as one write."""
    text = "".join([f"event: {e.type}\ndata: {e.data}\nid: {e.seq}\n\n" for e in entries])
    return text.encode("utf-8", _LONE_SURROGATES)


def encode_frame(entry: LogEntry) -> bytes:
    """One event as the bytes of its SSE frame (what the in-memory log stores)."""
    frame = f"event: {entry.type}\ndata: {entry.data}\nid: {entry.seq}\n\n"
    return frame.encode("utf-8", _LONE_SURROGATES)


def decode_frame(frame: bytes) -> LogEntry:
    """The event back from its frame (``encode_frame``'s inverse)."""
    event_line, data_line, id_line = frame.decode()[:-2].split("\n")
    return LogEntry(int(id_line[4:]), event_line[7:], data_line[6:])


SSE_CODEC = FrameCodec(encode_frame, decode_frame)


def open_frame(retry_ms: int) -> bytes:
    """What the stream starts with: the reconnect delay and a comment; no blank line, no message."""
    return f"retry: {retry_ms}\n: stagecast event stream v1\n".encode()


class StallWatch:
    """Drops the streams whose current write has not drained for ``timeout`` seconds."""

    def __init__(self, timeout: float, on_drop: Callable[[], None] | None = None) -> None:
        self.timeout = timeout
        self.on_drop = on_drop
        self.streams: set[EventStreamResponse] = set()

    def sweep(self, now: float | None = None) -> int:
        """Cancel every stalled stream; returns how many were dropped."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for stream in list(self.streams):
            since = stream.send_since
            if since is not None and now - since > self.timeout and stream.scope is not None:
                stream.stalled = True
                stream.scope.cancel()
                dropped += 1
                if self.on_drop is not None:
                    self.on_drop()
        return dropped


class EventStreamResponse(Response):
    """Streams batches of log entries as SSE; an empty batch means "idle: send a ping".

    Args:
        batches: ``EventLog.follow_frames(run_id, after, heartbeat=ping_interval)`` (frames
            already encoded, one write each), or lists of ``LogEntry`` (e.g. ``follow``).
        retry_ms: the ``retry:`` field sent first.
        headers: extra headers (e.g. ``Content-Location``).
        on_sent: called with the number of events after each write (metrics).
        on_close: called once when the stream ends, with True when the client went away first
            (or stopped reading and was dropped).
        watch: the ``StallWatch`` that drops this stream when its writes stop draining.
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        batches: AsyncIterator[list[LogEntry]] | AsyncIterator[FrameBatch],
        *,
        retry_ms: int = 2000,
        headers: Mapping[str, str] | None = None,
        on_sent: Callable[[int], None] | None = None,
        on_close: Callable[[bool], None] | None = None,
        watch: StallWatch | None = None,
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
        self.watch = watch
        self.send_since: float | None = None
        """When the write in progress started (None: no write pending)."""
        self.scope: anyio.CancelScope | None = None
        self.stalled = False

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
            send = scope.get(DIRECT_SEND, send)  # the body: straight to the server
            await send(
                {"type": "http.response.body", "body": open_frame(self.retry_ms), "more_body": True}
            )
            async with anyio.create_task_group() as group:
                self.scope = group.cancel_scope
                if self.watch is not None:
                    self.watch.streams.add(self)

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
            if self.watch is not None:
                self.watch.streams.discard(self)
            disconnected = disconnected or self.stalled
            aclose: Any = getattr(self.batches, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
            if self.on_close is not None:
                self.on_close(disconnected)

    async def _stream(self, send: Send) -> None:
        on_sent = self.on_sent
        monotonic = time.monotonic
        try:
            batch: list[LogEntry] | FrameBatch
            async for batch in self.batches:
                if batch.__class__ is FrameBatch:
                    body, count, _ = batch
                    if not count:
                        body = PING
                else:
                    count = len(batch)
                    body = encode_entries(batch) if count else PING  # type: ignore[arg-type]
                self.send_since = monotonic()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                self.send_since = None
                if on_sent is not None and count:
                    on_sent(count)
        except EventLogError as exc:
            # The run expired under a slow viewer, or Redis went away: the stream ends without a
            # run-end (clients resume with Last-Event-ID and get the 503/410 that says why) and
            # its last line, a comment every SSE parser skips, says why to someone reading it.
            last = ended_comment(exc)
        else:
            last = b""
        self.send_since = time.monotonic()  # the last write can stall too
        await send({"type": "http.response.body", "body": last, "more_body": False})
        self.send_since = None
