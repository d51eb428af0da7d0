"""Runs in the background, decoupled from whoever watches them.

``RunManager.start`` checks the inputs and the model (the engine raises before anything runs),
then executes the run as a task of the server's event loop. Every event goes through the run's
sink into the event log, serialized once; viewers read the log, never the run. A run keeps
going when its viewers leave, unless it was started with ``on_disconnect="cancel"``: then it is
cancelled as soon as its last viewer disconnects (``POST /v1/runs?stream=true`` defaults to that;
its own response is the first viewer), after a grace period (``disconnect_grace``) during which
a viewer that comes back (a client resuming after a network blip) keeps it going.

``POST /v1/runs`` with an ``Idempotency-Key`` is registered here too: the same key with the same
request finds the same run (``find_idempotent``), the same key with another request is refused
(``IdempotencyConflict``). A key is forgotten with its run.

A finished run (its status and its events) stays ``finished_run_ttl`` seconds, then is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from stagecast.api.eventlog import EventLog, LogEntry
from stagecast.api.metrics import Metrics
from stagecast.api.settings import ServerSettings
from stagecast.engine.asking import AnswerRefused, NotWaiting
from stagecast.engine.chain import Chain
from stagecast.engine.events import (
    ChainInfo,
    ErrorInfo,
    RunEnded,
    RunEvent,
    RunStatus,
    event_to_json,
)
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.providers import ModelRegistry
from stagecast.engine.replay import ReplayRun
from stagecast.engine.reuse import Recording, Resume, Reuse

__all__ = [
    "IdempotencyConflict",
    "ManagedRun",
    "OnDisconnect",
    "RunLimitError",
    "RunManager",
    "RunNotFound",
]

OnDisconnect = Literal["continue", "cancel"]


logger = logging.getLogger("stagecast.runs")


class RunNotFound(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} (unknown, or expired after it finished)")
        self.run_id = run_id


class RunLimitError(Exception):
    def __init__(self, limit: int, setting: str = "max_concurrent_runs") -> None:
        what = "running" if setting == "max_concurrent_runs" else "waiting for input"
        super().__init__(f"{limit} runs are already {what} ({setting}); retry when one ends")
        self.limit = limit
        self.setting = setting


class IdempotencyConflict(Exception):
    def __init__(self, key: str, run_id: str) -> None:
        super().__init__(
            f"the Idempotency-Key {key[:80]!r} was already used for run {run_id} with a "
            "different request; send a new key for a new run, or the same request to re-attach"
        )
        self.key = key
        self.run_id = run_id


@dataclass
class ManagedRun:
    """A run the server executes, with what the status route shows besides the engine's state."""

    run: ChainRun | ReplayRun
    chain: Chain | None
    """The chain it runs; None for a replay (``run.chain_info`` tells the recorded chain)."""
    on_disconnect: OnDisconnect
    created_at: int
    task: asyncio.Task[None] | None = None
    ended: RunEnded | None = None
    finished_at: float | None = None
    finished_at_ms: int | None = None
    viewers: int = 0
    kinds: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    grace: asyncio.TimerHandle | None = None
    """The pending cancel of an ``on_disconnect: cancel`` run that has no viewer."""
    takeovers: int = 0
    """How many times a worker took this run over after its worker was lost (``api.cluster``)."""
    changes: int = 0
    """Events other than tokens so far: what the status shows besides counts changed."""

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def chain_info(self) -> ChainInfo:
        if isinstance(self.run, ReplayRun):
            return self.run.chain_info
        assert self.chain is not None
        return ChainInfo(id=self.chain.id, title=self.chain.title, version=self.chain.spec.version)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def status(self) -> RunStatus:
        if self.ended is not None:
            return self.ended.status
        return "waiting_input" if self.run.status == "waiting_input" else "running"


def _now_ms() -> int:
    return int(time.time() * 1000)


class RunManager:
    """Starts, tracks, cancels and forgets runs."""

    def __init__(
        self,
        settings: ServerSettings,
        log: EventLog,
        registry: ModelRegistry,
        metrics: Metrics | None = None,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.settings = settings
        self.log = log
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.clock = clock
        self._runs: dict[str, ManagedRun] = {}
        self._first_finish = math.inf  # no finished run is older: expire() scans only then
        self._keys: dict[str, tuple[str, str]] = {}  # Idempotency-Key -> (fingerprint, run_id)
        self.on_finished: list[Callable[[ManagedRun], None]] = []
        """Called when a run has ended (its run-end is in the log): the cluster's registry."""

    # -- queries ---------------------------------------------------------------------------

    def get(self, run_id: str) -> ManagedRun:
        managed = self._runs.get(run_id)
        if managed is None:
            raise RunNotFound(run_id)
        return managed

    def find_idempotent(self, key: str, fingerprint: str) -> ManagedRun | None:
        """The run started with this key and this request, None for a new key; raises
        IdempotencyConflict when the key came with another request."""
        self.expire()
        known = self._keys.get(key)
        if known is None:
            return None
        if known[0] != fingerprint:
            raise IdempotencyConflict(key, known[1])
        return self._runs[known[1]]

    @property
    def active(self) -> int:
        """Runs not finished (waiting ones included)."""
        return sum(1 for m in self._runs.values() if not m.finished)

    @property
    def waiting(self) -> int:
        """Runs waiting for input now."""
        return sum(
            1 for m in self._runs.values() if not m.finished and m.run.status == "waiting_input"
        )

    def __len__(self) -> int:
        return len(self._runs)

    # -- lifecycle -------------------------------------------------------------------------

    def start(
        self,
        chain: Chain,
        inputs: Mapping[str, Any] | None,
        *,
        model: str | None = None,
        on_disconnect: OnDisconnect = "continue",
        coalesce_ms: float | None = None,
        idempotency: tuple[str, str] | None = None,
        run_id: str | None = None,
        admitted: bool = False,
        reuse: Reuse | None = None,
        resume: Resume | None = None,
    ) -> ManagedRun:
        """Check and start a run. Raises InputError, ModelConfigError or RunLimitError.

        ``coalesce_ms`` overrides the server's ``coalesce_ms`` setting for this run;
        ``idempotency`` is ``(key, fingerprint of the request)`` (see ``find_idempotent``).
        A worker of a deployment (``api.cluster``) passes the ``run_id`` the queue gave and
        ``admitted`` (the deployment-wide limit was checked when the run was queued).
        ``resume`` continues that run from its log (a takeover): the log is adopted at the
        resume's last seq instead of created; raises ResumeError when it does not fit the chain.
        """
        self.expire()
        settings = self.settings
        active = self.active
        # waiting <= active: below both limits it cannot matter (and it is a scan of every run)
        limit = min(settings.max_concurrent_runs, settings.max_waiting_runs)
        waiting = self.waiting if active >= limit else 0
        running = active if settings.waiting_runs_hold_slots else active - waiting
        if not admitted and running >= settings.max_concurrent_runs:
            self.metrics.runs_rejected["limit"] += 1
            raise RunLimitError(settings.max_concurrent_runs)
        if not admitted and waiting >= settings.max_waiting_runs:
            self.metrics.runs_rejected["waiting_limit"] += 1
            raise RunLimitError(settings.max_waiting_runs, "max_waiting_runs")
        run = ChainRun(
            chain,
            inputs,
            models=self.registry,
            model=model,
            run_id=run_id,
            coalesce_ms=self.settings.coalesce_ms if coalesce_ms is None else coalesce_ms,
            render_limits=self.settings.render_limits(),
            max_map_items=self.settings.max_map_items,
            reuse=reuse,
            max_input_wait=self.settings.max_input_wait,
            resume=resume,
        )
        managed = ManagedRun(
            run=run,
            chain=chain,
            on_disconnect=on_disconnect,
            created_at=_now_ms(),
            kinds={s.id or "": s.kind for s in chain.spec.stages},
        )
        run.sink = self._sink(managed)
        if resume is None:
            self.log.create(run.run_id)
        else:
            self.log.adopt(run.run_id, resume.last_seq)
        self._runs[run.run_id] = managed
        if idempotency is not None:
            managed.idempotency_key = idempotency[0]
            self._keys[idempotency[0]] = (idempotency[1], run.run_id)
        self.metrics.runs_started += 1
        managed.task = asyncio.get_running_loop().create_task(
            self._drive(managed), name=f"stagecast {run.run_id}"
        )
        return managed

    def start_replay(
        self,
        recording: Recording,
        *,
        speed: float | None = 1.0,
        on_disconnect: OnDisconnect = "continue",
        run_id: str | None = None,
        admitted: bool = False,
    ) -> ManagedRun:
        """Serve ``recording`` as a new run (``engine.replay``). Raises RunLimitError.
        A worker of a deployment passes ``run_id`` and ``admitted``, as for ``start``."""
        self.expire()
        if not admitted and self.active >= self.settings.max_concurrent_runs:
            self.metrics.runs_rejected["limit"] += 1
            raise RunLimitError(self.settings.max_concurrent_runs)
        run = ReplayRun(recording, speed=speed, run_id=run_id)
        managed = ManagedRun(
            run=run,
            chain=None,
            on_disconnect=on_disconnect,
            created_at=_now_ms(),
            kinds={step.stage: step.kind for step in recording.start.plan},
        )
        run.sink = self._sink(managed)
        self.log.create(run.run_id)
        self._runs[run.run_id] = managed
        self.metrics.runs_started += 1
        managed.task = asyncio.get_running_loop().create_task(
            self._drive(managed), name=f"stagecast replay {run.run_id}"
        )
        return managed

    def _sink(self, managed: ManagedRun) -> Any:
        append, run_id = self.log.append, managed.run.run_id
        observe, kinds = self.metrics.observe_stage, managed.kinds

        def sink(event: RunEvent) -> None:
            append(run_id, LogEntry(event.seq, event.type, event_to_json(event)))
            kind = event.type
            if kind == "token":
                return
            managed.changes += 1
            if kind == "stage-end" and event.path is not None and len(event.path) == 1:
                stage = event.stage or ""
                observe(kinds.get(stage, "unknown"), event.status, event.duration_ms / 1000)  # type: ignore[union-attr]
            elif kind == "run-end":
                managed.ended = event  # type: ignore[assignment]

        return sink

    async def _drive(self, managed: ManagedRun) -> None:
        run = managed.run
        try:
            await run.execute()
        except BaseException as exc:
            if managed.ended is None:
                # The engine crashed (a bug) or the task was cancelled from outside before the
                # run-end: viewers still get exactly one run-end, last.
                error = ErrorInfo(
                    type="internal_error", message=f"the run stopped: {type(exc).__name__}"
                )
                cancelled = isinstance(exc, asyncio.CancelledError)
                ended = RunEnded(
                    run_id=run.run_id,
                    seq=self.log.info(run.run_id).last_seq + 1,  # the log is the truth
                    ts=_now_ms(),
                    status="cancelled" if cancelled else "failed",
                    usage=run.usage,
                    error=None if cancelled else error,
                )
                try:
                    run.sink(ended)
                except Exception:
                    logger.exception("run %s: could not append the final run-end", run.run_id)
                managed.ended = ended
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if managed.grace is not None:
                managed.grace.cancel()
                managed.grace = None
            managed.finished_at = self.clock()
            self._first_finish = min(self._first_finish, managed.finished_at)
            managed.finished_at_ms = _now_ms()
            self.log.finish(run.run_id)
            self.metrics.runs_finished[managed.status] += 1
            for hook in self.on_finished:
                try:
                    hook(managed)
                except Exception:
                    logger.exception("run %s: an on_finished hook failed", run.run_id)

    def answer(self, run_id: str, stage: str, path: list[str | int] | None, value: Any) -> None:
        """Answer the run's pending input at ``stage``/``path``. Raises RunNotFound,
        NotWaiting (names what is waiting) or AnswerRefused (field path -> problem)."""
        managed = self.get(run_id)
        try:
            managed.run.answer(stage, path, value)
        except AnswerRefused:
            self.metrics.answers["refused"] += 1
            raise
        except NotWaiting:
            self.metrics.answers["not_waiting"] += 1
            raise
        self.metrics.answers["accepted"] += 1

    def cancel(self, run_id: str) -> ManagedRun:
        """Idempotent: a finished run stays as it ended."""
        managed = self.get(run_id)
        if not managed.finished:
            managed.run.cancel()
        return managed

    def attach(self, run_id: str) -> ManagedRun:
        managed = self.get(run_id)
        managed.viewers += 1
        if managed.grace is not None:  # came back in time: the run goes on
            managed.grace.cancel()
            managed.grace = None
        self.metrics.streams_active += 1
        self.metrics.streams_opened += 1
        return managed

    def detach(self, managed: ManagedRun, disconnected: bool) -> None:
        managed.viewers -= 1
        self.metrics.streams_active -= 1
        if (
            disconnected
            and managed.on_disconnect == "cancel"
            and managed.viewers == 0
            and not managed.finished
        ):
            grace = self.settings.disconnect_grace
            if grace <= 0:
                managed.run.cancel()
            elif managed.grace is None:
                loop = asyncio.get_running_loop()
                managed.grace = loop.call_later(grace, self._cancel_unwatched, managed)

    def _cancel_unwatched(self, managed: ManagedRun) -> None:
        managed.grace = None
        if managed.viewers == 0 and not managed.finished:
            managed.run.cancel()

    def expire(self) -> list[str]:
        """Forget finished runs older than the TTL (their logs too)."""
        now = self.clock()
        ttl = self.settings.finished_run_ttl
        if now - self._first_finish < ttl:  # nothing is due (it runs at every start)
            self.log.expire()
            return []
        gone = [
            run_id
            for run_id, m in self._runs.items()
            if m.finished_at is not None and now - m.finished_at >= ttl
        ]
        for run_id in gone:
            key = self._runs.pop(run_id).idempotency_key
            if key is not None:
                self._keys.pop(key, None)
        self._first_finish = min(
            (m.finished_at for m in self._runs.values() if m.finished_at is not None),
            default=math.inf,
        )
        self.log.expire()
        return gone

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every running run and wait (bounded) for their run-end."""
        tasks = [m.task for m in self._runs.values() if m.task is not None and not m.finished]
        for managed in self._runs.values():
            if not managed.finished:
                managed.run.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    # -- status ----------------------------------------------------------------------------

    def status(self, run_id: str) -> dict[str, Any]:
        managed = self.get(run_id)
        run = managed.run
        ended = managed.ended
        return {
            "run_id": run.run_id,
            "chain": asdict(managed.chain_info),
            "status": managed.status,
            "model": run.default_model.label,
            "created_at": managed.created_at,
            "finished_at": managed.finished_at_ms,
            "last_seq": run.last_seq if ended is None else ended.seq,
            "on_disconnect": managed.on_disconnect,
            "viewers": managed.viewers,
            "stages": {stage_id: asdict(state) for stage_id, state in run.stages.items()},
            "pending_input": [p.to_dict() for p in run.pending_inputs],
            "outputs": ended.outputs if ended is not None else None,
            "usage": asdict(ended.usage if ended is not None else run.usage),
            "error": asdict(ended.error) if ended is not None and ended.error else None,
            "takeovers": managed.takeovers,
        }
