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
  pipeline, in order, every run's ops in one script call per ``BATCH_EVENTS`` events
  (``_WRITE``: one ``XADD key 1-<seq> MAXLEN <cap>`` per event and one PEXPIRE per run on the
  server; one command to encode and one reply here, however many runs it touched).
  While Redis is unreachable the writer keeps the queue (up to ``max_pending`` entries, then it
  drops the oldest and says so) and retries every ``retry_seconds``; an ``XADD`` that already
  landed before a cut is recognised (Redis refuses an id that is not above the top) and
  skipped, so nothing is written twice.
- **One writer per run (fencing).** ``<key>:w`` holds the token of the log that writes the run
  (set by its created marker, or by the first write). A worker that takes a run over calls
  ``fence`` before it reads the log: from then on the write script skips the old writer's ops
  for that run and tells it (``on_fenced``), so a worker taken for dead that is not (stalled,
  cut off from Redis for longer than the heartbeat timeout) never interleaves its events with
  the new owner's.
- **Per-run cap.** ``MAXLEN = max_events`` (exact trimming): the oldest events go; a cursor before
  the kept window gets ``EventsExpired`` (HTTP 410), the same as the in-memory log. A follower
  that falls behind the window mid-stream gets ``EventsExpired`` too, never a silent gap.
- **TTL.** A stream expires ``ttl`` seconds after ``finish`` (Redis deletes it: HTTP 404 after);
  a run whose process died before ``finish`` expires ``orphan_ttl`` seconds after its last write.
- **Live frames.** The write script also PUBLISHes each run's new frames on a channel named
  like its stream (``<first seq> <len>…\n<frames>``; ``end <last seq>`` after the finished
  marker). A process holds one subscription connection, read with hiredis straight off the
  socket (``_Subscription``), and subscribes a run's channel while it has viewers of that run at
  the top of the stream; a message hands the frames to every such viewer with no read of the
  stream. The stream stays the truth: a viewer's first join, a message that does not continue a
  viewer (a gap), a lost subscription, and a sweep of every followed run each ``sweep_seconds``
  are covered by one shared XREAD (no BLOCK) of just those runs; frames are never taken from a
  channel past a gap.
- **Reads** see this process's own writes: ``read`` and ``follow_frames`` first wait for the
  writer to send what is queued. ``info`` (synchronous) knows the runs this process writes;
  ``ainfo``/``acheck_cursor`` ask Redis and work for every run.
- **Redis down.** Reads raise ``EventLogUnavailable`` (HTTP 503 before a stream opens; an open
  stream ends, and the client's reconnect with ``Last-Event-ID`` resumes once Redis is back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

__all__ = ["CREATED_ID", "FINISHED_ID", "RedisEventLog", "event_id", "redis_client"]

logger = logging.getLogger("stagecast.redislog")

CREATED_ID = b"0-1"
FINISHED_ID = b"2-0"
FIELD = b"f"
BLOCK_SECONDS = 2.0
"""Longest single XREAD BLOCK (under the client's socket timeout); longer waits loop."""
WRITE_COUNT = 1000
"""At most this many events per XREAD, so one write of a replay stays bounded."""
DELIVER_SLICE = 100
"""Runs handed out between two turns of the event loop, from one shared read."""
SWEEP_SECONDS = 1.0
"""How often the shared XREAD reads every followed run, whatever the channel said."""
LAG_FRAMES = 4 * WRITE_COUNT
"""A viewer with this many frames handed to it and not yet written leaves the shared read."""
_DUPLICATE = "equal or smaller than the target stream top item"
BATCH_EVENTS = 1000
"""At most this many events per write script call (a script blocks Redis while it runs)."""
_WRITE = """
-- One writer round trip: every run's ops in order, one command to encode and one reply however
-- many runs it touched. KEYS: one per op; ARGV: cap, orphan TTL ms, finished TTL ms, the
-- writer's token, then per op: 'x', first seq, n, n frames (XADD 1-<seq>.. with exact MAXLEN,
-- the orphan TTL, and the frames PUBLISHed on the run's key as '<first> <len>..\\n<frames>') |
-- 'c' (the created marker 0-1, orphan TTL) | 'f', last seq (the finished marker 2-0, the TTL,
-- 'end <last>' PUBLISHed). An id already there (a retry after a cut) is skipped.
-- Fencing: <key>:w names the run's writer. Every op claims it when no one has and is skipped
-- when another writer has (the run was taken over: ``RedisEventLog.fence``); checked once per
-- run per call.
-- Returns {the first other error or '', the keys of the runs fenced off}.
local cap, orphan, ttl, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local at, refused, fenced = 5, '', {}
local function check(r)
  if type(r) == 'table' and r.err and not string.find(r.err, 'equal or smaller', 1, true) then
    if refused == '' then refused = r.err end
    return false
  end
  return true
end
local seen = {}
local function mine(key)  -- once per run and call: a run's later ops in it follow suit
  if seen[key] == nil then
    local w = redis.call('GET', key .. ':w')
    seen[key] = not (w and w ~= token)
    -- claimed when no one holds it; its TTL is not renewed on every write (one GET is the hot
    -- path's whole cost): once it lapses, the next write claims it again
    if not w then
      redis.call('SET', key .. ':w', token, 'PX', orphan)
    elseif not seen[key] then
      fenced[#fenced + 1] = key
    end
  end
  return seen[key]
end
for k = 1, #KEYS do
  local key, kind = KEYS[k], ARGV[at]
  if kind == 'x' then
    local seq, n = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
    if mine(key) then
      local ok, head = true, {ARGV[at + 1]}
      for i = 0, n - 1 do
        local frame = ARGV[at + 3 + i]
        ok = check(redis.pcall('XADD', key, 'MAXLEN', cap, '1-' .. (seq + i), 'f', frame)) and ok
        head[i + 2] = #frame
      end
      redis.call('PEXPIRE', key, orphan)
      if ok then
        redis.call('PUBLISH', key,
          table.concat(head, ' ') .. '\\n' .. table.concat(ARGV, '', at + 3, at + 2 + n))
      end
    end
    at = at + 3 + n
  elseif kind == 'c' then
    if mine(key) then
      check(redis.pcall('XADD', key, '0-1', 'f', ''))
      redis.call('PEXPIRE', key, orphan)
    end
    at = at + 1
  else
    if mine(key) then
      if check(redis.pcall('XADD', key, '2-0', 'f', '')) then
        redis.call('PUBLISH', key, 'end ' .. ARGV[at + 1])
      end
      redis.call('PEXPIRE', key, ttl)
      redis.call('PEXPIRE', key .. ':w', ttl)  -- the writer key goes with the stream
    end
    at = at + 2
  end
end
return {refused, unpack(fenced)}
"""


POOL_CONNECTIONS = 64
"""Connections per client and process: commands beyond wait for one (``POOL_WAIT`` s at most).
The shared XREAD holds one, whatever the number of viewers (the subscription has its own
connection, outside the pool); redis-py's default pool would
instead refuse the 101st concurrent command with "Too many connections"."""
POOL_WAIT = 10.0
RETRIES = 2
"""A command whose connection broke is sent again on a new one this many times (a pooled
connection to a Redis that restarted fails once; redis-py's URL clients retry none). Every
command Stagecast sends is safe to repeat: the write script skips ids already there, the admit
script recognises a run it already queued."""


def redis_client(url: str, socket_timeout: float) -> aioredis.Redis:
    """A client on a bounded, blocking connection pool (see ``POOL_CONNECTIONS``) that sends a
    command again after a broken connection (``RETRIES``)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_CONNECTIONS,
        timeout=POOL_WAIT,
        socket_timeout=socket_timeout,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return aioredis.Redis.from_pool(pool)


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
    released: bool = False
    """Handed over to another worker: what this process's copy emits after is not written."""


@dataclass(slots=True, eq=False)
class _Follow:
    """One viewer following a run live through its run's channel and the shared read."""

    key: bytes
    run_id: str
    after: int
    """The seq of the last frame handed to it (its cursor in the shared XREAD)."""
    frames: list[bytes] = field(default_factory=list)
    waiter: asyncio.Future[bool] | None = None
    done: bool = False
    lagging: bool = False
    """It fell ``LAG_FRAMES`` behind (a slow socket): out of the shared read, it catches up by
    itself with XRANGE and joins again."""
    error: BaseException | None = None
    sent: float = 0.0
    timer: asyncio.TimerHandle | None = None
    """Its ping timer: one ``call_later`` re-armed per ping interval, not per event."""

    def wake(self, ping: bool = False) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(ping)


def _ping(follow: _Follow, heartbeat: float) -> None:
    """A follower's ping timer: wake it with True once idle for ``heartbeat`` s, re-arm."""
    if follow.timer is None:
        return  # the viewer left
    loop = asyncio.get_running_loop()
    idle = loop.time() - follow.sent
    if idle >= heartbeat - 0.001:
        follow.wake(ping=True)
        wait = heartbeat
    else:
        wait = heartbeat - idle
    follow.timer = loop.call_later(wait, _ping, follow, heartbeat)


class _Subscription:
    """The process's connection subscribed to the channels of the runs its viewers follow.

    Opened by redis-py (so the URL's every option applies: auth, TLS, a unix socket; RESP2),
    then read with hiredis directly, each chunk the socket gives parsed at once: redis-py's
    ``PubSub.get_message`` costs ~16 µs of Python per message, this ~0.5 (bench/RESULTS.md).
    SUBSCRIBE and UNSUBSCRIBE are written without waiting: their confirmations come in order
    with the messages (``RedisEventLog._on_reply``)."""

    def __init__(self, log: RedisEventLog) -> None:
        self.log = log
        self.conn: Any = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.open = False

    async def connect(self) -> None:
        pool = self.log.redis.connection_pool
        conn: Any = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})
        await conn.connect()
        # the open stream, past the handshake: redis-py's asyncio connections keep it in these
        # (private) attributes since 4.2; pyproject pins redis below the next major so a rename
        # is caught by the tests, and a missing one is a connection error here, not a crash
        # (viewers then get their frames from the once-a-second sweep)
        reader = getattr(conn, "_reader", None)
        writer = getattr(conn, "_writer", None)
        if reader is None or writer is None:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise RedisConnectionError(
                "the subscription connection did not open (redis-py "
                f"{getattr(redis, '__version__', '?')}: no _reader/_writer stream)"
            )
        self.conn, self.writer, self.open = conn, writer, True
        self.task = asyncio.get_running_loop().create_task(
            self._read(reader), name="stagecast redis event log subscription"
        )

    def subscribe(self, keys: list[bytes]) -> None:
        self._send(b"SUBSCRIBE", keys)

    def unsubscribe(self, keys: list[bytes]) -> None:
        self._send(b"UNSUBSCRIBE", keys)

    def _send(self, command: bytes, keys: list[bytes]) -> None:
        if not self.open or self.writer is None:
            return  # a new connection subscribes what is watched then
        for at in range(0, len(keys), 1000):
            part = keys[at : at + 1000]
            out = [b"*%d\r\n$%d\r\n%s\r\n" % (len(part) + 1, len(command), command)]
            out += [b"$%d\r\n%s\r\n" % (len(key), key) for key in part]
            self.writer.write(b"".join(out))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        error: BaseException = RedisConnectionError("Redis closed the subscription connection")
        on_reply = self.log._on_reply
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    try:
                        on_reply(reply)
                    except Exception:  # a bug: this reply's viewers wait for the sweep
                        logger.exception("event log subscription: handling a reply failed")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            self.open = False
        with contextlib.suppress(Exception):
            await self.conn.disconnect()
        self.log._subscription_lost(self, error)

    async def aclose(self) -> None:
        self.open = False
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            await self.conn.disconnect()


def _unavailable(exc: BaseException) -> EventLogUnavailable:
    return EventLogUnavailable(f"the event log (Redis) is unavailable: {exc}")


def _write_calls(
    ops: list[tuple[bytes, str, int, bytes]],
) -> Iterator[tuple[list[str], list[Any]]]:
    """The ``_WRITE`` calls (keys, args after the header) for these queued ops, in order:
    consecutive events of one run as one ``x`` op, at most ``BATCH_EVENTS`` events per call."""
    keys: list[str] = []
    args: list[Any] = []
    events = 0
    run_key, run_first = "", 0
    frames: list[bytes] = []  # the open 'x' op's
    for kind, key, seq, frame in ops:
        if events >= BATCH_EVENTS:  # this call is full: close it
            if frames:
                keys.append(run_key)
                args += [b"x", run_first, len(frames), *frames]
                frames = []
            yield keys, args
            keys, args, events = [], [], 0
        if kind == b"x" and frames and key == run_key and seq == run_first + len(frames):
            frames.append(frame)
            events += 1
            continue
        if frames:  # close the open 'x' op
            keys.append(run_key)
            args += [b"x", run_first, len(frames), *frames]
            frames = []
        if kind == b"x":
            run_key, run_first, frames = key, seq, [frame]
        elif kind == b"c":
            keys.append(key)
            args.append(b"c")
        else:
            keys.append(key)
            args += [b"f", seq]
        events += 1
    if frames:
        keys.append(run_key)
        args += [b"x", run_first, len(frames), *frames]
    if keys:
        yield keys, args


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
        sweep_seconds: float = SWEEP_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("RedisEventLog needs a redis:// URL or a client")
            client = redis_client(url, socket_timeout=BLOCK_SECONDS + 5.0)
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
        self.token = uuid.uuid4().hex
        """This log's writer token: ``<key>:w`` holds it for the runs it writes (fencing)."""
        self.on_fenced: Callable[[str], None] | None = None
        """Called with a run's id when its writes were refused because another writer took
        the run over (``fence``): the run's copy here should stop (its later writes are
        dropped)."""
        self.fenced = 0
        # the writer: ops queued by the synchronous methods, sent in order by one task
        self._ops: list[tuple[bytes, str, int, bytes]] = []  # (kind, key, seq, frame)
        self._queued = 0
        self._sent = 0
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._write = self.redis.register_script(_WRITE)
        self._writer: asyncio.Task[None] | None = None
        self.dropped_writes = 0
        self.write_errors = 0
        # the reader: the runs this process's viewers follow live; the write script PUBLISHes
        # each run's frames on its key, which this process subscribes while it has viewers of it
        self.sweep_seconds = sweep_seconds
        self._follows: dict[bytes, set[_Follow]] = {}  # the viewers at the top, by run key
        self._viewers: dict[bytes, int] = {}  # viewers that joined (subscribed while > 0)
        self._confirmed: set[bytes] = set()  # subscriptions Redis has confirmed
        self._dirty: set[bytes] = set()  # followed runs to read next
        self._work: asyncio.Event | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._sub: _Subscription | None = None
        self._connecting: asyncio.Task[_Subscription] | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._closing = False
        # the reader's client: the same pool, XREAD's reply left as Redis sends it (lists, no
        # per-entry dict), which is most of redis-py's cost per event read
        self._raw = aioredis.Redis(connection_pool=client.connection_pool)
        self._raw.response_callbacks.pop("XREAD", None)
        self.shared_reads = 0
        self.last_read = 0
        """How many runs the last shared read named."""
        self.reading = False
        """A shared read is in flight."""

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

    async def fence(self, run_id: str) -> None:
        """Make this log the run's only writer, before reading the log to continue it (a
        takeover): a writer that still holds the run (a worker taken for dead that is not)
        has its later writes skipped by Redis, and is told (``on_fenced``), so two copies never
        interleave in one stream. What it wrote before this is in the read that follows."""
        keep = max(1, int(self.orphan_ttl * 1000))
        try:
            await self.redis.set(self.key(run_id) + ":w", self.token, px=keep)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    def release(self, run_id: str) -> None:
        """Stop writing the run here (a shutting-down worker hands it over): later ``append``
        and ``finish`` calls for it are dropped, so the copy being stopped adds nothing to the
        log the next owner continues. What was appended before is still sent (``flush``)."""
        local = self._local.get(run_id)
        if local is None:
            raise UnknownRun(run_id)
        local.released = True

    def append(self, run_id: str, entry: LogEntry) -> None:
        local = self._local.get(run_id)
        if local is None:
            raise UnknownRun(run_id)
        if local.released:
            return
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
        if local.released:
            local.finished_at = self.clock()  # forgotten here after the TTL; nothing written
            return
        if local.finished_at is None:
            local.finished_at = self.clock()
            self._queue(b"f", run_id, local.last_seq)

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
        while True:
            await wake.wait()
            wake.clear()
            while self._ops:
                ops = self._ops
                self._ops = []
                pipe = self.redis.pipeline(transaction=False)
                for call_keys, call_args in _write_calls(ops):
                    pipe.evalsha(
                        self._write.sha,
                        len(call_keys),
                        *call_keys,
                        self.max_events,
                        orphan_ms,
                        ttl_ms,
                        self.token,
                        *call_args,
                    )
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
                        await self.redis.script_load(_WRITE)
                    except (RedisError, OSError) as exc:
                        self.write_errors += 1
                        logger.warning("event log: loading the write script failed: %s", exc)
                        await asyncio.sleep(self.retry_seconds)
                    self._ops[:0] = ops
                    continue
                for result in results:
                    if isinstance(result, list):  # {first refusal or '', fenced run keys}
                        for key in result[1:]:
                            self._fenced_off(key)
                        result = result[0] if result else b""
                    if isinstance(result, bytes) and result:  # the script's first refusal
                        result = ResponseError(result.decode(errors="replace"))
                    if isinstance(result, ResponseError) and _DUPLICATE not in str(result):
                        self.write_errors += 1
                        logger.error("event log write refused by Redis: %s", result)
                self._sent += len(ops)
                self._release()

    def _fenced_off(self, key: bytes | str) -> None:
        """Another writer took this run over: write nothing more of it, and say so."""
        name = key.decode() if isinstance(key, bytes) else key
        run_id = name[len(self.prefix) + len("run:") :]
        local = self._local.get(run_id)
        if local is None or local.released:
            return
        local.released = True
        self.fenced += 1
        logger.error("event log: run %s was taken over by another writer: not written here", run_id)
        if self.on_fenced is not None:
            try:
                self.on_fenced(run_id)
            except Exception:  # a bug there must not stop the writer's bookkeeping
                logger.exception("event log: on_fenced(%s) failed", run_id)

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
        self._closing = True
        for task in (self._reader, self._connecting, self._reopening):
            if task is not None:
                task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._reader = self._connecting = self._reopening = self._sweeper = None
        if self._sub is not None:
            await self._sub.aclose()
            self._sub = None
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
        """Replay, then follow live: each write is the frames at hand, joined as stored; a ping
        (``events`` 0) after ``heartbeat`` idle seconds. See ``_follow_raw``."""
        async with contextlib.aclosing(self._follow_raw(run_id, after, heartbeat)) as raw:
            async for frames, last in raw:
                yield FrameBatch(b"".join(frames), len(frames), last)

    async def follow(
        self, run_id: str, after: int = 0, *, heartbeat: float | None = None, batch: int = 512
    ) -> AsyncIterator[list[LogEntry]]:
        """``follow_frames`` decoded, in batches of at most ``batch`` events; ``[]`` is a ping."""
        decode = self._codec.decode
        async with contextlib.aclosing(self._follow_raw(run_id, after, heartbeat)) as raw:
            async for frames, _ in raw:
                if not frames:
                    yield []
                for at in range(0, len(frames), batch):
                    yield [decode(frame) for frame in frames[at : at + batch]]

    async def _follow_raw(
        self, run_id: str, after: int, heartbeat: float | None
    ) -> AsyncGenerator[tuple[list[bytes], int], None]:
        """The frames at hand and the seq of the last one (no frames: a ping).

        A replay (and a viewer that fell behind) is read with XRANGE by this viewer; once it is
        at the top it joins the process's live delivery: its run's channel (subscribed once
        per run and process) hands it the frames the write script publishes, and one shared
        XREAD (no BLOCK) reads, for all of this process's viewers at once, just the runs whose
        channel could not be trusted (a join, a gap, a lost connection, the sweep); so a
        process's Redis work grows with what is written, not with how many viewers wait.
        Raises ``EventsExpired`` when the cap dropped events this viewer had not read yet
        (never a gap), ``UnknownRun`` when the run expired, ``EventLogUnavailable`` when Redis
        is away.
        """
        info, _ = await self._state(run_id)
        self._check(run_id, info, after)
        if info.finished and after == info.last_seq:
            return
        loop = asyncio.get_running_loop()
        follow = _Follow(self.key(run_id).encode(), run_id, after, sent=loop.time())
        if heartbeat is not None:
            follow.timer = loop.call_later(heartbeat, _ping, follow, heartbeat)
        joined = watching = False
        try:
            while True:
                if not joined:  # catch up by itself: a replay, or after falling behind
                    try:
                        raw: Any = await self.redis.xrange(
                            follow.key, "(" + event_id(after), "+", count=WRITE_COUNT
                        )
                    except (RedisError, OSError) as exc:
                        raise _unavailable(exc) from None
                    frames = [f[FIELD] for i, f in raw if i[:2] == b"1-"]
                    if frames:
                        first = _seq_of(raw[0][0])
                        if first is not None and first != after + 1:
                            raise EventsExpired(run_id, after, first, self.max_events)
                        after += len(frames)
                        follow.sent = loop.time()
                        yield frames, after
                    if raw and raw[-1][0] == FINISHED_ID:
                        return
                    if len(raw) < WRITE_COUNT:  # at the top: follow live
                        follow.after, follow.lagging = after, False
                        await self._join(follow, first=not watching)
                        watching = joined = True
                    continue
                if not follow.frames and not follow.done and follow.error is None:
                    if not follow.lagging:
                        follow.waiter = loop.create_future()
                        ping = await follow.waiter
                        follow.waiter = None
                        if ping:
                            try:
                                exists = await self.redis.exists(follow.key)
                            except (RedisError, OSError) as exc:
                                raise _unavailable(exc) from None
                            if not exists:
                                raise UnknownRun(run_id)
                            follow.sent = loop.time()
                            yield [], after
                            continue
                if follow.frames:
                    frames, follow.frames = follow.frames, []
                    after += len(frames)
                    follow.sent = loop.time()
                    yield frames, after
                    continue
                if follow.error is not None:
                    raise follow.error
                if follow.done:
                    return
                if follow.lagging:
                    joined = False
        finally:
            if follow.timer is not None:
                follow.timer.cancel()
                follow.timer = None
            self._leave(follow)
            if watching:
                self._unwatch(follow.key)

    # -- live delivery: the run channels and the shared read ------------------------------

    async def _join(self, follow: _Follow, first: bool) -> None:
        """Follow live from ``follow.after``: its run's channel (subscribed on the viewer's
        ``first`` join) hands it what is written; a read of the run right after the join (or
        after the subscription is confirmed) covers what was written in between."""
        key = follow.key
        subscription = await self._subscription()
        if first:
            viewers = self._viewers.get(key, 0)
            self._viewers[key] = viewers + 1
            if not viewers:
                subscription.subscribe([key])
        self._follows.setdefault(key, set()).add(follow)
        if key in self._confirmed:  # else its confirmation asks for the read
            self._mark(key)

    def _unwatch(self, key: bytes) -> None:
        """A viewer that had joined has gone: the last one of a run unsubscribes its channel."""
        viewers = self._viewers.pop(key, 1) - 1
        if viewers:
            self._viewers[key] = viewers
            return
        self._confirmed.discard(key)
        if self._sub is not None:
            self._sub.unsubscribe([key])

    def _leave(self, follow: _Follow) -> None:
        follows = self._follows.get(follow.key)
        if follows is not None:
            follows.discard(follow)
            if not follows:
                del self._follows[follow.key]

    def _mark(self, key: bytes) -> None:
        """Read this followed run in the next shared read."""
        self._dirty.add(key)
        work = self._work
        if work is None or self._reader is None or self._reader.done():
            work = self._work = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._reader = loop.create_task(
                self._read_loop(work), name="stagecast redis event log reader"
            )
            self._sweeper = loop.call_later(self.sweep_seconds, self._sweep)
        work.set()

    def _sweep(self) -> None:
        """Every ``sweep_seconds``, read every followed run, whatever the channels said: a
        message lost with a connection costs at most this long, never a viewer left waiting."""
        if self._follows:
            self._dirty.update(self._follows)
            if self._work is not None:
                self._work.set()
        self._sweeper = asyncio.get_running_loop().call_later(self.sweep_seconds, self._sweep)

    def _fail_followers(self, error: BaseException) -> None:
        for follows in list(self._follows.values()):
            for follow in follows:
                follow.error = error
                follow.wake()
        self._follows.clear()
        self._dirty.clear()

    async def _subscription(self) -> _Subscription:
        """The process's subscription connection, opened (and every watched run subscribed
        again) if it is not; ``EventLogUnavailable`` when Redis cannot be reached."""
        sub = self._sub
        if sub is not None and sub.open:
            return sub
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        try:
            return await asyncio.shield(self._connecting)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def _open(self) -> _Subscription:
        try:
            sub = _Subscription(self)
            await sub.connect()
            self._sub = sub
            self._confirmed.clear()
            if self._viewers:  # after a lost connection: each run's confirmation reads it
                sub.subscribe(list(self._viewers))
            return sub
        finally:
            self._connecting = None

    def _subscription_lost(self, sub: _Subscription, exc: BaseException) -> None:
        """The subscription's connection broke: open a new one (every watched run is
        subscribed again and read once, so nothing published meanwhile is missed); if Redis
        cannot be reached, every viewer hears of it."""
        if self._sub is not sub or self._closing:
            return
        self._sub = None
        self._confirmed.clear()
        if not self._viewers:
            return

        async def reopen() -> None:
            try:
                await self._subscription()
            except EventLogUnavailable as error:
                self._fail_followers(error)

        self._reopening = asyncio.get_running_loop().create_task(reopen())

    def _on_reply(self, reply: Any) -> None:
        """One reply on the subscription connection: a run's frames, a confirmation, a pong."""
        if not isinstance(reply, list) or len(reply) < 3:
            if isinstance(reply, Exception):
                logger.warning("event log subscription: Redis replied %s", reply)
            return
        kind, key = reply[0], reply[1]
        if kind == b"message":
            follows = self._follows.get(key)
            if follows:
                self._published(key, follows, reply[2])
        elif kind == b"subscribe":
            if key in self._viewers:
                self._confirmed.add(key)
                if key in self._follows:
                    self._mark(key)

    def _published(self, key: bytes, follows: set[_Follow], data: bytes) -> None:
        """A run's channel message from the write script: ``<first seq> <len>…\\n<frames>``,
        or ``end <last seq>``. A viewer it does not continue (a message lost, or written
        between its join and its subscription) is left to the next shared read."""
        if data[:4] == b"end ":
            last = int(data[4:])
            for follow in list(follows):
                if follow.after == last:
                    follow.done = True
                    follows.discard(follow)
                    follow.wake()
                else:
                    self._mark(key)
            if not follows:
                self._follows.pop(key, None)
            return
        nl = data.index(b"\n")
        head = data[:nl].split(b" ")
        first = int(head[0])
        frames: list[bytes] = []
        at = nl + 1
        for size in head[1:]:
            end = at + int(size)
            frames.append(data[at:end])
            at = end
        if any(follow.after + 1 < first for follow in follows):
            self._mark(key)
        self._deliver(key, follows, first, frames, False, lag=False)

    async def _read_loop(self, work: asyncio.Event) -> None:
        """Read what the channels did not hand out: one XREAD (no BLOCK) for the runs joined,
        confirmed, missed or swept since the last read."""
        while True:
            await work.wait()
            work.clear()
            await asyncio.sleep(0)  # let the joins and confirmations already at hand come in
            follows = self._follows
            keys = [key for key in self._dirty if key in follows]
            self._dirty.clear()
            if not keys:
                continue
            streams: dict[Any, Any] = {
                key: b"1-%d" % min(f.after for f in follows[key]) for key in keys
            }
            self.reading = True
            try:
                got: Any = await self._raw.xread(streams, count=WRITE_COUNT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away (or a bug): every follower hears of it
                self._fail_followers(_unavailable(exc))
                continue
            finally:
                self.reading = False
            self.shared_reads += 1
            self.last_read = len(streams)
            # RESP3 (redis-py 8's default) sends a map, RESP2 a list of [key, entries]
            for at, (key, entries) in enumerate(
                got.items() if isinstance(got, dict) else got or []
            ):
                if at and at % DELIVER_SLICE == 0:
                    await asyncio.sleep(0)  # a read of many runs: let their viewers write
                followers = self._follows.get(key)
                if not followers:
                    continue
                if len(entries) >= WRITE_COUNT:  # more than one read's worth: read on
                    self._mark(key)
                try:
                    done = entries[-1][0] == FINISHED_ID
                    frames = [f[1] for i, f in entries if i[:2] == b"1-"]
                    first = _seq_of(entries[0][0]) if frames else None
                    self._deliver(key, followers, first, frames, done, lag=True)
                except Exception as exc:  # a bug: end these viewers, not the reader
                    logger.exception("event log reader: delivering %r failed", key)
                    for follow in followers:
                        follow.error = EventLogUnavailable(f"the event log reader failed: {exc}")
                        follow.wake()
                    self._follows.pop(key, None)

    def _deliver(
        self,
        key: bytes,
        follows: set[_Follow],
        first: int | None,
        frames: list[bytes],
        done: bool,
        *,
        lag: bool,
    ) -> None:
        """Hand a run's frames (``first`` is the seq of ``frames[0]``) to its viewers; ``done``:
        the run's log ends after them. A viewer these do not continue is left alone, or with
        ``lag`` (what a read of the stream found) reads by itself."""
        for follow in list(follows):
            if first is not None:
                if first > follow.after + 1:
                    if lag:
                        # entries it has not read come before these: it joined behind a read
                        # in flight, or the cap dropped them. It reads them by itself (XRANGE),
                        # which tells the two apart (the cap's loss is EventsExpired, never a gap)
                        follow.lagging = True
                        follows.discard(follow)
                        follow.wake()
                    continue
                new = frames[follow.after + 1 - first :]
                if new:
                    follow.frames.extend(new)
                    follow.after += len(new)
                elif not done:
                    continue  # it had these already
            if done:
                follow.done = True
                follows.discard(follow)
            elif len(follow.frames) > LAG_FRAMES:
                follow.lagging = True
                follows.discard(follow)
            follow.wake()
        if not follows:
            self._follows.pop(key, None)

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
