"""The embedded event log: every run's events in this process's memory.

``InMemoryEventLog`` stores each run as one growing buffer of encoded frames plus an
``array('Q')`` of frame end offsets (8 bytes per event on top of the frame itself: no Python
object per event). Every ``block_bytes`` (16 KiB) of frames, the full part is sealed as a
zlib-compressed block (level 1, ~13x on token frames, ~3 µs per KiB); a finished run is sealed
whole. A viewer that keeps up reads the uncompressed tail; one that replays decompresses one
block per write.

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
import math
import time
import zlib
from array import array
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from stagecast.api.eventlog import (
    CursorError,
    EventLog,
    EventsExpired,
    FrameBatch,
    FrameCodec,
    LogEntry,
    LogInfo,
    LogSlice,
    UnknownRun,
)
from stagecast.api.sse import SSE_CODEC

__all__ = ["BLOCK_BYTES", "WRITE_BYTES", "InMemoryEventLog"]

BLOCK_BYTES = 16 * 1024
"""Frames are sealed (zlib-compressed) in blocks of about this many bytes."""
WRITE_BYTES = 256 * 1024
"""``follow_frames`` hands out at most about this many bytes per write (a replay is chunked)."""


@dataclass(slots=True)
class _RunLog:
    """One run's frames: sealed compressed blocks, then the uncompressed tail.

    Offsets are absolute (bytes of frames since the run's first event, dropped ones included):
    ``ends[i]`` is where the frame of seq ``first_seq + i`` ends; it starts at ``ends[i - 1]``
    (``start`` for the first kept one). Block ``b`` holds ``block_starts[b]`` up to the next
    block's start (or ``tail_start``); no frame straddles two blocks.
    """

    ends: array[int] = field(default_factory=lambda: array("Q"))
    start: int = 0
    blocks: list[bytes] = field(default_factory=list)
    block_starts: array[int] = field(default_factory=lambda: array("Q"))
    tail: bytearray = field(default_factory=bytearray)
    tail_start: int = 0
    first_seq: int = 1
    last_seq: int = 0
    finished_at: float | None = None
    waiters: dict[asyncio.Future[bool], None] = field(default_factory=dict)
    """Futures of waiting viewers (a dict: O(1) removal when thousands leave at once)."""

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, {}
        for fut in waiters:
            if not fut.done():
                fut.set_result(False)

    def seal(self) -> None:
        tail = self.tail
        if tail:
            self.blocks.append(zlib.compress(tail, 1))
            self.block_starts.append(self.tail_start)
            self.tail_start += len(tail)
            self.tail = bytearray()

    def region(self, offset: int) -> tuple[bytes | bytearray, int]:
        """The uncompressed bytes holding ``offset`` and the absolute offset they start at."""
        if offset >= self.tail_start:
            return self.tail, self.tail_start
        b = bisect_right(self.block_starts, offset) - 1
        return zlib.decompress(self.blocks[b]), self.block_starts[b]

    def drop_before(self, offset: int) -> None:
        """Free the blocks (and tail bytes) that end at or before ``offset``."""
        self.start = offset
        blocks, starts = self.blocks, self.block_starts
        n = 0
        last = len(blocks) - 1
        while n <= last and (starts[n + 1] if n < last else self.tail_start) <= offset:
            n += 1
        if n:
            del blocks[:n]
            del starts[:n]
        if offset > self.tail_start:
            del self.tail[: offset - self.tail_start]
            self.tail_start = offset

    def nbytes(self) -> int:
        return (
            sum(len(b) for b in self.blocks)
            + len(self.tail)
            + (len(self.ends) + len(self.block_starts)) * 8
        )


class _Pinger:
    """One follower's idle timer: a ``call_later`` re-armed per ping interval, not per read."""

    __slots__ = ("heartbeat", "log", "loop", "sent", "timer", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, heartbeat: float) -> None:
        self.loop, self.heartbeat = loop, heartbeat
        self.sent = loop.time()
        self.waiter: asyncio.Future[bool] | None = None
        self.log: _RunLog | None = None
        self.timer: asyncio.TimerHandle | None = loop.call_later(heartbeat, self.tick)

    def tick(self) -> None:
        idle = self.loop.time() - self.sent
        wait = self.heartbeat
        waiter = self.waiter
        if idle < self.heartbeat - 0.001:
            wait = self.heartbeat - idle
        elif waiter is not None and not waiter.done():
            # Idle and waiting: wake the follower with True (ping), out of the run's waiters.
            if self.log is not None:
                self.log.waiters.pop(waiter, None)
            waiter.set_result(True)
        self.timer = self.loop.call_later(wait, self.tick)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class InMemoryEventLog(EventLog):
    """One process's event log; see the module docstring for its memory bounds."""

    def __init__(
        self,
        *,
        max_events: int = 100_000,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        codec: FrameCodec | None = None,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        self.max_events = max_events
        self.ttl = ttl
        self.clock = clock
        self.block_bytes = block_bytes
        self._codec = codec or SSE_CODEC
        self._encode = self._codec.encode
        self._runs: dict[str, _RunLog] = {}
        self._first_finish = math.inf
        """No finished log is older than this (``expire`` scans only once one may be due:
        it runs at every ``create``, so 1,000 runs started at once were 1,000 full scans)."""
        self._slack = max(1, max_events // 16)

    @property
    def cap(self) -> int:
        return self.max_events

    @property
    def codec(self) -> FrameCodec:
        return self._codec

    def __len__(self) -> int:
        return len(self._runs)

    def stored_events(self) -> int:
        return sum(len(log.ends) for log in self._runs.values())

    def stored_bytes(self) -> int:
        """Bytes of frames (compressed where sealed) and offsets held for every run."""
        return sum(log.nbytes() for log in self._runs.values())

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
        log = self._runs.get(run_id)
        if log is None:
            raise UnknownRun(run_id)
        if log.finished_at is not None:
            raise ValueError(f"run {run_id!r} is finished; its log takes no more events")
        if entry.seq != log.last_seq + 1:
            raise ValueError(f"run {run_id!r}: expected seq {log.last_seq + 1}, got {entry.seq}")
        frame = self._encode(entry)
        if len(log.tail) >= self.block_bytes:
            log.seal()  # before: the newest frame stays in the tail, so live viewers never inflate
        log.tail += frame
        log.ends.append(log.tail_start + len(log.tail))
        log.last_seq = entry.seq
        if len(log.ends) > self.max_events + self._slack:
            drop = len(log.ends) - self.max_events
            log.drop_before(log.ends[drop - 1])
            del log.ends[:drop]
            log.first_seq += drop
        if log.waiters:
            log.wake()

    def finish(self, run_id: str) -> None:
        log = self._get(run_id)
        if log.finished_at is None:
            log.finished_at = self.clock()
            self._first_finish = min(self._first_finish, log.finished_at)
            log.seal()
            log.wake()

    def info(self, run_id: str) -> LogInfo:
        log = self._get(run_id)
        return LogInfo(log.first_seq, log.last_seq, log.finished_at is not None)

    def _index(self, run_id: str, log: _RunLog, after: int) -> int:
        """The index in ``log.ends`` of the first event after the cursor (checked)."""
        if after > log.last_seq:
            raise CursorError(run_id, after, log.last_seq)
        if after < log.first_seq - 1:
            raise EventsExpired(run_id, after, log.first_seq, self.max_events)
        return after - log.first_seq + 1

    def _chunk(
        self, log: _RunLog, index: int, max_bytes: int
    ) -> tuple[bytes | bytearray, int, int, int]:
        """Frames from event ``index`` on, within one block or the tail and about ``max_bytes``
        (at least one event): ``(region, region_start, begin, stop_index)``."""
        ends = log.ends
        begin = ends[index - 1] if index else log.start
        region, region_start = log.region(begin)
        limit = min(region_start + len(region), begin + max_bytes)
        stop = bisect_right(ends, limit, index)
        return region, region_start, begin, max(stop, index + 1)

    def frames(self, run_id: str, after: int, max_bytes: int = WRITE_BYTES) -> FrameBatch:
        """The encoded events after the cursor that are at hand, as one ``bytes`` write."""
        log = self._get(run_id)
        index = self._index(run_id, log, after)
        if index == len(log.ends):
            return FrameBatch(b"", 0, after)
        region, region_start, begin, stop = self._chunk(log, index, max_bytes)
        body = bytes(region[begin - region_start : log.ends[stop - 1] - region_start])
        return FrameBatch(body, stop - index, log.first_seq + stop - 1)

    def entries(self, run_id: str, after: int = 0, limit: int | None = None) -> list[LogEntry]:
        """The events after the cursor, decoded (not the hot path: tests, tools, ``read``)."""
        log = self._get(run_id)
        index = self._index(run_id, log, after)
        ends, decode = log.ends, self._codec.decode
        stop_all = len(ends) if limit is None else min(len(ends), index + limit)
        out: list[LogEntry] = []
        while index < stop_all:
            region, region_start, begin, stop = self._chunk(log, index, WRITE_BYTES)
            stop = min(stop, stop_all)
            for i in range(index, stop):
                start = ends[i - 1] if i else log.start
                out.append(decode(bytes(region[start - region_start : ends[i] - region_start])))
            index = stop
        return out

    def _slice(self, run_id: str, log: _RunLog, after: int, limit: int | None) -> LogSlice:
        entries = self.entries(run_id, after, limit)
        done = log.finished_at is not None and after + len(entries) == log.last_seq
        return LogSlice(entries, done)

    async def read(
        self, run_id: str, after: int, *, wait: float | None = None, limit: int | None = None
    ) -> LogSlice:
        log = self._get(run_id)
        part = self._slice(run_id, log, after, limit)
        if part.entries or part.finished or not wait:
            return part
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        log.waiters[fut] = None
        try:
            async with asyncio.timeout(wait):
                await fut
        except TimeoutError:
            return LogSlice([], False)
        finally:
            log.waiters.pop(fut, None)
        # The run may have expired while we waited: a missing run is UnknownRun, as above.
        return self._slice(run_id, self._get(run_id), after, limit)

    async def follow_frames(
        self, run_id: str, after: int = 0, *, heartbeat: float | None = None
    ) -> AsyncIterator[FrameBatch]:
        """Replay, then follow live: each write is everything at hand (up to ``WRITE_BYTES``)
        as one slice of the stored frames; no re-encoding, no per-event objects.

        Waiting costs one future per wake-up (set by ``append``/``finish``), no timeout scope;
        the ping interval is one timer per follower, re-armed every ``heartbeat`` seconds.
        """
        loop = asyncio.get_running_loop()
        pinger = _Pinger(loop, heartbeat) if heartbeat is not None else None
        fut: asyncio.Future[bool] | None = None
        try:
            while True:
                log = self._get(run_id)
                if after != log.last_seq:
                    batch = self.frames(run_id, after)
                    after = batch.last_seq
                    if pinger is not None:
                        pinger.sent = loop.time()
                    del log  # a slow send must not pin an expired run's frames
                    yield batch
                    continue
                if log.finished_at is not None:
                    return
                fut = loop.create_future()
                log.waiters[fut] = None
                if pinger is not None:
                    pinger.waiter, pinger.log = fut, log
                del log
                woke_by_ping = await fut
                if pinger is not None:
                    pinger.log = None
                if woke_by_ping:  # True: the ping timer, not an event
                    fut = None
                    assert pinger is not None
                    pinger.sent = loop.time()
                    yield FrameBatch(b"", 0, after)
                fut = None
        finally:
            if pinger is not None:
                pinger.cancel()
            if fut is not None:
                log_now = self._runs.get(run_id)
                if log_now is not None:
                    log_now.waiters.pop(fut, None)

    def discard(self, run_id: str) -> None:
        log = self._runs.pop(run_id, None)
        if log is not None:
            log.wake()

    def expire(self) -> list[str]:
        now = self.clock()
        if now - self._first_finish < self.ttl:
            return []
        gone = [
            run_id
            for run_id, log in self._runs.items()
            if log.finished_at is not None and now - log.finished_at >= self.ttl
        ]
        for run_id in gone:
            self.discard(run_id)
        self._first_finish = min(
            (log.finished_at for log in self._runs.values() if log.finished_at is not None),
            default=math.inf,
        )
        return gone
