"""Runs across a deployment: the run queue, the registry, control and the limit, in Redis.

With ``event_log: redis://…`` every ``stagecast serve`` process and every ``stagecast worker``
shares one Redis; any process serves any run's stream (``api.redislog``), status, cancel and
input, with no sticky routing. The keys (prefix ``stagecast:``)::

    queue           Stream, consumer group ``workers``: one entry (``run <id>``) per run
    runs:<id>       Hash: status, worker, request (JSON), snapshot (the status JSON),
                    cancel (1 once asked), viewers (open streams, every process),
                    takeovers (how many times the run was taken over from a lost worker)
    source:<id>     String (NDJSON): what a queued replay plays (its recording) or a queued
                    re-run reuses (the earlier run-start and reusable stage-ends, no tokens);
                    at most ``MAX_SOURCE_BYTES``, deleted when the run is done
    admitted        Sorted set of the runs holding a slot: ``max_concurrent_runs`` holds
                    across the deployment (checked and taken in one script with the enqueue)
    waiting         Sorted set of the runs waiting for input, scored by a lease (ms) that
                    their owner renews: ``max_waiting_runs`` holds across the deployment
    idem:<key>      ``<fingerprint> <run_id>`` of an ``Idempotency-Key``
    worker:<id>     Set with a PX of ``heartbeat_timeout``: the worker is alive
    control         Pub/sub channel: ``{"op": "cancel", "run_id": …}`` reaches the owner

- **Queue.** ``POST /v1/runs`` checks the request (the engine raises before anything runs),
  then one Lua script takes a slot, writes the registry entry and the log's created marker, and
  XADDs the queue. Workers (every serve process unless ``work_runs: false``, and
  ``stagecast worker``) XREADGROUP one entry at a time and run it.
- **Re-runs and replays.** The receiving process checks them as one process does (``reuse``:
  the earlier run from the shared log, or a recording of its ``--recordings`` folder; the same
  refusals) and puts what the worker needs in ``source:<id>`` in the admit script; the request
  stays small (``{"kind": "replay", "name", "speed", …}`` or ``"reuse": {"name", "from"}``).
  The worker rebuilds the ``Recording`` (and ``Reuse``) from it: no recordings folder needed.
  A replay takes a slot like a run and is not checked against ``max_waiting_runs``.
- **Waiting runs.** The owner's snapshots add a run that waits for input to ``waiting`` (and
  give its slot back unless ``waiting_runs_hold_slots``), and remove it once answered; the admit
  script drops lapsed leases, then refuses a run at ``max_waiting_runs``. A run that is done
  leaves ``waiting`` with its slot; a lost worker's waiting runs leave it when their lease
  (``heartbeat_timeout``, renewed every third of it) runs out, taken over or not.
- **Heartbeat.** A worker re-claims its own pending entries (``XCLAIM … 0 JUSTID``) every third
  of ``heartbeat_timeout``, which keeps them idle-fresh. An entry idle for longer (its worker was
  killed, or lost Redis) is taken by another worker with ``XAUTOCLAIM``: a run that had not
  started starts there. A run that had started is **continued** there (``lost_runs:
  continue``, the default): the new owner reads the run's whole log, rebuilds the request from
  the registry and starts the same run (same ``run_id``) with ``engine.reuse.Resume``: no second
  ``run-start``, seq after the log's last, every stage (map item) that had ended is taken as it
  ended and not emitted again, every one that was running gets a ``stage-retry`` (error type
  ``worker_lost``, naming the lost worker and the timeout) and a new ``stage-start`` with the
  next attempt, an input stage that was waiting asks again. When it cannot be continued (the
  log's first events are gone, the chain or its version or plan is not on this worker, the
  request cannot be rebuilt, it was taken over ``MAX_TAKEOVERS`` times already, or
  ``lost_runs: fail``) it ends ``failed`` with an error of type ``worker_lost`` saying why (each
  stage that had not ended gets a failed ``stage-end`` first, then the ``run-end``, continuing
  the seq). Either way no viewer waits forever; the registry's ``takeovers`` counts the
  takeovers (``GET /v1/runs/{id}`` shows it).
- **Shutdown.** A worker that stops (SIGTERM) hands its runs over (``hand_over``) instead of
  cancelling them: it stops writing their logs, puts each queue entry back as a new one, and
  marks the registry (``handover``, ``handovers``); the worker that takes it continues it at
  once as above, its ``stage-retry`` saying the worker shut down. Hand-overs do not count
  toward ``MAX_TAKEOVERS``.
- **Control.** Cancel sets the registry's ``cancel`` flag (a worker that starts the run later
  sees it) and publishes on ``control``; the owning worker cancels within a round trip. A
  message lost while the owner's subscription was down is caught by the flag: the owner reads
  its runs' flags (and owners: ``_look_at_registry``) when it subscribes again and at every
  heartbeat (a third of ``heartbeat_timeout``). A run that ends while Redis is away keeps
  retrying to tell the registry (``FINISH_RETRY_SECONDS``), so its slot is given back once
  Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from stagecast.api.catalog import ChainCatalog
from stagecast.api.errors import ApiError
from stagecast.api.eventlog import EventLogUnavailable, LogEntry, LogInfo, LogSlice, UnknownRun
from stagecast.api.redislog import RedisEventLog, redis_client
from stagecast.api.runs import (
    IdempotencyConflict,
    ManagedRun,
    OnDisconnect,
    RunLimitError,
    RunManager,
    RunNotFound,
)
from stagecast.api.settings import ServerSettings
from stagecast.engine.asking import AnswerRefused, NotWaiting
from stagecast.engine.chain import Chain
from stagecast.engine.events import (
    ErrorInfo,
    RunEnded,
    RunEvent,
    StageEnded,
    event_from_json,
    event_to_json,
)
from stagecast.engine.orchestrator import ChainRun, new_run_id
from stagecast.engine.reuse import Recording, RecordingError, Resume, Reuse, ReuseError

__all__ = ["FINAL", "MAX_TAKEOVERS", "Cluster", "continued_message", "worker_lost_message"]

logger = logging.getLogger("stagecast.cluster")

GROUP = "workers"
ANSWER_SECONDS = 5.0
"""How long ``POST /v1/runs/{id}/input`` waits for the owning worker to take an answer."""
SNAPSHOT_SECONDS = 0.25
"""How often a worker writes the changed status of its runs to the registry: a run whose
stages, input or status changed (any event but a token) is written within this time."""
SNAPSHOT_SLICE = 25
"""Statuses built between two turns of the event loop."""
SNAPSHOT_REFRESH = 2.0
"""A run that only streamed tokens since is written again after this long (its token and usage
counts; ``last_seq`` itself is read from the log by the status route)."""
FINAL = ("succeeded", "failed", "cancelled")
BLOCK_MS = 2000
FINISH_RETRY_SECONDS = 0.5
"""How often a worker retries telling the registry that a run ended while Redis is away."""
MAX_TAKEOVERS = 3
"""A run taken over this many times (its workers keep dying, or it kills them) ends failed."""
_REQUEST_KEYS = {"chain", "inputs", "model", "on_disconnect", "coalesce_ms", "reuse"}
"""The queued request's fields a takeover rebuilds the run from."""

_ADMIT = """
-- KEYS: admitted, runs:<id>, queue, run log stream, idem:<key> (or the same as KEYS[2]),
--       waiting, source:<id>
-- ARGV: limit, run_id, now_ms, request, snapshot, keep_ms, idem value ('' for none),
--       waiting limit ('' for none: a replay never waits), source ('' for none)
-- a retry of this very call (its reply was lost with the connection): it landed already
if redis.call('EXISTS', KEYS[2]) == 1 then return 'ok' end
if ARGV[7] ~= '' then
  local known = redis.call('GET', KEYS[5])
  if known then return 'known ' .. known end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 'limit' end
if ARGV[8] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[3])  -- leases of lost workers
  if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[8]) then return 'waiting_limit' end
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[2], 'status', 'pending', 'request', ARGV[4], 'snapshot', ARGV[5],
           'viewers', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('XADD', KEYS[4], '0-1', 'f', '')
redis.call('PEXPIRE', KEYS[4], ARGV[6])
if ARGV[7] ~= '' then redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[6]) end
if ARGV[9] ~= '' then redis.call('SET', KEYS[7], ARGV[9], 'PX', ARGV[6]) end
redis.call('XADD', KEYS[3], '*', 'run', ARGV[2])
return 'ok'
"""

MAX_SOURCE_BYTES = 32 * 1024 * 1024
"""The most a queued run carries to its worker (``source:<id>``): a replay's recording, or
what a re-run reuses (its earlier run's run-start and succeeded stage-ends, no tokens)."""


@dataclass(slots=True)
class _Written:
    """What a run's registry entry holds (as this owner last wrote it), and when the owner last
    looked at whether it changed."""

    snapshot: str = ""
    state: str = ""
    """The status the entry says (``waiting_input`` counts in ``waiting``)."""
    changes: tuple[int, str] | None = None
    """(events other than tokens, status) at the last look."""
    looked: float = 0.0


class _Unstartable(Exception):
    """A queued run this worker cannot start (the message says why); it ends failed."""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _ndjson(events: Iterable[RunEvent], field: str, name: str) -> str:
    """Events as NDJSON for ``source:<id>``; ApiError 422 over ``MAX_SOURCE_BYTES``."""
    text = "\n".join(event_to_json(event) for event in events)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SOURCE_BYTES:
        code = "invalid_reuse" if field == "reuse" else "invalid_recording"
        problem = (
            f"{name}: {_size(size)} to carry to a worker; a deployment on Redis carries up to "
            f"{_size(MAX_SOURCE_BYTES)}"
        )
        raise ApiError(422, code, f"{field}: {problem}", {"fields": {field: problem}})
    return text


def _how_lost(worker: str, timeout: float, handed_over: bool) -> str:
    if handed_over:
        return f"the worker running this run ({worker}) shut down and handed it over"
    return f"the worker running this run ({worker}) stopped: no heartbeat for {timeout:g} s"


def worker_lost_message(worker: str, timeout: float, why: str, handed_over: bool = False) -> str:
    """The error of a lost worker's run that is not continued: ``why`` says why not."""
    return (
        f"{_how_lost(worker, timeout, handed_over)}; the run could not be continued ({why}), "
        "so it ended failed (stages that had not ended are failed). Start a new run to try again"
    )


def continued_message(worker: str, timeout: float, taker: str, handed_over: bool = False) -> str:
    """The ``stage-retry`` error of a stage that was running when its worker was lost (killed,
    or shut down and handed the run over)."""
    return (
        f"{_how_lost(worker, timeout, handed_over)}; worker {taker} continues the run, and this "
        "stage runs again"
    )


@contextlib.contextmanager
def _store() -> Iterator[None]:
    """Redis errors of a request become ``EventLogUnavailable`` (HTTP 503, Retry-After)."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise EventLogUnavailable(f"the run queue (Redis) is unavailable: {exc}") from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Cluster:
    """This process's part of a deployment: it submits runs, and (``work``) works them."""

    def __init__(
        self,
        url: str,
        settings: ServerSettings,
        manager: RunManager,
        catalog: ChainCatalog,
        *,
        work: bool = True,
        worker_id: str | None = None,
        prefix: str = "stagecast:",
    ) -> None:
        if not isinstance(manager.log, RedisEventLog):
            raise ValueError("a deployment on Redis needs the Redis event log")
        self.redis = redis_client(url, socket_timeout=BLOCK_MS / 1000 + 5.0)
        self.settings, self.manager, self.catalog = settings, manager, catalog
        self.log: RedisEventLog = manager.log
        self.work = work
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.prefix = prefix
        self.queue = f"{prefix}queue"
        self.admitted = f"{prefix}admitted"
        self.control = f"{prefix}control"
        self.waiting = f"{prefix}waiting"
        self.heartbeat_timeout = settings.heartbeat_timeout
        self._owned: dict[str, bytes] = {}  # run_id -> queue entry id
        self._written: dict[str, _Written] = {}  # run_id -> what its registry entry holds
        self._tasks: list[asyncio.Task[None]] = []
        self._admit = self.redis.register_script(_ADMIT)
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._moved: set[str] = set()
        """Runs whose copy here was stopped because another worker has them (handed over,
        fenced off, taken over): their status comes from the registry, not from that copy."""
        manager.on_finished.append(self._on_finished)
        self.log.on_fenced = self._fenced
        self.taken_over = 0

    def runs_key(self, run_id: str) -> str:
        return f"{self.prefix}runs:{run_id}"

    def source_key(self, run_id: str) -> str:
        """What a queued run carries to its worker: a replay's recording, a re-run's reuse."""
        return f"{self.prefix}source:{run_id}"

    # -- lifecycle -------------------------------------------------------------------------

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def start(self) -> None:
        try:
            await self._ensure_group()
        except RedisError as exc:
            logger.error("Redis is unreachable at start (%s); retrying in the background", exc)
        if self.work:
            loop = asyncio.get_running_loop()
            jobs = (self._consume, self._heartbeat, self._takeover, self._listen, self._snapshot)
            for job in jobs:
                self._tasks.append(loop.create_task(self._forever(job), name=job.__name__))

    async def stop_taking(self) -> None:
        """Take no more runs (the first step of a shutdown): neither queued ones nor those of
        lost workers, which a process on its way out would only cancel or hand on again."""
        await self._stop_loops("_consume", "_takeover")

    async def _stop_loops(self, *names: str) -> None:
        for task in self._tasks:
            if task.get_name() in names:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _stop_copy(self, run_id: str) -> None:
        """Stop this process's copy of a run another worker has now: nothing more of it is
        written (the log drops its events), its status is no longer answered from it."""
        self._owned.pop(run_id, None)
        self._written.pop(run_id, None)
        self._moved.add(run_id)
        # the stopped copy is kept by the manager until its TTL, then forgotten: so is this
        asyncio.get_running_loop().call_later(
            self.settings.finished_run_ttl + 60, self._moved.discard, run_id
        )
        with contextlib.suppress(UnknownRun):
            self.log.release(run_id)
        with contextlib.suppress(RunNotFound):
            self.manager.cancel(run_id)

    def _fenced(self, run_id: str) -> None:
        """The log refused this worker's writes of the run: another worker took it over (this
        one looked dead). Its copy here stops at once, not at the next heartbeat."""
        if run_id not in self._owned:
            return
        logger.error("worker %s: run %s was taken over; stopping it here", self.worker_id, run_id)
        self._stop_copy(run_id)

    async def hand_over(self) -> list[str]:
        """Shutting down (SIGTERM, a rolling restart): hand the runs going on here to the other
        workers instead of cancelling them. Each run's copy here stops writing its log
        (``RedisEventLog.release``) and is stopped; once what it wrote is in Redis, its queue
        entry is put back as a new one, which any worker takes at once (no heartbeat timeout)
        and continues from the log as it does a lost worker's run (``stage-retry`` for what was
        running, its message saying the worker shut down). Its slot stays taken. Not for
        ``lost_runs: fail`` or replays (cancelled, as before). Returns the runs handed over."""
        if not self.work or self.settings.lost_runs != "continue":
            return []
        # no status snapshot of a run handed over may land after the new owner's
        await self._stop_loops("_snapshot")
        handed: dict[str, bytes] = {}
        for run_id, entry_id in list(self._owned.items()):
            try:
                managed = self.manager.get(run_id)
            except RunNotFound:
                continue
            if managed.finished or managed.chain is None:  # ended, or a replay
                continue
            self._stop_copy(run_id)  # what this copy emits while it stops is not written
            handed[run_id] = entry_id
        if not handed:
            return []
        if not await self.log.flush(5.0):
            logger.error(
                "worker %s: its log writes did not all land before the hand-over", self.worker_id
            )
        try:
            pipe = self.redis.pipeline(transaction=True)
            for run_id, entry_id in handed.items():
                key = self.runs_key(run_id)
                pipe.hset(key, "handover", self.worker_id)
                pipe.hincrby(key, "handovers", 1)
                pipe.xack(self.queue, GROUP, entry_id)
                pipe.xdel(self.queue, entry_id)
                pipe.xadd(self.queue, {"run": run_id})
            await pipe.execute()
        except (RedisError, OSError) as exc:
            # the entries stay pending under this worker: taken over after heartbeat_timeout
            logger.error(
                "worker %s: hand-over failed (%s): the runs wait for the heartbeat timeout",
                self.worker_id,
                exc,
            )
            return []
        logger.warning("worker %s: handed over %d run(s)", self.worker_id, len(handed))
        return list(handed)

    async def stop(self) -> None:
        """After the runs here ended: their registry updates, then the loops stop."""
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for handle in self._grace.values():
            handle.cancel()

    async def aclose(self) -> None:
        await self.stop()
        await self.redis.aclose()

    async def _forever(self, job: Any) -> None:
        """Run a loop of the worker; when Redis goes away, log once and retry (bounded pace)."""
        failing = False
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if not failing:
                    logger.warning("worker %s: Redis: %s; retrying", self.worker_id, exc)
                failing = True
                await asyncio.sleep(0.5)
                if "NOGROUP" in str(exc):  # Redis restarted empty: the queue is new
                    with contextlib.suppress(RedisError, OSError):
                        await self._ensure_group()
            except Exception:
                logger.exception("worker %s: %s failed; restarting it", self.worker_id, job)
                await asyncio.sleep(0.5)
            else:
                failing = False

    # -- the API side: any process ---------------------------------------------------------

    async def _submit(
        self,
        chain: Chain,
        inputs: dict[str, Any],
        *,
        model: str | None,
        on_disconnect: OnDisconnect,
        coalesce_ms: float | None,
        idempotency: tuple[str, str] | None,
        reuse: Reuse | None = None,
        reuse_from: str | None = None,
    ) -> tuple[str, bool]:
        """Check and queue a run; ``(run_id, replayed)``. Raises InputError, ModelConfigError
        (from the engine's checks), RunLimitError, IdempotencyConflict, ApiError (what the run
        reuses is over ``MAX_SOURCE_BYTES``)."""
        if idempotency is not None:
            known = await self.redis.get(f"{self.prefix}idem:{idempotency[0]}")
            if known is not None:
                return self._known(idempotency, _text(known)), True
        probe = ChainRun(  # the engine's checks: inputs and model, before anything is queued
            chain,
            inputs,
            models=self.manager.registry,
            model=model,
            render_limits=self.settings.render_limits(),
            reuse=reuse,
        )
        run_id = probe.run_id
        request: dict[str, Any] = {
            "chain": chain.id,
            "inputs": inputs,
            "model": model,
            "on_disconnect": on_disconnect,
            "coalesce_ms": coalesce_ms,
        }
        source = ""
        if reuse is not None:  # the worker rebuilds the same Reuse from what it needs
            request["reuse"] = {"name": reuse.recording.name, "from": reuse_from}
            source = _ndjson(reuse.needed(), "reuse", reuse.recording.name)
        snapshot = self._pending_snapshot(
            run_id,
            {"id": chain.id, "title": chain.title, "version": chain.spec.version},
            probe.default_model.label,
            on_disconnect,
        )
        answer = await self._queue(
            run_id, request, snapshot, idempotency, source, self.settings.max_waiting_runs
        )
        if answer.startswith("known "):
            assert idempotency is not None
            return self._known(idempotency, answer[6:]), True
        return run_id, False

    async def _submit_replay(
        self, recording: Recording, speed: float | None, on_disconnect: OnDisconnect
    ) -> str:
        start = recording.start
        run_id = new_run_id()
        request = {
            "kind": "replay",
            "name": recording.name,
            "speed": speed,
            "on_disconnect": on_disconnect,
        }
        source = _ndjson(recording.events, "recording", recording.name)
        snapshot = self._pending_snapshot(run_id, asdict(start.chain), start.model, on_disconnect)
        await self._queue(run_id, request, snapshot, None, source, None)
        return run_id

    @staticmethod
    def _pending_snapshot(
        run_id: str, chain: dict[str, Any], model: str, on_disconnect: str
    ) -> dict[str, Any]:
        return {
            "run_id": run_id,
            "chain": chain,
            "status": "pending",
            "model": model,
            "created_at": _now_ms(),
            "finished_at": None,
            "last_seq": 0,
            "on_disconnect": on_disconnect,
            "viewers": 0,
            "stages": {},
            "pending_input": [],
            "outputs": None,
            "usage": {"input_tokens": 0, "output_tokens": 0, "cost": None},
            "error": None,
        }

    async def _queue(
        self,
        run_id: str,
        request: dict[str, Any],
        snapshot: dict[str, Any],
        idempotency: tuple[str, str] | None,
        source: str,
        waiting_limit: int | None,
    ) -> str:
        """The admit script: limits, registry entry, created marker, source, queue entry.
        Raises RunLimitError; returns ``ok`` or ``known <fingerprint> <run_id>``."""
        keep_ms = int(max(self.log.orphan_ttl, self.settings.finished_run_ttl) * 1000)
        idem_key = f"{self.prefix}idem:{idempotency[0]}" if idempotency else self.runs_key(run_id)
        answer = _text(
            await self._admit(
                keys=[
                    self.admitted,
                    self.runs_key(run_id),
                    self.queue,
                    self.log.key(run_id),
                    idem_key,
                    self.waiting,
                    self.source_key(run_id),
                ],
                args=[
                    self.settings.max_concurrent_runs,
                    run_id,
                    _now_ms(),
                    json.dumps(request),
                    json.dumps(snapshot),
                    keep_ms,
                    f"{idempotency[1]} {run_id}" if idempotency else "",
                    "" if waiting_limit is None else waiting_limit,
                    source,
                ],
            )
        )
        if answer == "limit":
            self.manager.metrics.runs_rejected["limit"] += 1
            raise RunLimitError(self.settings.max_concurrent_runs)
        if answer == "waiting_limit":
            self.manager.metrics.runs_rejected["waiting_limit"] += 1
            raise RunLimitError(self.settings.max_waiting_runs, "max_waiting_runs")
        return answer

    async def submit(
        self, chain: Chain, inputs: dict[str, Any], **options: Any
    ) -> tuple[str, bool]:
        """Check and queue a run; ``(run_id, replayed)``. Raises InputError, ModelConfigError
        (from the engine's checks), RunLimitError, IdempotencyConflict, EventLogUnavailable."""
        with _store():
            return await self._submit(chain, inputs, **options)

    async def known(self, idempotency: tuple[str, str]) -> str | None:
        """The run an ``Idempotency-Key`` started, None for a new key; raises
        IdempotencyConflict when it came with another request."""
        with _store():
            found = await self.redis.get(f"{self.prefix}idem:{idempotency[0]}")
        return None if found is None else self._known(idempotency, _text(found))

    async def submit_replay(
        self, recording: Recording, *, speed: float | None, on_disconnect: OnDisconnect
    ) -> str:
        """Queue a replay of ``recording`` (a slot like a run's, never ``max_waiting_runs``: a
        replay does not wait); its run id. Raises RunLimitError, ApiError (over
        ``MAX_SOURCE_BYTES``), EventLogUnavailable."""
        with _store():
            return await self._submit_replay(recording, speed, on_disconnect)

    async def status(self, run_id: str) -> dict[str, Any]:
        """The run's status: the owner's if it is here, else the snapshot in the registry."""
        with _store():
            return await self._status(run_id)

    async def cancel(self, run_id: str) -> str:
        """Ask the owner to cancel (idempotent); the run's status now."""
        with _store():
            return await self._cancel(run_id)

    async def answer(
        self, run_id: str, stage: str, path: list[str | int] | None, value: Any
    ) -> str:
        """Answer the run's pending input: the owning worker checks and takes it (a round trip
        through ``control``); the run's status. Raises RunNotFound, or ApiError (409/422 as the
        owner decided, 503 when no owner answers within ``ANSWER_SECONDS``)."""
        with _store():
            return await self._answer(run_id, stage, path, value)

    async def attach(self, run_id: str) -> None:
        """A stream of the run opened (counted in the registry, for the whole deployment)."""
        with _store():
            await self._attach(run_id)

    @staticmethod
    def _known(idempotency: tuple[str, str], value: str) -> str:
        fingerprint, _, run_id = value.partition(" ")
        if fingerprint != idempotency[1]:
            raise IdempotencyConflict(idempotency[0], run_id)
        return run_id

    async def _status(self, run_id: str) -> dict[str, Any]:
        """The run's status: the owner's if it is here, else the snapshot in the registry."""
        got: Any = await self.redis.hmget(
            self.runs_key(run_id), ["snapshot", "viewers", "takeovers"]
        )
        local: dict[str, Any] | None = None
        if run_id not in self._moved:  # a copy stopped here (handed over, fenced) is not it
            try:
                local = self.manager.status(run_id)
            except RunNotFound:
                pass
        if local is None and got[0] is None:
            raise RunNotFound(run_id)
        status: dict[str, Any] = local if local is not None else json.loads(got[0])
        status["viewers"] = int(got[1] or 0)
        status["takeovers"] = int(got[2] or 0)
        if status["status"] not in FINAL:
            last_seq, ended = await self._log_end(run_id)
            if local is None:  # the snapshot's last_seq may be SNAPSHOT_REFRESH s old
                status["last_seq"] = max(status.get("last_seq") or 0, last_seq)
            if ended is not None:  # the log is ahead of the registry's last snapshot
                status.update(
                    status=ended.status,
                    last_seq=ended.seq,
                    finished_at=ended.ts,
                    outputs=ended.outputs,
                    usage=asdict(ended.usage),
                    error=asdict(ended.error) if ended.error else None,
                )
        return status

    async def _ended(self, run_id: str) -> RunEnded | None:
        """The run's run-end when its log has one (the log is the truth; the registry follows)."""
        return (await self._log_end(run_id))[1]

    async def _log_end(self, run_id: str) -> tuple[int, RunEnded | None]:
        """The run's last seq in the log, and its run-end when it has one."""
        try:
            info = await self.log.ainfo(run_id)
            if info.last_seq == 0:
                return 0, None
            last = (await self.log.read(run_id, info.last_seq - 1)).entries
        except UnknownRun:
            return 0, None
        if last and last[-1].type == "run-end":
            event = event_from_json(last[-1].data)
            assert isinstance(event, RunEnded)
            return info.last_seq, event
        return info.last_seq, None

    async def _cancel(self, run_id: str) -> str:
        """Ask the owner to cancel (idempotent); the run's status now."""
        key = self.runs_key(run_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(key, "status")
        pipe.hset(key, "cancel", 1)
        status, _ = await pipe.execute()
        if status is None:
            await self.redis.delete(key)  # the HSET made an empty entry of an unknown run
            raise RunNotFound(run_id)
        status = _text(status)
        if status not in FINAL:
            ended = await self._ended(run_id)
            if ended is not None:
                return ended.status
            if run_id in self._owned:
                self.manager.cancel(run_id)
            else:
                await self.redis.publish(
                    self.control, json.dumps({"op": "cancel", "run_id": run_id})
                )
        return status

    async def _answer(
        self, run_id: str, stage: str, path: list[str | int] | None, value: Any
    ) -> str:
        if run_id in self._owned:
            reply = self._answer_here(run_id, stage, path, value)
        else:
            status = await self.redis.hget(self.runs_key(run_id), "status")
            if status is None:
                raise RunNotFound(run_id)
            if _text(status) == "pending":  # queued, no worker has it yet: nothing asked
                raise ApiError(
                    409,
                    "not_waiting_input",
                    f"run {run_id!r} is not waiting for input (status: pending)",
                    {"status": "pending", "waiting": []},
                )
            if _text(status) in FINAL or await self._ended(run_id) is not None:
                now = _text(status) if _text(status) in FINAL else "finished"
                raise ApiError(
                    409,
                    "not_waiting_input",
                    f"run {run_id!r} is not waiting for input (status: {now})",
                    {"status": now, "waiting": []},
                )
            box = f"{self.prefix}reply:{uuid.uuid4().hex}"
            order = {"op": "input", "run_id": run_id, "stage": stage, "path": path}
            await self.redis.publish(
                self.control, json.dumps({**order, "value": value, "reply": box})
            )
            got: Any = await self.redis.blpop([box], timeout=ANSWER_SECONDS)
            if got is None:
                raise ApiError(
                    503,
                    "worker_unavailable",
                    f"the worker running run {run_id!r} did not take the answer within "
                    f"{ANSWER_SECONDS:g} s; retry",
                    headers={"Retry-After": "1"},
                )
            reply = json.loads(got[1])
        if "error" in reply:
            error = reply["error"]
            raise ApiError(error["http"], error["code"], error["message"], error["details"])
        return str(reply["status"])

    def _answer_here(
        self, run_id: str, stage: str, path: list[str | int] | None, value: Any
    ) -> dict[str, Any]:
        """The owner's side of an answer, as the reply sent back (the route's own texts)."""
        try:
            managed = self.manager.get(run_id)
            self.manager.answer(run_id, stage, path, value)
        except RunNotFound as exc:
            error = {"http": 404, "code": "unknown_run", "message": str(exc), "details": {}}
            return {"error": error}
        except NotWaiting as exc:
            status = managed.status
            message = f"run {run_id!r}: {exc} (status: {status})"
            details: dict[str, Any] = {"status": status, "waiting": exc.waiting}
            return {
                "error": {
                    "http": 409,
                    "code": "not_waiting_input",
                    "message": message,
                    "details": details,
                }
            }
        except AnswerRefused as exc:
            details = {"fields": exc.problems, "path": exc.path}
            return {
                "error": {
                    "http": 422,
                    "code": "invalid_answer",
                    "message": str(exc),
                    "details": details,
                }
            }
        return {"status": managed.status}

    async def _attach(self, run_id: str) -> None:
        handle = self._grace.pop(run_id, None)
        if handle is not None:
            handle.cancel()
        await self.redis.hincrby(self.runs_key(run_id), "viewers", 1)

    async def detach(self, run_id: str, disconnected: bool) -> None:
        """A stream of the run ended; an ``on_disconnect: cancel`` run with no viewer left in
        the whole deployment is cancelled after the grace period."""
        key = self.runs_key(run_id)
        try:
            left = await self.redis.hincrby(key, "viewers", -1)
            if not disconnected or left > 0:
                return
            raw = await self.redis.hmget(key, ["request", "status"])
        except RedisError:
            return
        if raw[0] is None or _text(raw[1]) in FINAL:
            return
        if json.loads(raw[0]).get("on_disconnect") != "cancel":
            return
        grace = self.settings.disconnect_grace
        loop = asyncio.get_running_loop()
        if grace <= 0:
            await self._cancel(run_id)
            return
        self._grace[run_id] = loop.call_later(
            grace, lambda: loop.create_task(self._cancel_unwatched(run_id))
        )

    async def _cancel_unwatched(self, run_id: str) -> None:
        self._grace.pop(run_id, None)
        viewers = await self.redis.hget(self.runs_key(run_id), "viewers")
        if viewers is not None and int(viewers) <= 0:
            await self._cancel(run_id)

    # -- the worker side -------------------------------------------------------------------

    async def _consume(self) -> None:
        while True:
            manager = self.manager
            running = manager.active
            if not self.settings.waiting_runs_hold_slots:
                running -= manager.waiting  # a run waiting for input holds no slot
            if running >= self.settings.max_concurrent_runs:
                await asyncio.sleep(0.05)  # this process is full: let the others take runs
                continue
            got: Any = await self.redis.xreadgroup(
                GROUP, self.worker_id, {self.queue: ">"}, count=1, block=BLOCK_MS
            )
            for _, entries in got or []:
                for entry_id, fields in entries:
                    await self._take(entry_id, _text(fields[b"run"]))

    async def _take(self, entry_id: bytes, run_id: str) -> None:
        """Work a queue entry: start a pending run, fail a run whose worker was lost."""
        key = self.runs_key(run_id)
        record = {_text(k): v for k, v in (await self.redis.hgetall(key)).items()}
        status = _text(record.get("status", b""))
        if not record or status in FINAL:
            await self._done(entry_id, run_id)
            return
        if status != "pending":  # it had started (running, or waiting for input): lost
            await self._take_lost(entry_id, run_id, record)
            return
        try:
            started = (await self.log.ainfo(run_id)).last_seq > 0
        except UnknownRun:
            started = False
        if started:
            # started by a worker that never got to say so in the registry (Redis went away, or
            # it was stopped right then): continued from its log, never started twice
            await self._take_lost(entry_id, run_id, record)
            return
        try:
            managed = await self._start_pending(run_id, json.loads(record["request"]))
        except _Unstartable as exc:  # checked when queued; a worker with other configs fails it
            await self._fail_unstarted(run_id, str(exc))
            await self._done(entry_id, run_id)
            return
        self._owned[run_id] = entry_id
        self._moved.discard(run_id)  # its own again (a copy stopped here earlier is replaced)
        snapshot = json.dumps(self.manager.status(run_id))
        self._written[run_id] = _Written(snapshot)
        await self.redis.hset(
            key, mapping={"status": "running", "worker": self.worker_id, "snapshot": snapshot}
        )
        if record.get("cancel") or await self.redis.hget(key, "cancel"):
            managed.run.cancel()

    async def _start_pending(self, run_id: str, request: dict[str, Any]) -> ManagedRun:
        """Start a queued run here (a chain run, a re-run, a replay); raises _Unstartable."""
        if request.get("kind") == "replay":
            recording = await self._source(run_id, request["name"])
            try:
                return self.manager.start_replay(
                    recording,
                    speed=request["speed"],
                    on_disconnect=request["on_disconnect"],
                    run_id=run_id,
                    admitted=True,
                )
            except Exception as exc:
                raise _Unstartable(f"the worker could not start it: {exc}") from None
        entry = self.catalog.find(request["chain"])
        if entry is None or entry.chain is None:
            raise _Unstartable(f"chain {request['chain']!r} is not on this worker")
        reuse = None
        if request.get("reuse"):
            asked = request["reuse"]
            recording = await self._source(run_id, asked["name"])
            try:
                reuse = Reuse(recording, entry.chain, asked["from"])
            except ReuseError as exc:
                raise _Unstartable(f"the worker could not start it: {exc}") from None
        try:
            return self.manager.start(
                entry.chain,
                request["inputs"],
                model=request["model"],
                on_disconnect=request["on_disconnect"],
                coalesce_ms=request["coalesce_ms"],
                run_id=run_id,
                admitted=True,
                reuse=reuse,
            )
        except Exception as exc:
            raise _Unstartable(f"the worker could not start it: {exc}") from None

    async def _source(self, run_id: str, name: str) -> Recording:
        """What the queued run carries (``source:<id>``), read back as a recording."""
        raw = await self.redis.get(self.source_key(run_id))
        if raw is None:
            raise _Unstartable(f"{name}: what the run was queued with is gone from Redis")
        try:
            return Recording.from_lines(_text(raw).split("\n"), name)
        except RecordingError as exc:
            raise _Unstartable(f"the worker could not start it: {exc}") from None

    def _on_finished(self, managed: ManagedRun) -> None:
        run_id = managed.run_id
        entry_id = self._owned.get(run_id)
        if entry_id is None:
            return
        task = asyncio.get_running_loop().create_task(self._finished(managed, entry_id))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finished(self, managed: ManagedRun, entry_id: bytes) -> None:
        """The registry says the run ended, and its slot and queue entry are given back.

        Retried until it lands: a run that ends while Redis is away would otherwise keep its
        slot of the deployment (and its queue entry, re-claimed by the heartbeat) for as long as
        this process lives. The owner check stops it if the run was taken over meanwhile."""
        run_id = managed.run_id
        snapshot = self.manager.status(run_id)
        snapshot["viewers"] = 0
        ttl_ms = max(1, int(self.settings.finished_run_ttl * 1000))
        failing = False
        while True:
            try:
                await self.log.flush(5.0)  # the run-end is in the log before the registry says so
                if run_id not in self._owned:
                    return  # taken over by another worker meanwhile: not ours to end
                pipe = self.redis.pipeline(transaction=True)
                pipe.hset(
                    self.runs_key(run_id),
                    mapping={"status": managed.status, "snapshot": json.dumps(snapshot)},
                )
                pipe.pexpire(self.runs_key(run_id), ttl_ms)
                await pipe.execute()
                await self._done(entry_id, run_id)
                return
            except (RedisError, OSError, EventLogUnavailable) as exc:
                if not failing:
                    logger.warning(
                        "worker %s: run %s ended; Redis: %s; retrying", self.worker_id, run_id, exc
                    )
                failing = True
                await asyncio.sleep(FINISH_RETRY_SECONDS)

    async def _done(self, entry_id: bytes, run_id: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.queue, GROUP, entry_id)
        pipe.xdel(self.queue, entry_id)
        pipe.zrem(self.admitted, run_id)
        pipe.zrem(self.waiting, run_id)
        pipe.delete(self.source_key(run_id))
        await pipe.execute()
        self._owned.pop(run_id, None)  # after: a failed call leaves the run to be retried
        self._written.pop(run_id, None)

    async def _look_at_registry(self) -> dict[str, bytes]:
        """What the registry says of the runs here, in one round trip: a run another worker
        now owns (it took it over: this one looked dead) has its copy here stopped; a run whose
        ``cancel`` flag is set is cancelled (its control message may have been lost while the
        subscription was reconnecting). Returns the runs that are still this worker's."""
        owned = dict(self._owned)
        if not owned:
            return owned
        pipe = self.redis.pipeline(transaction=False)
        for run_id in owned:
            pipe.hmget(self.runs_key(run_id), ["worker", "cancel"])
        looks = await pipe.execute()
        for run_id, (owner, cancel) in zip(list(owned), looks, strict=True):
            if run_id not in self._owned:
                del owned[run_id]
            elif owner is not None and _text(owner) != self.worker_id:
                logger.error("worker %s: run %s was taken over", self.worker_id, run_id)
                self._stop_copy(run_id)
                del owned[run_id]
            elif cancel is not None:
                with contextlib.suppress(RunNotFound):
                    self.manager.cancel(run_id)
        return owned

    async def _heartbeat(self) -> None:
        period = self.heartbeat_timeout / 3
        while True:
            await self.redis.set(
                f"{self.prefix}worker:{self.worker_id}",
                json.dumps({"runs": len(self._owned), "ts": _now_ms()}),
                px=max(1, int(self.heartbeat_timeout * 1000)),
            )
            # the registry first: re-claiming the entry of a run another worker took over
            # (XCLAIM with no idle time moves it whoever holds it) would only steal it back; a
            # run with no registry entry goes on (Redis restarted empty)
            owned = await self._look_at_registry()
            if owned:
                await self.redis.xclaim(
                    self.queue, GROUP, self.worker_id, 0, list(owned.values()), justid=True
                )
            await asyncio.sleep(period)

    async def _snapshot(self) -> None:
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(SNAPSHOT_SECONDS)
            if self._owned:
                await self._write_snapshots(dict(self._owned))
            if time.monotonic() - renewed >= self.heartbeat_timeout / 3:
                renewed = time.monotonic()
                await self._renew_waiting()

    def _lease(self) -> int:
        """Until when a run counts as waiting unless its owner renews it (a lost worker's
        waiting runs leave the count after ``heartbeat_timeout``, taken over or not)."""
        return _now_ms() + max(1, int(self.heartbeat_timeout * 1000))

    async def _renew_waiting(self) -> None:
        waiting = [
            r for r, w in self._written.items() if w.state == "waiting_input" and r in self._owned
        ]
        if waiting:
            lease = self._lease()
            await self.redis.zadd(self.waiting, dict.fromkeys(waiting, lease), xx=True)

    async def _write_snapshots(self, owned: dict[str, bytes]) -> None:
        """The changed status of these runs into the registry. A run waiting for input counts
        in ``waiting`` (``max_waiting_runs``, checked by the admit script) and gives its slot
        back (``waiting_runs_hold_slots: false``); answered, it leaves ``waiting`` and takes its
        slot again."""
        pipe = self.redis.pipeline(transaction=False)
        dirty = False
        now = time.monotonic()
        built = 0
        for run_id in owned:
            if run_id not in self._owned:  # done meanwhile (this loop yields between slices)
                continue
            try:
                managed = self.manager.get(run_id)
            except RunNotFound:
                continue
            written = self._written.setdefault(run_id, _Written())
            changes = (managed.changes, managed.status)
            if written.changes == changes and now - written.looked < SNAPSHOT_REFRESH:
                continue  # only tokens since the last look: building the status can wait
            built += 1
            if built % SNAPSHOT_SLICE == 0:
                # runs started together change together (a stage ends in each): building
                # hundreds of statuses in one go stalled every stream of the process for
                # ~100 ms; let the loop run between slices
                await asyncio.sleep(0)
                if run_id not in self._owned:
                    self._written.pop(run_id, None)
                    continue
            written.changes, written.looked = changes, now
            status = self.manager.status(run_id)
            snapshot = json.dumps(status)
            if written.snapshot != snapshot:
                before = written.state
                state = status["status"]
                written.snapshot, written.state = snapshot, state
                pipe.hset(
                    self.runs_key(run_id),
                    mapping={"snapshot": snapshot, "status": state},
                )
                if state == "waiting_input" and before != "waiting_input":
                    pipe.zadd(self.waiting, {run_id: self._lease()})
                    if not self.settings.waiting_runs_hold_slots:
                        pipe.zrem(self.admitted, run_id)
                elif state != "waiting_input" and before == "waiting_input":
                    pipe.zrem(self.waiting, run_id)
                    if not self.settings.waiting_runs_hold_slots and state not in FINAL:
                        pipe.zadd(self.admitted, {run_id: _now_ms()}, nx=True)
                dirty = True
        if dirty:
            await pipe.execute()

    async def _takeover(self) -> None:
        idle_ms = max(1, int(self.heartbeat_timeout * 1000))
        while True:
            await asyncio.sleep(self.heartbeat_timeout / 2)
            start: Any = "0-0"
            while True:
                answer: Any = await self.redis.xautoclaim(
                    self.queue, GROUP, self.worker_id, idle_ms, start_id=start, count=10
                )
                start, claimed = answer[0], answer[1]
                for entry_id, fields in claimed:
                    if not fields:
                        continue
                    if _text(fields[b"run"]) in self._owned:
                        # its own run, idle because Redis was away longer than the timeout:
                        # it goes on here (claimed again, as the heartbeat does), not twice
                        continue
                    self.taken_over += 1
                    await self._take(entry_id, _text(fields[b"run"]))
                if _text(start) == "0-0":
                    break

    async def _take_lost(self, entry_id: bytes, run_id: str, record: dict[str, Any]) -> None:
        """A started run whose worker was lost: continue it here, or end it failed (why)."""
        worker = _text(record.get("worker", b"?"))
        key = self.runs_key(run_id)
        handed_over = record.get("handover") is not None  # its worker shut down (hand_over)
        takeovers = int(await self.redis.hincrby(key, "takeovers", 1))
        # this worker is the run's writer from now on, continued or failed: a lost owner that
        # is alive after all (stalled, cut off) cannot add to the log read next
        await self.log.fence(run_id)
        why = await self._continue_lost(entry_id, run_id, worker, record, takeovers, handed_over)
        if handed_over:
            await self.redis.hdel(key, "handover")  # a later loss is told as what it is
        if why is None:
            logger.warning(
                "worker %s: continues run %s of %s worker %s",
                self.worker_id,
                run_id,
                "shut-down" if handed_over else "lost",
                worker,
            )
            return
        await self._fail_lost(run_id, worker, why, takeovers, handed_over)
        await self._done(entry_id, run_id)

    async def _continue_lost(
        self,
        entry_id: bytes,
        run_id: str,
        worker: str,
        record: dict[str, Any],
        takeovers: int,
        handed_over: bool = False,
    ) -> str | None:
        """Start the lost run again here from its log (``engine.reuse.Resume``); None when it
        goes on, else why it cannot."""
        if self.settings.lost_runs == "fail":
            return "lost_runs is `fail`"
        # the guard is against runs that keep killing their workers: hand-overs of workers that
        # shut down (a rolling restart) do not count
        if takeovers - int(record.get("handovers", 0)) > MAX_TAKEOVERS:
            return f"it was taken over {MAX_TAKEOVERS} times already"
        try:
            request = json.loads(record["request"])
            if request.get("kind") == "replay":
                return "a replay is not continued: start the replay again"
            chain_id, inputs = request["chain"], request["inputs"]
        except (KeyError, ValueError, TypeError, AttributeError):
            return "its request is not in the registry"
        unknown = sorted(set(request) - _REQUEST_KEYS)
        if unknown:
            return f"its request has fields this worker does not rebuild: {', '.join(unknown)}"
        entry = self.catalog.find(chain_id)
        if entry is None or entry.chain is None:
            return f"chain {chain_id!r} is not on this worker"
        try:
            info = await self.log.ainfo(run_id)
        except UnknownRun:
            return "its events expired"
        if info.finished:
            return "its log had ended"
        if info.first_seq > 1:
            return (
                f"its log starts at seq {info.first_seq}: the first events were dropped "
                f"(max_events_per_run {self.log.cap:,})"
            )
        reuse = None
        if request.get("reuse"):  # a re-run: what it reuses came with it (source:<id>)
            asked = request["reuse"]
            try:
                recording = await self._source(run_id, asked["name"])
                reuse = Reuse(recording, entry.chain, asked["from"])
            except (_Unstartable, ReuseError) as exc:
                return str(exc)
        part = await self.log.read(run_id, 0)
        lost = ErrorInfo(
            type="worker_lost",
            message=continued_message(worker, self.heartbeat_timeout, self.worker_id, handed_over),
        )
        try:
            resume = Resume([event_from_json(item.data) for item in part.entries], lost)
            managed = self.manager.start(
                entry.chain,
                inputs,
                model=request.get("model"),
                on_disconnect=request.get("on_disconnect", "continue"),
                coalesce_ms=request.get("coalesce_ms"),
                run_id=run_id,
                admitted=True,
                reuse=reuse,
                resume=resume,
            )
        except Exception as exc:  # ResumeError, InputError, ModelConfigError: this worker's
            return str(exc)
        managed.takeovers = takeovers
        with contextlib.suppress(KeyError, ValueError, TypeError):
            managed.created_at = int(json.loads(record["snapshot"])["created_at"])
        self._owned[run_id] = entry_id
        self._moved.discard(run_id)  # its own again (a copy stopped here earlier is replaced)
        snapshot = json.dumps(self.manager.status(run_id))
        self._written[run_id] = _Written(snapshot, _text(record.get("status", b"")))
        key = self.runs_key(run_id)
        await self.redis.hset(
            key,
            mapping={
                "status": managed.status,
                "worker": self.worker_id,  # the lost owner, if alive after all, stops the run
                "snapshot": snapshot,
            },
        )
        if record.get("cancel") or await self.redis.hget(key, "cancel"):
            managed.run.cancel()
        return None

    async def _fail_lost(
        self, run_id: str, worker: str, why: str, takeovers: int = 0, handed_over: bool = False
    ) -> None:
        """End a run whose worker died: failed stage-ends for the open stages, then run-end."""
        message = worker_lost_message(worker, self.heartbeat_timeout, why, handed_over)
        try:
            info = await self.log.ainfo(run_id)
            part = await self.log.read(run_id, info.first_seq - 1)
        except UnknownRun:  # its events expired (orphan_ttl): only the registry is left
            info, part = LogInfo(1, 0, True), LogSlice([], True)
        open_units: dict[tuple[str, str], Any] = {}
        ended = None
        for item in part.entries:
            event = event_from_json(item.data)
            where = (str(event.stage), json.dumps(event.path))
            if event.type == "stage-start":
                open_units[where] = event
            elif event.type == "stage-end":
                open_units.pop(where, None)
            elif event.type == "run-end":
                ended = event
        self.log.adopt(run_id, info.last_seq)
        seq = info.last_seq
        error = ErrorInfo(type="worker_lost", message=message)
        if ended is None and not info.finished:
            for start in reversed(list(open_units.values())):  # map items before their map
                seq += 1
                stage_end = StageEnded(
                    run_id=run_id,
                    seq=seq,
                    ts=_now_ms(),
                    stage=start.stage,
                    path=start.path,
                    attempt=start.attempt,
                    status="failed",
                    error=ErrorInfo(type="worker_lost", message=message, stage=start.stage),
                )
                self.log.append(run_id, LogEntry(seq, "stage-end", event_to_json(stage_end)))
            seq += 1
            ended = RunEnded(run_id=run_id, seq=seq, ts=_now_ms(), status="failed", error=error)
            self.log.append(run_id, LogEntry(seq, "run-end", event_to_json(ended)))
        if not info.finished:
            self.log.finish(run_id)
        await self.log.flush(5.0)
        key = self.runs_key(run_id)
        raw = await self.redis.hget(key, "snapshot")
        snapshot = json.loads(raw) if raw else {"run_id": run_id}
        snapshot.update(
            status=ended.status if ended is not None else "failed",
            finished_at=_now_ms(),
            last_seq=seq,
            viewers=0,
            error={"type": "worker_lost", "message": message, "stage": None},
            takeovers=takeovers,
        )
        if ended is not None and ended.error is not None:
            snapshot["error"] = {
                "type": ended.error.type,
                "message": ended.error.message,
                "stage": ended.error.stage,
            }
        ttl_ms = max(1, int(self.settings.finished_run_ttl * 1000))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "status": snapshot["status"],
                "snapshot": json.dumps(snapshot),
                "worker": self.worker_id,  # the lost owner, if alive after all, stops the run
            },
        )
        pipe.pexpire(key, ttl_ms)
        await pipe.execute()
        logger.warning(
            "worker %s: run %s of lost worker %s failed: %s", self.worker_id, run_id, worker, why
        )

    async def _fail_unstarted(self, run_id: str, why: str) -> None:
        """A queued run that cannot start on this worker: run-start is never sent; it fails."""
        self.log.adopt(run_id, 0)
        error = ErrorInfo(type="worker_error", message=why)
        ended = RunEnded(run_id=run_id, seq=1, ts=_now_ms(), status="failed", error=error)
        self.log.append(run_id, LogEntry(1, "run-end", event_to_json(ended)))
        self.log.finish(run_id)
        await self.log.flush(5.0)
        raw = await self.redis.hget(self.runs_key(run_id), "snapshot")
        snapshot = json.loads(raw) if raw else {"run_id": run_id}
        snapshot.update(status="failed", last_seq=1, error={"type": "worker_error", "message": why})
        await self.redis.hset(
            self.runs_key(run_id),
            mapping={"status": "failed", "snapshot": json.dumps(snapshot)},
        )

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.control)
            # what was published while this subscription was down reached nobody: a cancel is
            # also a flag in the registry, read now that new messages do arrive
            await self._look_at_registry()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message.get("type") != "message":
                    continue
                try:
                    order = json.loads(message["data"])
                except ValueError:
                    continue
                run_id = order.get("run_id")
                if run_id not in self._owned:
                    continue  # another worker's run
                if order.get("op") == "cancel":
                    with contextlib.suppress(RunNotFound):
                        self.manager.cancel(run_id)
                elif order.get("op") == "input" and isinstance(order.get("reply"), str):
                    reply = self._answer_here(
                        run_id, str(order.get("stage")), order.get("path"), order.get("value")
                    )
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.rpush(order["reply"], json.dumps(reply))
                    pipe.pexpire(order["reply"], int(ANSWER_SECONDS * 2000))
                    await pipe.execute()
                    await self._write_snapshots({run_id: self._owned[run_id]})
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # annotated only in newer redis-py
