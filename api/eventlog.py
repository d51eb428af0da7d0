"""Where a run's events live between the engine and the viewers.

A run's sink appends each event once, already serialized (``LogEntry.data`` is the wire JSON), so
serialization costs once per event however many viewers watch. Viewers read by cursor: the
cursor is the last ``seq`` they have, the same number as the SSE ``id:`` and ``Last-Event-ID``.

The interface is shaped after Redis Streams so that a shared implementation can replace the
in-memory one without touching the routes (several workers behind one load balancer)::

    EventLog            Redis Streams (one stream per run, key stagecast:run:<id>)
    create(run_id)      nothing (XADD creates the stream)
    append(run_id, e)   XADD key 0-<seq> type <type> data <json> (buffered by a writer task,
                        in order; ids are explicit so ``seq`` *is* the stream id)
    finish(run_id)      EXPIRE key <ttl> after the run-end entry
    read(after, wait)   XRANGE key (0-<after> + / XREAD BLOCK <wait ms> STREAMS key 0-<after>
    info(run_id)        XINFO STREAM (first/last entry id) + a "finished" flag key
    MAXLEN              XADD ... MAXLEN ~ <cap>

``append`` is synchronous and must never block the event loop: the engine calls the sink
synchronously for every token.

``InMemoryEventLog`` bounds memory two ways:

- **per-run cap**: at most ``max_events`` entries per run (plus up to 1/16 of it transiently,
  because the oldest entries are dropped in batches); a cursor before the kept window gets
  ``EventsExpired`` (HTTP 410) naming the first ``seq`` still kept;
- **TTL**: a finished run's log is dropped ``ttl`` seconds after ``finish``; ``expire()`` does it
  and is called lazily (on ``create``) and by the server's sweeper; a dropped run is unknown
  (HTTP 404).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "CursorError",
    "EventLog",
    "EventLogError",
    "EventsExpired",
    "InMemoryEventLog",
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


class EventLogError(Exception):
    """Base of the event log's errors."""


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

    @property
    def cap(self) -> int:
        return 0

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


@dataclass(slots=True)
class _RunLog:
    entries: list[LogEntry] = field(default_factory=list)
    first_seq: int = 1
    last_seq: int = 0
    finished_at: float | None = None
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


class InMemoryEventLog(EventLog):
    """One process's event log; see the module docstring for its memory bounds."""

    def __init__(
        self,
        *,
        max_events: int = 100_000,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_events = max_events
        self.ttl = ttl
        self.clock = clock
        self._runs: dict[str, _RunLog] = {}
        self._slack = max(1, max_events // 16)

    @property
    def cap(self) -> int:
        return self.max_events

    def __len__(self) -> int:
        return len(self._runs)

    def stored_events(self) -> int:
        return sum(len(log.entries) for log in self._runs.values())

    def _get(self, run_id: str) -> _RunLog:
        log = self._runs.get(run_id)
        if log is None:
            raise UnknownRun(run_id)
        return log

    def create(self, run_id: str) -> None:
        self.expire()
        if run_id in self._runs:
            raise ValueError(f"run {run_id!r} already has a log")
        self._runs[run_id] = _RunLog()

    def append(self, run_id: str, entry: LogEntry) -> None:
        log = self._get(run_id)
        if log.finished_at is not None:
            raise ValueError(f"run {run_id!r} is finished; its log takes no more events")
        if entry.seq != log.last_seq + 1:
            raise ValueError(f"run {run_id!r}: expected seq {log.last_seq + 1}, got {entry.seq}")
        entries = log.entries
        entries.append(entry)
        log.last_seq = entry.seq
        if len(entries) > self.max_events + self._slack:
            drop = len(entries) - self.max_events
            del entries[:drop]
            log.first_seq += drop
        if log.waiters:
            log.wake()

    def finish(self, run_id: str) -> None:
        log = self._get(run_id)
        if log.finished_at is None:
            log.finished_at = self.clock()
            log.wake()

    def info(self, run_id: str) -> LogInfo:
        log = self._get(run_id)
        return LogInfo(log.first_seq, log.last_seq, log.finished_at is not None)

    def _slice(self, run_id: str, log: _RunLog, after: int, limit: int | None) -> LogSlice:
        if after > log.last_seq:
            raise CursorError(run_id, after, log.last_seq)
        if after < log.first_seq - 1:
            raise EventsExpired(run_id, after, log.first_seq, self.max_events)
        start = after - log.first_seq + 1
        stop = len(log.entries) if limit is None else min(len(log.entries), start + limit)
        entries = log.entries[start:stop]
        done = log.finished_at is not None and stop == len(log.entries)
        return LogSlice(entries, done)

    async def read(
        self, run_id: str, after: int, *, wait: float | None = None, limit: int | None = None
    ) -> LogSlice:
        log = self._get(run_id)
        part = self._slice(run_id, log, after, limit)
        if part.entries or part.finished or not wait:
            return part
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        log.waiters.append(fut)
        try:
            async with asyncio.timeout(wait):
                await fut
        except TimeoutError:
            return LogSlice([], False)
        finally:
            if fut in log.waiters:
                log.waiters.remove(fut)
        # The run may have expired while we waited: a missing run is UnknownRun, as above.
        return self._slice(run_id, self._get(run_id), after, limit)

    def discard(self, run_id: str) -> None:
        log = self._runs.pop(run_id, None)
        if log is not None:
            log.wake()

    def expire(self) -> list[str]:
        now = self.clock()
        gone = [
            run_id
            for run_id, log in self._runs.items()
            if log.finished_at is not None and now - log.finished_at >= self.ttl
        ]
        for run_id in gone:
            self.discard(run_id)
        return gone
