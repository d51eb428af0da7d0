"""Replays a recording as a live run: the same events, a new run id, fresh ``seq`` and ``ts``.

``ReplayRun`` has the surface of ``ChainRun`` that the CLI views and the server use (``sink``,
``execute``, ``cancel``, ``status``, ``stages``, ``usage``, ``last_seq``), so a recorded run is
served on the same routes, over the same SSE, resumable and cancellable, with no model and no key.

Timing follows the recording: each event waits until ``(its ts - run-start's ts) / speed`` after
the replay started (``speed=None``: as fast as the loop goes, one loop turn per event). Cancel
works like a run's: every stage that started and has not ended gets a ``stage-end``
``cancelled``, then one ``run-end`` ``cancelled``. A recording that stops before its ``run-end``
(a live run cut off) ends ``failed``, saying so. A replay never waits for a person: a recorded
``input-required`` plays as an event, and the recorded answer (the input stage's ``stage-end``)
follows at its recorded time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from stagecast.engine.asking import NotWaiting, PendingInput
from stagecast.engine.events import (
    ChainInfo,
    ErrorInfo,
    RunEnded,
    RunEvent,
    RunStatus,
    StageEnded,
    StageProgress,
    StageStarted,
    Usage,
)
from stagecast.engine.orchestrator import StageState, new_run_id
from stagecast.engine.reuse import Recording

__all__ = ["ModelLabel", "ReplayRun", "parse_speed"]


@dataclass(frozen=True)
class ModelLabel:
    """What a replay says of its model: the recorded run's (``ResolvedModel.label`` alike)."""

    label: str


def parse_speed(raw: str | float | None) -> float | None:
    """``"max"`` -> None (no waiting); a number > 0 -> that factor. Raises ValueError."""
    if raw is None:
        return 1.0
    if isinstance(raw, str):
        if raw.strip().lower() == "max":
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"expected a number > 0 or 'max', got {raw!r}") from None
    else:
        value = float(raw)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"expected a number > 0 or 'max', got {raw!r}")
    return value


def _now_ms() -> int:
    return int(time.time() * 1000)


class ReplayRun:
    """One replay of ``recording``. Build it, then ``await execute()``."""

    def __init__(
        self,
        recording: Recording,
        *,
        speed: float | None = 1.0,
        run_id: str | None = None,
        sink: Callable[[RunEvent], None] | None = None,
    ) -> None:
        self.recording = recording
        self.speed = speed
        self.run_id = run_id or new_run_id()
        self.sink: Callable[[RunEvent], None] = sink or (lambda event: None)
        start = recording.start
        self.chain_info: ChainInfo = start.chain
        self.default_model = ModelLabel(start.model)
        self.inputs: dict[str, Any] = dict(start.inputs)
        self.status: RunStatus = "pending"
        self.stages = {step.stage: StageState() for step in start.plan}
        self.outputs: Any = None
        self.error: ErrorInfo | None = None
        self._usage = Usage()
        self._seq = 0
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False

    @property
    def usage(self) -> Usage:
        return self._usage

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def pending_inputs(self) -> list[PendingInput]:
        """Always empty: a replay plays the recorded answer at its recorded time."""
        return []

    def answer(self, stage: str, path: list[str | int] | None, value: Any) -> None:
        """A replay never waits for a person: raises NotWaiting."""
        raise NotWaiting(stage, path, [])

    def cancel(self) -> None:
        """Stop the replay: open stages end ``cancelled``, then run-end ``cancelled``."""
        if self.status in ("succeeded", "failed", "cancelled") or self._cancel_requested:
            return
        self._cancel_requested = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def execute(self) -> RunEnded:
        """Play every event, in order, at the recorded pace; return the run-end."""
        if self._task is not None:
            raise RuntimeError("a ReplayRun executes once")
        self._task = asyncio.current_task()
        self.status = "running"
        loop = asyncio.get_running_loop()
        events = self.recording.events
        origin = events[0].ts
        began = loop.time()
        opened: dict[tuple[str | int, ...], StageStarted] = {}
        try:
            for event in events:
                if self.speed is None:
                    await asyncio.sleep(0)
                else:
                    delay = began + (event.ts - origin) / 1000 / self.speed - loop.time()
                    await asyncio.sleep(max(delay, 0))
                if self._cancel_requested:
                    raise asyncio.CancelledError
                key = tuple(event.path or ())
                if isinstance(event, StageStarted):
                    opened[key] = event
                elif isinstance(event, StageEnded):
                    opened.pop(key, None)
                played = self._play(event)
                if isinstance(played, RunEnded):
                    return played
            return self._end(
                "failed",
                ErrorInfo(
                    type="recording_incomplete",
                    message=f"{self.recording.name}: the recording ends before its run-end",
                ),
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._cancel_requested or task is None:
                raise
            task.uncancel()
            for started in reversed(list(opened.values())):
                self._play(
                    StageEnded(
                        run_id=self.run_id,
                        seq=0,
                        ts=0,
                        stage=started.stage,
                        path=started.path,
                        attempt=started.attempt,
                        status="cancelled",
                    )
                )
            return self._end("cancelled", None)

    def _end(self, status: Any, error: ErrorInfo | None) -> RunEnded:
        ended = self._play(
            RunEnded(run_id=self.run_id, seq=0, ts=0, status=status, usage=self._usage, error=error)
        )
        assert isinstance(ended, RunEnded)
        return ended

    def _play(self, event: RunEvent) -> RunEvent:
        seq = self._seq + 1
        fresh = replace(event, run_id=self.run_id, seq=seq, ts=_now_ms())
        self._fold(fresh)
        self.sink(fresh)
        self._seq = seq
        return fresh

    def _fold(self, event: RunEvent) -> None:
        """What the status route shows: the same per-stage state a live run keeps."""
        if isinstance(event, RunEnded):
            self.status, self.outputs, self.error = event.status, event.outputs, event.error
            self._usage = event.usage
            return
        path = event.path
        if path is None or len(path) != 1:
            return
        state = self.stages.get(str(path[0]))
        if state is None:
            return
        if isinstance(event, StageStarted):
            state.status, state.attempt = "running", event.attempt or 1
        elif isinstance(event, StageProgress):
            state.completed, state.total = event.completed, event.total
        elif isinstance(event, StageEnded):
            state.status, state.output, state.usage = event.status, event.output, event.usage
            state.duration_ms, state.error = event.duration_ms, event.error
            self._usage.add(event.usage)
