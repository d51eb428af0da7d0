"""The shared event log: every run's events in a Redis Stream, readable from any process.

``RedisEventLog`` implements ``EventLog`` on redis-py's asyncio client, so several ``stagecast
serve`` processes (``uvicorn --workers N``, or hosts behind a load balancer with no sticky
routing) serve the stream of any run, whichever process executes it. Configure it with
``STAGECAST_EVENT_LOG=redis://host:6379/0`` (or ``event_log:`` in configs/server.yaml).

One stream per run, key ``<prefix>run:<run_id>`` (prefix ``stagecast:``). Entry ids are explicit
and derived from ``seq``, so a cursor (``Last-Event-ID``) *is* a stream position::

    0-1        created marker      (XADD by ``create``: the run exists before its first event)
    1-<seq>    the event <seq>     field ``f``: its encoded frame (the codec's bytes, as served)
    2-0        finished marker     (XADD by ``finish``, then PEXPIRE <ttl>)

so ``XREAD BLOCK <ms> STREAMS key 1-<after>`` replays after the cursor and then follows live, and
the finished marker wakes every blocked reader (it is the newest entry: nothing comes after it).

- **Writes.** ``append`` is synchronous (the engine calls the sink for every token): it encodes the
  frame and queues it; one writer task sends everything queued since its last round trip as one
  pipeline, in order, each run's consecutive events as one script call (``_APPEND``: one
  ``XADD key 1-<seq> MAXLEN <cap>`` per event on the server, one command to encode here).
  While Redis is unreachable the writer keeps the queue (up to ``max_pending`` entries, then it
  drops the oldest and says so) and retries every ``retry_seconds``; an ``XADD`` that already
  landed before a cut is recognised (Redis refuses an id that is not above the top) and
  skipped, so nothing is written twice.
- **Per-run cap.** ``MAXLEN = max_events`` (exact trimming): the oldest events go; a cursor before
  the kept window gets ``EventsExpired`` (HTTP 410), the same as the in-memory log. A follower
  that falls behind the window mid-stream gets ``EventsExpired`` too, never a silent gap.
- **TTL.** A stream expires ``ttl`` seconds after ``finish`` (Redis deletes it: HTTP 404 after);
  a run whose process died before ``finish`` expires ``orphan_ttl`` seconds after its last write.
- **Reads** see this process's own writes: ``read`` and ``follow_frames`` first wait for the
  writer to send what is queued. ``info`` (synchronous) knows the runs this process writes;
  ``ainfo``/``acheck_cursor`` ask Redis and work for every run.
- **Redis down.** Reads raise ``EventLogUnavailable`` (HTTP 503 before a stream opens; an open
  stream ends, and the client's reconnect with ``Last-Event-ID`` resumes once Redis is back).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from stagecast.api.eventlog import (
    CursorError,
    EventLog,
    EventLogUnavailable,
    EventsExpired,
    FrameBatch,
    FrameCodec,
    LogEntry,
    LogInfo,
    LogSlice,
    UnknownRun,
)
from stagecast.api.sse import SSE_CODEC

__all__ = ["CREATED_ID", "FINISHED_ID", "RedisEventLog", "event_id"]

logger = logging.getLogger("stagecast.redislog")

CREATED_ID = b"0-1"
FINISHED_ID = b"2-0"
FIELD = b"f"
BLOCK_SECONDS = 2.0
"""Longest single XREAD BLOCK (under the client's socket timeout); longer waits loop."""
WRITE_COUNT = 1000
"""At most this many events per XREAD, so one write of a replay stays bounded."""
_DUPLICATE = "equal or smaller than the target stream top item"
BATCH_EVENTS = 1000
"""At most this many events per append script call."""
_APPEND = """
-- KEYS[1]: the run's stream; ARGV: cap, first seq, then one frame per event (in seq order).
-- One XADD per event (ids 1-<seq>, exact MAXLEN) in one round trip and one command to encode;
-- an id already there (a retry after a cut) is skipped. Returns '' or the first other error.
local cap, seq, refused = ARGV[1], tonumber(ARGV[2]), ''
for i = 3, #ARGV do
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', cap, '1-' .. (seq + i - 3), 'f', ARGV[i])
  if type(r) == 'table' and r.err and refused == '' and
     not string.find(r.err, 'equal or smaller', 1, true) then
    refused = r.err
  end
end
return refused
"""


def event_id(seq: int) -> str:
    """The stream entry id of event ``seq`` (and the XREAD cursor after it)."""
    return f"1-{seq}"


def _seq_of(entry_id: bytes) -> int | None:
    """``seq`` of an event entry id, None for a marker."""
    if entry_id[:2] != b"1-":
        return None
    return int(entry_id[2:])


@dataclass(slots=True)
class _Local:
    """What this process knows of a run it writes (``info`` answers from it)."""

    last_seq: int = 0
    finished_at: float | None = None


def _unavailable(exc: BaseException) -> EventLogUnavailable:
    return EventLogUnavailable(f"the event log (Redis) is unavailable: {exc}")


class RedisEventLog(EventLog):
    """Events of every run in Redis Streams; see the module docstring."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        max_events: int = 100_000,
        ttl: float = 600.0,
        orphan_ttl: float = 86_400.0,
        prefix: str = "stagecast:",
        codec: FrameCodec | None = None,
        max_pending: int = 1_000_000,
        retry_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("RedisEventLog needs a redis:// URL or a client")
            client = aioredis.Redis.from_url(url, socket_timeout=BLOCK_SECONDS + 5.0)
        self.redis = client
        self.url = url
        self.max_events = max_events
        self.ttl = ttl
        self.orphan_ttl = orphan_ttl
        self.prefix = prefix
        self.max_pending = max_pending
        self.retry_seconds = retry_seconds
        self.clock = clock
        self._codec = codec or SSE_CODEC
        self._encode = self._codec.encode
        self._local: dict[str, _Local] = {}
        # the writer: ops queued by the synchronous methods, sent in order by one task
        self._ops: list[tuple[bytes, str, int, bytes]] = []  # (kind, key, seq, frame)
        self._queued = 0
        self._sent = 0
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._append = self.redis.register_script(_APPEND)
        self._writer: asyncio.Task[None] | None = None
        self.dropped_writes = 0
        self.write_errors = 0

    @property
    def cap(self) -> int:
        return self.max_events

    @property
    def codec(self) -> FrameCodec:
        return self._codec

    def key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    # -- writes (synchronous, queued) ------------------------------------------------------

    def _queue(self, kind: bytes, run_id: str, seq: int = 0, frame: bytes = b"") -> None:
        self._ops.append((kind, self.key(run_id), seq, frame))
        self._queued += 1
        if len(self._ops) > self.max_pending:  # Redis has been away for long: keep the newest
            del self._ops[0]
            self._sent += 1
            self.dropped_writes += 1
        wake = self._wake
        if wake is None or self._writer is None or self._writer.done():
            wake = self._wake = asyncio.Event()
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(wake), name="stagecast redis event log writer"
            )
        wake.set()

    def create(self, run_id: str) -> None:
        self.expire()
        if run_id in self._local:
            raise ValueError(f"run {run_id!r} already has a log")
        self._local[run_id] = _Local()
        self._queue(b"c", run_id)

    def adopt(self, run_id: str, last_seq: int) -> None:
        """Write the events after ``last_seq`` of a run another process created (a takeover)."""
        self._local[run_id] = _Local(last_seq=last_seq)

    def append(self, run_id: str, entry: LogEntry) -> None:
        local = self._local.get(run_id)
        if local is None:
            raise UnknownRun(run_id)
        if local.finished_at is not None:
            raise ValueError(f"run {run_id!r} is finished; its log takes no more events")
        if entry.seq != local.last_seq + 1:
            raise ValueError(f"run {run_id!r}: expected seq {local.last_seq + 1}, got {entry.seq}")
        local.last_seq = entry.seq
        self._queue(b"x", run_id, entry.seq, self._encode(entry))

    def finish(self, run_id: str) -> None:
        local = self._local.get(run_id)
        if local is None:
            raise UnknownRun(run_id)
        if local.finished_at is None:
            local.finished_at = self.clock()
            self._queue(b"f", run_id)

    async def _write_loop(self, wake: asyncio.Event) -> None:
        while True:
            try:
                await self._write_batches(wake)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop every run's writes
                logger.exception("event log writer failed; restarting it")
                await asyncio.sleep(self.retry_seconds)

    async def _write_batches(self, wake: asyncio.Event) -> None:
        ttl_ms = max(1, int(self.ttl * 1000))
        orphan_ms = max(1, int(self.orphan_ttl * 1000))
        cap = self.max_events
        while True:
            await wake.wait()
            wake.clear()
            while self._ops:
                ops = self._ops
                self._ops = []
                pipe = self.redis.pipeline(transaction=False)
                touched: set[str] = set()
                batch: list[bytes] = []  # frames of consecutive events of one run
                scripts: set[int] = set()  # where the script calls are in the pipeline
                batch_key, batch_first = "", 0
                for kind, key, seq, frame in ops:
                    if kind == b"x":
                        if batch and (
                            key != batch_key
                            or seq != batch_first + len(batch)
                            or len(batch) >= BATCH_EVENTS
                        ):
                            scripts.add(
                                self._queue_append(pipe, batch_key, cap, batch_first, batch)
                            )
                            batch = []
                        if not batch:
                            batch_key, batch_first = key, seq
                        batch.append(frame)
                        touched.add(key)
                        continue
                    if batch:
                        scripts.add(self._queue_append(pipe, batch_key, cap, batch_first, batch))
                        batch = []
                    if kind == b"c":
                        pipe.xadd(key, {FIELD: b""}, id=CREATED_ID)
                        touched.add(key)
                    else:
                        pipe.xadd(key, {FIELD: b""}, id=FINISHED_ID)
                        pipe.pexpire(key, ttl_ms)
                        touched.discard(key)
                if batch:
                    scripts.add(self._queue_append(pipe, batch_key, cap, batch_first, batch))
                for key in touched:
                    pipe.pexpire(key, orphan_ms)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError) as exc:
                    self.write_errors += 1
                    logger.warning("event log writes wait for Redis (%d queued): %s", len(ops), exc)
                    self._ops[:0] = ops  # retry them first, in order
                    await asyncio.sleep(self.retry_seconds)
                    continue
                if any(isinstance(r, NoScriptError) for r in results):
                    # a new or restarted Redis: load the script, send the batch again (what
                    # landed already is recognised and skipped)
                    try:
                        await self.redis.script_load(_APPEND)
                    except (RedisError, OSError):
                        await asyncio.sleep(self.retry_seconds)
                    self._ops[:0] = ops
                    continue
                for at, result in enumerate(results):
                    if at in scripts and isinstance(result, bytes) and result:  # its refusal
                        result = ResponseError(result.decode(errors="replace"))
                    if isinstance(result, ResponseError) and _DUPLICATE not in str(result):
                        self.write_errors += 1
                        logger.error("event log write refused by Redis: %s", result)
                self._sent += len(ops)
                self._release()

    def _queue_append(self, pipe: Any, key: str, cap: int, first: int, frames: list[bytes]) -> int:
        """One ``_APPEND`` call in the pipeline (a Redis without the script: see the writer);
        its index in the pipeline."""
        at = len(pipe)
        pipe.evalsha(self._append.sha, 1, key, cap, first, *frames)
        return at

    def _release(self) -> None:
        sent = self._sent
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, fut in self._flushes:
            if target <= sent:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((target, fut))
        self._flushes = keep

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is in Redis (the writer retries while it is
        away); at most ``timeout`` seconds, then False."""
        if self._sent >= self._queued:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((self._queued, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        return True

    async def aclose(self) -> None:
        """Send what is queued (bounded by the caller), then close the connections."""
        if not await self.flush(5.0):
            logger.error("event log: %d writes not sent to Redis at shutdown", len(self._ops))
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        await self.redis.aclose()

    # -- reads -----------------------------------------------------------------------------

    def info(self, run_id: str) -> LogInfo:
        """Where a run this process writes stands (no round trip); ``ainfo`` for any run."""
        local = self._local.get(run_id)
        if local is None:
            raise UnknownRun(run_id)
        first = max(1, local.last_seq - self.max_events + 1)
        return LogInfo(first, local.last_seq, local.finished_at is not None)

    async def _state(
        self, run_id: str, after: int | None = None, limit: int | None = None
    ) -> tuple[LogInfo, list[tuple[bytes, dict[bytes, bytes]]]]:
        """The run's ``LogInfo`` and (with ``after``) the entries after it, in one round trip."""
        if self._sent < self._queued:  # see this process's own writes (bounded: Redis may be away)
            await self.flush(BLOCK_SECONDS)
        key = self.key(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(key, "-", "+", count=2)
        pipe.xrevrange(key, "+", "-", count=2)
        if after is not None:
            pipe.xrange(key, "(" + event_id(after), "+", count=limit)
        try:
            results = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None
        head, tail = results[0], results[1]
        if not head:
            raise UnknownRun(run_id)
        first = next((s for s in (_seq_of(i) for i, _ in head) if s is not None), None)
        finished = tail[0][0] == FINISHED_ID
        last = next((s for s in (_seq_of(i) for i, _ in tail) if s is not None), 0)
        info = LogInfo(first if first is not None else last + 1, last, finished)
        return info, (results[2] if after is not None else [])

    async def ainfo(self, run_id: str) -> LogInfo:
        return (await self._state(run_id))[0]

    def _check(self, run_id: str, info: LogInfo, after: int) -> None:
        if after > info.last_seq:
            raise CursorError(run_id, after, info.last_seq)
        if after < info.first_seq - 1:
            raise EventsExpired(run_id, after, info.first_seq, self.max_events)

    def _decode(self, raw: list[tuple[bytes, dict[bytes, bytes]]]) -> list[LogEntry]:
        decode = self._codec.decode
        return [decode(fields[FIELD]) for entry_id, fields in raw if entry_id[:2] == b"1-"]

    async def read(
        self, run_id: str, after: int, *, wait: float | None = None, limit: int | None = None
    ) -> LogSlice:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (wait or 0.0)
        while True:
            info, raw = await self._state(run_id, after, limit)
            self._check(run_id, info, after)
            entries = self._decode(raw)
            done = info.finished and after + len(entries) == info.last_seq
            left = deadline - loop.time()
            if entries or done or left <= 0:
                return LogSlice(entries, done)
            try:
                await self.redis.xread(
                    {self.key(run_id): event_id(after)},
                    count=1,
                    block=max(1, int(min(left, BLOCK_SECONDS) * 1000)),
                )
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from None

    async def follow_frames(
        self, run_id: str, after: int = 0, *, heartbeat: float | None = None
    ) -> AsyncIterator[FrameBatch]:
        """Replay, then follow live with XREAD BLOCK: each write is the frames that one XREAD
        returned (up to ``WRITE_COUNT``), joined as stored; a ping after ``heartbeat`` idle s.

        Raises ``EventsExpired`` when the cap dropped events this viewer had not read yet (never
        a gap), ``UnknownRun`` when the run expired, ``EventLogUnavailable`` when Redis is away.
        """
        info, _ = await self._state(run_id)
        self._check(run_id, info, after)
        if info.finished and after == info.last_seq:
            return
        loop = asyncio.get_running_loop()
        key = self.key(run_id)
        cursor = event_id(after)
        sent = loop.time()
        block = BLOCK_SECONDS if heartbeat is None else min(heartbeat, BLOCK_SECONDS)
        block_ms = max(1, int(block * 1000))
        while True:
            try:
                got: Any = await self.redis.xread({key: cursor}, count=WRITE_COUNT, block=block_ms)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from None
            if got:
                raw = got[0][1]
                frames = [f[FIELD] for i, f in raw if i[:2] == b"1-"]
                done = raw[-1][0] == FINISHED_ID
                if frames:
                    first = _seq_of(raw[0][0])
                    if first is not None and first != after + 1:
                        raise EventsExpired(run_id, after, first, self.max_events)
                    after += len(frames)
                    cursor = event_id(after)
                    sent = loop.time()
                    yield FrameBatch(b"".join(frames), len(frames), after)
                if done:
                    return
                continue
            if heartbeat is not None and loop.time() - sent >= heartbeat - 0.001:
                try:
                    exists = await self.redis.exists(key)
                except (RedisError, OSError) as exc:
                    raise _unavailable(exc) from None
                if not exists:
                    raise UnknownRun(run_id)
                sent = loop.time()
                yield FrameBatch(b"", 0, after)

    def expire(self) -> list[str]:
        """Forget what this process knows of its finished runs after the TTL (Redis deletes
        the streams by itself)."""
        now = self.clock()
        gone = [
            run_id
            for run_id, local in self._local.items()
            if local.finished_at is not None and now - local.finished_at >= self.ttl
        ]
        for run_id in gone:
            del self._local[run_id]
        return gone

    def __len__(self) -> int:
        return len(self._local)
