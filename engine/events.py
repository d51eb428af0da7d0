"""The event protocol v1: one typed event per thing that happens in a run.

Every event carries the envelope ``v, type, run_id, seq, ts, stage, path, attempt``; the payload
fields follow docs/protocol.md (§ Events). Every field is always present on the wire (``null`` where
it does not apply), so a frontend never has to test for a missing key.

Events are plain slotted dataclasses: cheap to build on the per-token path. ``RUN_EVENT`` (a
pydantic ``TypeAdapter``) gives the JSON schema and validation for readers; ``event_to_json`` is
the one serializer writers use (CLI NDJSON, SSE ``data:``), with a hand-written fast path for
tokens, which are the bulk of every stream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Annotated, Any, Literal, NewType

from pydantic import ConfigDict, Discriminator, TypeAdapter

__all__ = [
    "PROTOCOL_VERSION",
    "RUN_EVENT",
    "ChainInfo",
    "Citation",
    "ErrorInfo",
    "FinalStatus",
    "InputRequired",
    "PlanStep",
    "RunEnded",
    "RunEvent",
    "RunId",
    "RunStarted",
    "RunStatus",
    "Source",
    "SourceFound",
    "StageEnded",
    "StageId",
    "StageProgress",
    "StageRetried",
    "StageStarted",
    "StageStatus",
    "Token",
    "Usage",
    "event_from_json",
    "event_to_dict",
    "events_json_schema",
    "event_to_json",
]

PROTOCOL_VERSION: Literal[1] = 1

RunId = NewType("RunId", str)
StageId = NewType("StageId", str)

PathItem = str | int

# Field docstrings become schema descriptions; every field is required on the wire.
_CONFIG = ConfigDict(
    use_attribute_docstrings=True, json_schema_serialization_defaults_required=True
)
RunStatus = Literal["pending", "running", "waiting_input", "succeeded", "failed", "cancelled"]
"""A run's status, as the engine and ``GET /v1/runs/{id}`` report it (the one definition)."""
FinalStatus = Literal["succeeded", "failed", "cancelled"]
"""How a run ended (``run-end`` ``status``): the last three of ``RunStatus``."""
StageStatus = Literal["succeeded", "failed", "skipped", "cancelled"]


@dataclass(slots=True, kw_only=True)
class Usage:
    """Token usage of a stage or a run.

    A stage that called no model uses 0 tokens. A run's (and a map's) usage is the sum over its
    stages (items). ``reported`` is false when a model call counted here did not report its
    usage (some OpenAI-compatible servers never do): the counts then hold only what was
    reported (0 when nothing was), so they are not the usage: show "unknown", not 0.
    """

    __pydantic_config__ = _CONFIG

    input_tokens: int = 0
    """Tokens sent to the model (prompt), as reported."""
    output_tokens: int = 0
    """Tokens the model produced, as reported."""
    cost: float | None = None
    """Cost in USD when the model entry has prices and the usage was reported, else null."""
    reported: bool = True
    """False when a model call counted here did not report its usage: the counts are then
    incomplete (0 when nothing was reported) and the cost is null."""

    def add(self, other: Usage) -> None:
        """Add ``other`` to this total; an unreported part makes the total unreported (and its
        cost unknown)."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.reported = self.reported and other.reported
        if not self.reported:
            self.cost = None
        elif other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost


@dataclass(slots=True, kw_only=True)
class ErrorInfo:
    """A structured error: what went wrong, and where."""

    __pydantic_config__ = _CONFIG

    type: str
    """A short machine-readable kind, e.g. ``timeout``, ``model_error``, ``invalid_json``."""
    message: str
    """A human-readable explanation."""
    stage: str | None = None
    """The stage that failed (on run-end), else null."""


@dataclass(slots=True, kw_only=True)
class ChainInfo:
    """Which chain a run executes."""

    __pydantic_config__ = _CONFIG

    id: str
    title: str | None
    version: int | str | None


@dataclass(slots=True, kw_only=True)
class PlanStep:
    """One top-level stage of the plan, sent up front in run-start."""

    __pydantic_config__ = _CONFIG

    stage: str
    label: str
    kind: str
    needs: list[str]
    """The stages this one waits for (references and explicit ``needs``)."""
    weight: float
    """This stage's share of the progress bar, relative to the others."""
    fan_out: bool
    """True for ``map`` stages: their items report stage-progress."""


@dataclass(slots=True, kw_only=True)
class Source:
    """A passage a stage found or produced (a document chunk, a retrieved passage)."""

    __pydantic_config__ = _CONFIG

    id: str
    title: str | None = None
    text: str = ""
    url: str | None = None
    score: float | None = None
    metadata: dict[str, Any] | None = None


@dataclass(slots=True, kw_only=True)
class Citation:
    """A citation marker of an llm stage's answer and the source it points at."""

    __pydantic_config__ = _CONFIG

    marker: int
    """The number in the answer: ``[2]`` is 2 (the second source the prompt was given)."""
    source_id: str | None
    """The cited source's id; null when the marker matches no source it was given."""
    stage: str | None
    """The stage that found the source; null when the marker is unmatched."""


@dataclass(slots=True, kw_only=True)
class _Envelope:
    __pydantic_config__ = _CONFIG

    v: Literal[1] = PROTOCOL_VERSION
    run_id: str
    seq: int
    """1, 2, 3 … per run, no gaps; the SSE ``id:``."""
    ts: int
    """Milliseconds since the epoch."""
    stage: str | None = None
    """The stage id on stage events (for a map item, the map's id), else null."""
    path: list[PathItem] | None = None
    """The path from the top: ``["draft"]``, or ``["section_summaries", 3]`` for a map item."""
    attempt: int | None = None
    """The attempt on stage events, from 1."""


@dataclass(slots=True, kw_only=True)
class RunStarted(_Envelope):
    """The run started; the whole plan comes up front so a UI can draw every step at once."""

    __pydantic_config__ = _CONFIG

    type: Literal["run-start"] = "run-start"
    chain: ChainInfo
    plan: list[PlanStep]
    model: str
    """The model the run uses by default, e.g. ``offline`` or ``openai:gpt-4o-mini``."""
    inputs: dict[str, Any] = field(default_factory=dict)
    """The run's inputs, defaults applied: what a replay or a re-run needs (may be sensitive)."""


@dataclass(slots=True, kw_only=True)
class StageStarted(_Envelope):
    """A stage (or one item of a map) started."""

    __pydantic_config__ = _CONFIG

    type: Literal["stage-start"] = "stage-start"
    label: str
    kind: str
    index: int | None = None
    """For a map item, its index; else null."""
    total: int | None = None
    """For a map item, the number of items; else null."""


@dataclass(slots=True, kw_only=True)
class Token(_Envelope):
    """Streamed text; several tokens when coalescing is on."""

    __pydantic_config__ = _CONFIG

    type: Literal["token"] = "token"
    text: str


@dataclass(slots=True, kw_only=True)
class SourceFound(_Envelope):
    """A source, as soon as it is known, tagged with its stage."""

    __pydantic_config__ = _CONFIG

    type: Literal["source"] = "source"
    source: Source


@dataclass(slots=True, kw_only=True)
class StageProgress(_Envelope):
    """A fan-out stage finished one more item."""

    __pydantic_config__ = _CONFIG

    type: Literal["stage-progress"] = "stage-progress"
    completed: int
    total: int


@dataclass(slots=True, kw_only=True)
class StageRetried(_Envelope):
    """``attempt`` failed and the stage tries again; discard that attempt's tokens."""

    __pydantic_config__ = _CONFIG

    type: Literal["stage-retry"] = "stage-retry"
    error: ErrorInfo


@dataclass(slots=True, kw_only=True)
class InputRequired(_Envelope):
    """The run is paused until a person answers."""

    __pydantic_config__ = _CONFIG

    type: Literal["input-required"] = "input-required"
    prompt: str
    """What to ask (rendered; Markdown)."""
    schema: dict[str, Any] | None = None
    """The JSON Schema the answer must match (``{"type": "string"}`` unless the stage says
    otherwise). Answer with ``POST /v1/runs/{id}/input`` ``{stage, path, value}``."""
    expires_at: int | None = None
    """When the wait ends (ms since the epoch): the stage then takes its default or fails;
    null when it waits until the run's own limit."""


@dataclass(slots=True, kw_only=True)
class StageEnded(_Envelope):
    """A stage (or a map item) ended; always after its last token."""

    __pydantic_config__ = _CONFIG

    type: Literal["stage-end"] = "stage-end"
    status: StageStatus
    output: Any = None
    usage: Usage = field(default_factory=Usage)
    duration_ms: int = 0
    error: ErrorInfo | None = None
    progress: float = 0.0
    """How much of the run is done, 0..1, by weight."""
    citations: list[Citation] | None = None
    """For an llm stage that was given sources: the markers of its answer; else null."""
    reused: bool = False
    """True when the output was taken from an earlier run (``reuse``) instead of executed."""
    fingerprint: str | None = None
    """A content hash of the stage's resolved spec and of the values it read (inputs, earlier
    outputs, the map item); a re-run reuses this output only while it is unchanged. Null on a
    stage that never got that far (skipped)."""


@dataclass(slots=True, kw_only=True)
class RunEnded(_Envelope):
    """The run ended. Exactly one, always last."""

    __pydantic_config__ = _CONFIG

    type: Literal["run-end"] = "run-end"
    status: FinalStatus
    outputs: Any = None
    usage: Usage = field(default_factory=Usage)
    duration_ms: int = 0
    error: ErrorInfo | None = None


RunEvent = Annotated[
    RunStarted
    | StageStarted
    | Token
    | SourceFound
    | StageProgress
    | StageRetried
    | InputRequired
    | StageEnded
    | RunEnded,
    Discriminator("type"),
]
RUN_EVENT: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)
_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls) if f.name not in ("v", "type"))
    for cls in (
        RunStarted,
        StageStarted,
        Token,
        SourceFound,
        StageProgress,
        StageRetried,
        InputRequired,
        StageEnded,
        RunEnded,
    )
}

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_TOKEN_HEAD = '{"v":1,"type":"token","run_id":'


def event_to_dict(event: RunEvent) -> dict[str, Any]:
    """The event as the plain dict that goes on the wire (key order: envelope, then payload).

    Nested dataclasses become dicts; other values are shared, not copied (``dataclasses.asdict``
    would deep-copy a stage's whole output for every event).
    """
    out: dict[str, Any] = {"v": event.v, "type": event.type}
    for name in _FIELDS[type(event)]:
        out[name] = _plain(getattr(event, name))
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list) and value and is_dataclass(value[0]):
        return [_plain(v) for v in value]
    return value


def event_to_json(event: RunEvent) -> str:
    """The event's wire JSON: one line, UTF-8 text, identical in NDJSON and SSE ``data:``."""
    if type(event) is Token:
        # The hot path: a token is most of every stream, so skip the generic walk.
        return (
            f'{_TOKEN_HEAD}{_dumps(event.run_id)},"seq":{event.seq},"ts":{event.ts},'
            f'"stage":{_dumps(event.stage)},"path":{_dumps(event.path)},'
            f'"attempt":{event.attempt},"text":{_dumps(event.text)}}}'
        )
    return _dumps(event_to_dict(event))


def event_from_json(data: str | bytes) -> RunEvent:
    """Parse and validate one event's JSON."""
    return RUN_EVENT.validate_json(data)


_ENVELOPE_DOCS = {
    "v": "Protocol version, 1.",
    "type": "The event type; clients ignore types they do not know.",
    "run_id": "The run.",
    "seq": "1, 2, 3 … per run, no gaps; the SSE id.",
    "ts": "Milliseconds since the epoch.",
    "stage": "The stage id on stage events (for a map item, the map's id), else null.",
    "path": "The path from the top: [stage] or [map stage, item index]; null on run events.",
    "attempt": "The attempt on stage events, from 1; null on run events.",
}


def events_json_schema_text() -> str:
    """``events_json_schema()`` exactly as committed (``stagecast schema --events`` prints it)."""
    return json.dumps(events_json_schema(), indent=2, ensure_ascii=False) + "\n"


def events_json_schema() -> dict[str, Any]:
    """The JSON Schema of the event union (committed as api/schema/run-events.json)."""
    schema = RUN_EVENT.json_schema(mode="serialization")
    for definition in schema["$defs"].values():
        for name, prop in definition.get("properties", {}).items():
            if name in _ENVELOPE_DOCS and "description" not in prop:
                prop["description"] = _ENVELOPE_DOCS[name]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "stagecast/run-events/v1",
        "title": "Stagecast run event (protocol v1)",
        "description": (
            "One event of a run's stream: the envelope (v, type, run_id, seq, ts, stage, path, "
            "attempt) plus the payload of its type. Clients must ignore unknown types."
        ),
        **schema,
    }
