"""The SSE encoder (byte tables) and EventStreamResponse against a fake ASGI server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from stagecast.api.eventlog import (
    EventLogError,
    EventLogUnavailable,
    EventsExpired,
    FrameBatch,
    LogEntry,
    UnknownRun,
)
from stagecast.api.sse import (
    PING,
    SSE_CODEC,
    EventStreamResponse,
    decode_frame,
    encode_entries,
    encode_entry,
    encode_frame,
    open_frame,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (LogEntry(1, "run-start", '{"a":1}'), 'event: run-start\ndata: {"a":1}\nid: 1\n\n'),
        (
            LogEntry(42, "token", '{"text":"a\\nb é"}'),
            'event: token\ndata: {"text":"a\\nb é"}\nid: 42\n\n',
        ),
    ],
)
def test_encode_entry(entry: LogEntry, expected: str) -> None:
    assert encode_entry(entry) == expected


def test_batch_is_the_frames_joined_and_open_frame() -> None:
    entries = [LogEntry(1, "a", "{}"), LogEntry(2, "b", '{"é":1}')]
    assert encode_entries(entries) == "".join(map(encode_entry, entries)).encode()
    assert open_frame(1500) == b"retry: 1500\n: stagecast event stream v1\n"


async def batches(
    items: list[list[LogEntry]], gate: anyio.Event | None = None
) -> AsyncIterator[list[LogEntry]]:
    for batch in items:
        yield batch
    if gate is not None:
        await gate.wait()


async def test_response_writes_start_open_batches_pings_and_end() -> None:
    sent: list[dict[str, Any]] = []
    closed: list[bool] = []
    counts: list[int] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    items = [[LogEntry(1, "a", "{}"), LogEntry(2, "b", "{}")], [], [LogEntry(3, "c", "{}")]]
    response = EventStreamResponse(
        batches(items), retry_ms=10, on_sent=counts.append, on_close=closed.append
    )
    with anyio.fail_after(2):
        await response({"type": "http"}, receive, send)
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert b"content-length" not in headers
    bodies = [m["body"] for m in sent[1:]]
    assert bodies == [
        b"retry: 10\n: stagecast event stream v1\n",
        b"event: a\ndata: {}\nid: 1\n\nevent: b\ndata: {}\nid: 2\n\n",  # one write for two
        b": ping\n",
        b"event: c\ndata: {}\nid: 3\n\n",
        b"",
    ]
    assert [m["more_body"] for m in sent[1:]] == [True, True, True, True, False]
    assert counts == [2, 1] and closed == [False]


@pytest.mark.parametrize(
    ("error", "last"),
    [
        (
            EventLogUnavailable("the event log (Redis) is unavailable: Connection\nrefused"),
            b": ended event_log_unavailable: the event log (Redis) is unavailable: "
            b"Connection refused\n",
        ),
        (
            EventsExpired("r", 0, 9, 8),
            b": ended events_expired: " + str(EventsExpired("r", 0, 9, 8)).encode() + b"\n",
        ),
        (
            UnknownRun("r"),
            b": ended unknown_run: no run 'r' (unknown, or expired after it finished)\n",
        ),
        (EventLogError("odd"), b": ended event_log_error: odd\n"),
    ],
)
async def test_a_stream_the_log_cuts_short_ends_with_a_comment_saying_why(
    error: EventLogError, last: bytes
) -> None:
    sent: list[dict[str, Any]] = []
    closed: list[bool] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def cut() -> AsyncIterator[list[LogEntry]]:
        yield [LogEntry(1, "a", "{}")]
        raise error

    response = EventStreamResponse(cut(), retry_ms=10, on_close=closed.append)
    with anyio.fail_after(2):
        await response({"type": "http"}, receive, send)
    bodies = [m["body"] for m in sent[1:]]
    assert bodies == [
        b"retry: 10\n: stagecast event stream v1\n",
        b"event: a\ndata: {}\nid: 1\n\n",
        last,
    ]
    assert [m["more_body"] for m in sent[1:]] == [True, True, False]
    assert closed == [False]
    # one comment line, no blank line: never a message, whatever came before it
    assert last.startswith(b": ") and last.count(b"\n") == 1 and last.endswith(b"\n")


async def test_response_stops_on_disconnect_and_reports_it() -> None:
    closed: list[bool] = []
    disconnect = anyio.Event()
    gate = anyio.Event()  # never set: the stream would wait forever

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message.get("body", b"").startswith(b"event: a"):
            disconnect.set()

    response = EventStreamResponse(
        batches([[LogEntry(1, "a", "{}")]], gate), on_close=closed.append
    )
    with anyio.fail_after(2):
        await response({"type": "http"}, receive, send)
    assert closed == [True]


@pytest.mark.parametrize(
    "entry",
    [LogEntry(1, "run-start", '{"a":1}'), LogEntry(42, "token", '{"text":"a\\nb é: x"}')],
)
def test_frame_codec_round_trips(entry: LogEntry) -> None:
    assert encode_frame(entry) == encode_entry(entry).encode()
    assert decode_frame(encode_frame(entry)) == entry
    assert SSE_CODEC.decode(SSE_CODEC.encode(entry)) == entry


async def test_response_sends_frame_batches_as_they_are() -> None:
    sent: list[dict[str, Any]] = []
    counts: list[int] = []

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def frame_batches() -> AsyncIterator[FrameBatch]:
        yield FrameBatch(b"event: a\ndata: {}\nid: 1\n\nevent: b\ndata: {}\nid: 2\n\n", 2, 2)
        yield FrameBatch(b"", 0, 2)
        yield FrameBatch(b"event: c\ndata: {}\nid: 3\n\n", 1, 3)

    response = EventStreamResponse(frame_batches(), retry_ms=10, on_sent=counts.append)
    with anyio.fail_after(2):
        await response({"type": "http"}, receive, send)
    assert [m["body"] for m in sent[1:]] == [
        b"retry: 10\n: stagecast event stream v1\n",
        b"event: a\ndata: {}\nid: 1\n\nevent: b\ndata: {}\nid: 2\n\n",
        b": ping\n",
        b"event: c\ndata: {}\nid: 3\n\n",
        b"",
    ]
    assert counts == [2, 1]


def test_the_opener_and_pings_are_lines_no_parser_dispatches() -> None:
    """A blank line dispatches a message: the opener and pings have none, so a client that hands
    every dispatched block to the application (fetch-event-source) never sees an empty one."""
    stream = open_frame(2000) + PING + encode_frame(LogEntry(1, "a", "{}")) + PING + PING
    stream += encode_frame(LogEntry(2, "b", '{"x":1}')) + PING
    blocks = stream.split(b"\n\n")
    assert blocks[-1] == b": ping\n"  # what follows the last frame is not a message
    dispatched = blocks[:-1]
    assert [b.split(b"\n")[-2:] for b in dispatched] == [
        [b"data: {}", b"id: 1"],
        [b'data: {"x":1}', b"id: 2"],
    ]
    assert b"\n\n" not in open_frame(2000) and b"\n\n" not in PING


@pytest.mark.parametrize(
    "entry", [LogEntry(7, "token", '{"text":"ab"}'), LogEntry(1234, "x", "{}")]
)
def test_a_frame_cut_anywhere_before_its_last_byte_has_no_complete_id_line(entry: LogEntry) -> None:
    """A client that commits the id as soon as it reads the id line (fetch-event-source) cannot
    move Last-Event-ID past an event whose data it did not get, except when the cut falls on the
    one byte between the id line and the blank line that ends the frame."""
    frame = encode_frame(entry)
    id_line = f"id: {entry.seq}\n".encode()
    complete = [k for k in range(len(frame) + 1) if id_line in frame[:k]]
    assert complete == [len(frame) - 1, len(frame)]
    assert frame.index(b"data: ") < frame.index(id_line)
