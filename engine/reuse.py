"""Recordings, and re-runs that reuse an earlier run's stage outputs.

A recording is a run's event stream, one wire-JSON event a line (NDJSON): exactly what
``stagecast run --events`` prints, ``--record`` writes and ``GET /v1/runs/{id}/events?format=
ndjson`` serves. There is no second storage format: ``run-start`` carries the chain (id, title,
version), the model and the inputs, every ``stage-end`` the stage's output and its
``fingerprint``.

The fingerprint of a stage (or of one map item) is a SHA-256 over its resolved spec (the stage's
YAML without ``label`` and ``weight``, the chain's ``defaults``, the model an llm stage resolves
to) and over its rendered input: the values its prompt, text or query (a map: its ``over``)
render to in the run's context. An edited prompt, a changed input it reads, an upstream output
that changed, a different model: a new fingerprint. A map item's rendered prompt holds its item,
so items are reused one by one. A re-run (``Reuse``) takes an earlier ``stage-end`` instead of
executing the stage when it succeeded, has the same path and the same fingerprint, and the stage
is neither the ``from`` stage nor downstream of it. A failed, skipped or cancelled stage is never
reused.

A run that was interrupted (its worker died) is continued from its own log (``Resume``): the
same run, the same ``run_id``, seq continuing after the log's last event, no second
``run-start``. A stage (or map item) that had ended there is taken as it ended and not emitted
again; one that was running gets a ``stage-retry`` for the lost attempt (the caller's error,
e.g. ``worker_lost``) and a new ``stage-start`` with the next attempt; the rest runs as usual.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stagecast.engine.chain import Chain, stage_templates
from stagecast.engine.errors import ChainError
from stagecast.engine.events import (
    ErrorInfo,
    RunEvent,
    RunStarted,
    SourceFound,
    StageEnded,
    StageProgress,
    StageRetried,
    StageStarted,
    event_from_json,
)
from stagecast.engine.spec import LlmStage, MapStage, StageSpec

__all__ = [
    "Fingerprints",
    "Recording",
    "RecordingError",
    "Resume",
    "ResumeError",
    "Reuse",
    "ReuseError",
    "downstream_of",
    "own_templates",
]

_COSMETIC = {"label", "weight"}


class RecordingError(ChainError):
    """A recording cannot be read: names the file and line (``file:line: problem``)."""


class ReuseError(ChainError):
    """A recording cannot be reused for this run (another chain or version, an unknown stage)."""


class ResumeError(ChainError):
    """An interrupted run cannot be continued from its log (says why)."""


@dataclass
class Recording:
    """The events of one recorded run, validated, in order."""

    events: list[RunEvent]
    name: str = "recording"

    @property
    def start(self) -> RunStarted:
        first = self.events[0]
        assert isinstance(first, RunStarted)
        return first

    @classmethod
    def from_lines(cls, lines: Iterable[str | bytes], name: str = "recording") -> Recording:
        """Parse NDJSON lines; a bad line raises RecordingError ``name:line: problem``."""
        events: list[RunEvent] = []
        for number, raw in enumerate(lines, 1):
            text = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            if not text.strip():
                continue
            try:
                event = event_from_json(text)
            except ValidationError as exc:
                problem = _first_problem(exc)
                raise RecordingError(f"{name}:{number}: not a Stagecast event: {problem}") from None
            if not events and not isinstance(event, RunStarted):
                raise RecordingError(
                    f"{name}:{number}: a recording starts with run-start, not {event.type}"
                )
            events.append(event)
        if not events:
            raise RecordingError(f"{name}: empty: no events (expected NDJSON from --record)")
        return cls(events, name)

    @classmethod
    def read(cls, path: Path) -> Recording:
        try:
            with path.open("rb") as file:
                return cls.from_lines(file, str(path))
        except FileNotFoundError:
            raise RecordingError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise RecordingError(f"{path}: is a directory") from None
        except OSError as exc:
            raise RecordingError(f"{path}: {exc.strerror or exc}") from None


def _first_problem(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg', '')}" if where else str(first.get("msg", ""))


def downstream_of(chain: Chain, stage_id: str) -> set[str]:
    """``stage_id`` and every top-level stage that depends on it, directly or not."""
    found = {stage_id}
    changed = True
    while changed:
        changed = False
        for stage, deps in chain.deps.items():
            if stage not in found and any(d in found for d in deps):
                found.add(stage)
                changed = True
    return found


def own_templates(spec: StageSpec) -> list[str]:
    """The templates whose rendered values a stage's fingerprint covers: its prompt, text or
    query (a map: its ``over``; its nested stage is fingerprinted per item); not ``when``."""
    found: list[str] = []
    for template in stage_templates(spec):
        if template.path[0] == "when" or (
            isinstance(spec, MapStage) and template.path[0] != "over"
        ):
            continue
        found.append(template.source)
    return found


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str
    ).encode("utf-8", "surrogatepass")


def _digest(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


class Fingerprints:
    """Fingerprints for one run: a stage's resolved spec is hashed once per run."""

    def __init__(self, chain: Chain, model_of: Callable[[LlmStage], str]) -> None:
        self.model_of = model_of
        """The label of the model an llm stage resolves to."""
        self._specs: dict[int, str] = {}
        self._defaults = chain.spec.defaults.model_dump(mode="json")

    def _spec_digest(self, spec: StageSpec) -> str:
        key = id(spec)
        found = self._specs.get(key)
        if found is None:
            data: dict[str, Any] = {"spec": _strip(spec.model_dump(mode="json", by_alias=True))}
            models: list[str] = []
            todo: list[StageSpec] = [spec]
            while todo:  # the llm stages it is or holds (a map's stage, or its stages)
                inner = todo.pop(0)
                if isinstance(inner, MapStage):
                    todo.extend([inner.stage] if inner.stage is not None else inner.stages or [])
                elif isinstance(inner, LlmStage):
                    models.append(self.model_of(inner))
            if models:
                data["models"] = models
                data["defaults"] = self._defaults
            found = self._specs[key] = _digest(data)
        return found

    def of(self, spec: StageSpec, rendered: list[Any]) -> str:
        """The fingerprint of ``spec`` whose ``own_templates`` rendered to ``rendered``."""
        return _digest({"spec": self._spec_digest(spec), "rendered": rendered})


def _strip(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in _COSMETIC}
    return data


@dataclass
class _Earlier:
    end: StageEnded
    sources: list[SourceFound] = field(default_factory=list)


class Reuse:
    """What a re-run may take from an earlier run (its recording).

    Raises ReuseError when the recording is of another chain or chain version, or ``from_stage``
    is not a top-level stage of ``chain``.
    """

    def __init__(self, recording: Recording, chain: Chain, from_stage: str | None = None) -> None:
        start = recording.start
        recorded = start.chain
        version = chain.spec.version
        if recorded.id != chain.id:
            raise ReuseError(
                f"{recording.name}: a recording of chain {recorded.id!r}, not {chain.id!r}; "
                "reuse needs a recording of the same chain"
            )
        if recorded.version != version:
            raise ReuseError(
                f"{recording.name}: recorded with {chain.id!r} version {recorded.version!r}, "
                f"but the chain is now version {version!r}; outputs of another version are "
                "not reused (run without reuse, or reuse a recording of this version)"
            )
        self.forced: set[str] = set()
        if from_stage is not None:
            ids = [s.id or "" for s in chain.spec.stages]
            if from_stage not in ids:
                raise ReuseError(
                    f"from: no stage {from_stage!r} in {chain.id!r}; stages are: {', '.join(ids)}"
                )
            self.forced = downstream_of(chain, from_stage)
        self.recording = recording
        self.inputs: dict[str, Any] = dict(start.inputs)
        self._earlier: dict[tuple[str | int, ...], _Earlier] = {}
        sources: dict[tuple[str | int, ...], list[SourceFound]] = {}
        for event in recording.events:
            if event.path is None:
                continue
            key = tuple(event.path)
            if isinstance(event, SourceFound):
                sources.setdefault(key, []).append(event)
            elif isinstance(event, StageEnded):
                found = sources.pop(key, [])
                if event.status == "succeeded" and event.fingerprint:
                    self._earlier[key] = _Earlier(event, found)

    def needed(self) -> list[RunEvent]:
        """The recording's events this re-run can use: its run-start, then each reusable
        stage-end after its sources (no tokens). ``Reuse`` of a recording of just these events
        decides exactly as this one does (what a worker of a deployment is handed)."""
        found: list[RunEvent] = [self.recording.start]
        for earlier in self._earlier.values():
            found.extend(earlier.sources)
            found.append(earlier.end)
        return found

    def find(self, path: list[str | int], fingerprint: str) -> _Earlier | None:
        """The earlier stage-end (and its sources) to reuse at ``path``, or None: run it."""
        if path and path[0] in self.forced:
            return None
        found = self._earlier.get(tuple(path))
        if found is None or found.end.fingerprint != fingerprint:
            return None
        return found


@dataclass
class _Open:
    """A unit that had started and not ended when the run was interrupted."""

    ts: int
    """When its (first) ``stage-start`` was made: its duration counts from there."""
    attempt: int
    """The attempt that was running (a ``stage-retry`` moves it on without a new stage-start)."""


class Resume:
    """Where an interrupted run stood, read from its own events, to continue it.

    ``events`` are the run's log from seq 1 on, in order, without gaps; ``lost`` is the error
    each unit that was running gets in its ``stage-retry`` (what interrupted it). Raises
    ResumeError when the events cannot be continued: they do not start at seq 1 with
    ``run-start`` (the log's early events are gone), have a gap, already hold the ``run-end``,
    or a stage had already failed or been cancelled (the run was ending). ``ChainRun`` checks
    the rest against its chain: the chain id, version and plan, and the model.
    """

    def __init__(self, events: list[RunEvent], lost: ErrorInfo) -> None:
        if not events or not isinstance(events[0], RunStarted) or events[0].seq != 1:
            first = f"seq {events[0].seq} ({events[0].type})" if events else "nothing"
            raise ResumeError(
                f"the run's log starts at {first}, not at its run-start (seq 1): its early "
                "events are gone (the per-run cap, or they expired)"
            )
        self.start: RunStarted = events[0]
        self.lost = lost
        self.ended: dict[tuple[str | int, ...], StageEnded] = {}
        """Each unit that had ended (succeeded or skipped), by path: taken, not emitted again."""
        self.open: dict[tuple[str | int, ...], _Open] = {}
        self.progress: dict[tuple[str | int, ...], int] = {}
        """A map's last ``stage-progress`` ``completed``: the counts already emitted."""
        for expected, event in enumerate(events, 1):
            if event.seq != expected:
                raise ResumeError(
                    f"the run's log has a gap: seq {event.seq} where {expected} was expected"
                )
            if event.type == "run-end":
                raise ResumeError("the run had already ended (its log holds its run-end)")
            if event.path is None:
                continue
            key = tuple(event.path)
            if isinstance(event, StageStarted):
                self.open.setdefault(key, _Open(event.ts, event.attempt or 1))
            elif isinstance(event, StageRetried):
                found = self.open.get(key)
                if found is not None:
                    found.attempt = (event.attempt or 1) + 1
            elif isinstance(event, StageProgress):
                self.progress[key] = event.completed
            elif isinstance(event, StageEnded):
                self.open.pop(key, None)
                if event.status not in ("succeeded", "skipped"):
                    where = "/".join(str(p) for p in event.path)
                    raise ResumeError(
                        f"stage {where} had already ended {event.status}: the run was ending"
                    )
                self.ended[key] = event
        self.last_seq = len(events)
