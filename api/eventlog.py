"""Where a run's events live between the engine and the viewers.

A run's sink appends each event once, already serialized (``LogEntry.data`` is the wire JSON), so
serialization costs once per event however many viewers watch. Viewers read by cursor: the
cursor is the last ``seq`` they have, the same number as the SSE ``id:`` and ``Last-Event-ID``.

The interface is shaped after Redis Streams so that a shared implementation can replace the
in-memory one without touching the routes (several workers behind one load balancer)::

    EventLog            Redis Streams (one stream per run, key stagecast:run:<id>)
    create(run_id)      XADD key 0-1 (a created marker: the run exists before its first event)
    append(run_id, e)   XADD key 1-<seq> MAXLEN <cap> f <frame> (queued, sent in order by one
                        writer task; ids are explicit so ``seq`` *is* the stream position)
    finish(run_id)      XADD key 2-0 (the finished marker wakes blocked readers) + PEXPIRE <ttl>
    read(after, wait)   XRANGE key (1-<after> + / XREAD BLOCK <wait ms> STREAMS key 1-<after>
    follow_frames       XRANGE to catch up, then the process's shared reader: the write script
                        PUBLISHes the runs it touched; one XREAD reads those for all viewers
    info / ainfo        XRANGE - + COUNT 2 and XREVRANGE + - COUNT 2 (first/last seq, finished)
    MAXLEN              exact, so the kept window is exactly the last <cap> events

``append`` is synchronous and must never block the event loop: the engine calls the sink
synchronously for every token.

Viewers of the hot path use ``follow_frames``: the log hands out the events already encoded for
the wire (``FrameCodec``; the SSE one lives in ``api.sse``, the only module that knows the format),
everything that arrived since the last write as ONE ``bytes`` object, so a write costs one
``send`` however many events it carries. ``read``/``follow`` still give ``LogEntry`` objects.

The in-memory implementation is ``api.memlog.InMemoryEventLog``; the shared one, on Redis
Streams, is ``api.redislog.RedisEventLog`` (its module docstring has the exact layout).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

__all__ = [
    "CursorError",
    "EventLog",
    "EventLogError",
    "EventLogUnavailable",
    "EventsExpired",
    "FrameBatch",
    "FrameCodec",
    "LogEntry",
    "LogInfo",
    "LogSlice",
    "UnknownRun",
]


class LogEntry(NamedTuple):
    """One event as stored: its seq (the cursor), its type, and its wire JSON."""

    seq: int
    type: str
    data: str


class LogInfo(NamedTuple):
    """Where a run's log stands."""

    first_seq: int
    """The oldest seq still kept (1 until the per-run cap drops events)."""
    last_seq: int
    """The newest seq (0 before the first event)."""
    finished: bool
    """True once the run ended: no more entries will come."""


class LogSlice(NamedTuple):
    """The answer to ``read``: the entries after the cursor, and whether the log is complete."""

    entries: list[LogEntry]
    finished: bool
    """True when the run ended and ``entries`` reach its last event."""


class FrameBatch(NamedTuple):
    """Events encoded for the wire, as one write (``events`` 0: idle, time to ping)."""

    body: bytes
    events: int
    last_seq: int
    """The seq of the last event in ``body`` (the viewer's cursor after this write)."""


class FrameCodec(NamedTuple):
    """How events become wire frames and back (``api.sse.SSE_CODEC``)."""

    encode: Callable[[LogEntry], bytes]
    decode: Callable[[bytes], LogEntry]


class EventLogError(Exception):
    """Base of the event log's errors."""


class EventLogUnavailable(EventLogError):
    """The log's store (Redis) cannot be reached; the message says so (HTTP 503)."""


class UnknownRun(EventLogError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} (unknown, or expired after it finished)")
        self.run_id = run_id


class CursorError(EventLogError):
    """A cursor beyond the newest event."""

    def __init__(self, run_id: str, after: int, last_seq: int) -> None:
        super().__init__(
            f"cursor {after} is past the end of run {run_id!r}: its last event is {last_seq}"
        )
        self.after, self.last_seq = after, last_seq


class EventsExpired(EventLogError):
    """A cursor before the kept window (the per-run cap dropped those events)."""

    def __init__(self, run_id: str, after: int, first_seq: int, cap: int) -> None:
        super().__init__(
            f"events {after + 1}..{first_seq - 1} of run {run_id!r} were dropped "
            f"(at most {cap} events are kept per run); resume from {first_seq - 1}"
        )
        self.after, self.first_seq = after, first_seq


class EventLog(ABC):
    """The events of every run, readable by cursor while the run goes on."""

    @abstractmethod
    def create(self, run_id: str) -> None:
        """Register a run before its first event."""

    @abstractmethod
    def append(self, run_id: str, entry: LogEntry) -> None:
        """Add the next event. Synchronous, non-blocking; ``entry.seq`` is last_seq + 1."""

    def adopt(self, run_id: str, last_seq: int) -> None:
        """Write the events after ``last_seq`` of a run another process created (a takeover);
        only a shared log (Redis) can."""
        raise NotImplementedError(f"{type(self).__name__} holds only this process's runs")

    @abstractmethod
    def finish(self, run_id: str) -> None:
        """The run ended: wake every reader; the TTL starts now."""

    @abstractmethod
    def info(self, run_id: str) -> LogInfo:
        """Where the log stands (raises ``UnknownRun``)."""

    @abstractmethod
    async def read(
        self, run_id: str, after: int, *, wait: float | None = None, limit: int | None = None
    ) -> LogSlice:
        """The entries with ``seq > after`` (at most ``limit``).

        With ``wait``, when there is nothing yet and the run goes on, wait up to ``wait`` seconds
        for more (an empty slice when none came). Raises ``UnknownRun``, ``CursorError`` (after
        past the end), ``EventsExpired`` (after before the kept window).
        """

    @abstractmethod
    def expire(self) -> list[str]:
        """Drop finished runs older than the TTL; returns their ids."""

    def check_cursor(self, run_id: str, after: int) -> LogInfo:
        """Validate a cursor before a stream opens (so the error can still be a 4xx)."""
        info = self.info(run_id)
        if after > info.last_seq:
            raise CursorError(run_id, after, info.last_seq)
        if after < info.first_seq - 1:
            raise EventsExpired(run_id, after, info.first_seq, self.cap)
        return info

    async def ainfo(self, run_id: str) -> LogInfo:
        """``info`` for any run of the deployment (a shared log asks its store)."""
        return self.info(run_id)

    async def acheck_cursor(self, run_id: str, after: int) -> LogInfo:
        """``check_cursor`` for any run of the deployment (what the routes use)."""
        info = await self.ainfo(run_id)
        if after > info.last_seq:
            raise CursorError(run_id, after, info.last_seq)
        if after < info.first_seq - 1:
            raise EventsExpired(run_id, after, info.first_seq, self.cap)
        return info

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` s) until what was appended is visible to every process
        (a shared log buffers its writes); False when the time ran out first."""
        return True

    async def aclose(self) -> None:  # noqa: B027 (optional hook: nothing to release in memory)
        """Release the log's connections (at shutdown, after the last run ended)."""

    @property
    def cap(self) -> int:
        return 0

    @property
    @abstractmethod
    def codec(self) -> FrameCodec:
        """The wire format ``follow_frames`` encodes to (``api.sse.SSE_CODEC`` by default)."""

    async def follow(
        self, run_id: str, after: int = 0, *, heartbeat: float | None = None, batch: int = 512
    ) -> AsyncIterator[list[LogEntry]]:
        """Replay from ``after``, then follow live, in batches; ends after the run's last event.

        With ``heartbeat``, yields an empty batch after that many idle seconds (time to ping).
        """
        while True:
            part = await self.read(run_id, after, wait=heartbeat or 3600.0, limit=batch)
            if part.entries:
                after = part.entries[-1].seq
                yield part.entries
            elif heartbeat is not None and not part.finished:
                yield []
            if part.finished:
                return

    async def follow_frames(
        self, run_id: str, after: int = 0, *, heartbeat: float | None = None
    ) -> AsyncIterator[FrameBatch]:
        """``follow``, with each batch already encoded as one write (``FrameBatch``).

        With ``heartbeat``, yields a batch of ``events`` 0 after that many idle seconds.
        Implementations that store encoded frames hand them out without re-encoding.
        """
        encode = self.codec.encode
        async for batch in self.follow(run_id, after, heartbeat=heartbeat):
            if batch:
                after = batch[-1].seq
                yield FrameBatch(b"".join([encode(e) for e in batch]), len(batch), after)
            else:
                yield FrameBatch(b"", 0, after)
