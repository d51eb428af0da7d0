"""The HTTP API v1 routes (docs/protocol.md, § HTTP API); request and response models too."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, Field

from stagecast.api.catalog import ChainCatalog, ChainEntry, plan_of
from stagecast.api.errors import ApiError, ErrorResponse
from stagecast.api.eventlog import (
    CursorError,
    EventLog,
    EventsExpired,
    LogInfo,
    UnknownRun,
)
from stagecast.api.metrics import PROMETHEUS_CONTENT_TYPE, Metrics
from stagecast.api.runs import (
    IdempotencyConflict,
    ManagedRun,
    RunLimitError,
    RunManager,
    RunNotFound,
)
from stagecast.api.settings import ServerSettings
from stagecast.api.sse import EventStreamResponse, StallWatch
from stagecast.engine.asking import AnswerRefused, NotWaiting
from stagecast.engine.errors import InputError, ModelConfigError
from stagecast.engine.events import RunStatus, events_json_schema
from stagecast.engine.inputs import inputs_json_schema
from stagecast.engine.providers import describe_models
from stagecast.engine.replay import parse_speed
from stagecast.engine.reuse import Recording, RecordingError, Reuse, ReuseError

if TYPE_CHECKING:
    from stagecast.api.cluster import Cluster

__all__ = ["AppState", "router"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_COALESCE_MS = 1000.0


class AppState:
    """What the routes share; one per app (``app.state.stagecast``)."""

    def __init__(
        self,
        settings: ServerSettings,
        log: EventLog,
        manager: RunManager,
        catalog: ChainCatalog,
        metrics: Metrics,
    ) -> None:
        self.settings, self.log, self.manager = settings, log, manager
        self.catalog, self.metrics = catalog, metrics
        self.cluster: Cluster | None = None
        """With a Redis event log: the deployment's queue and registry (``api.cluster``)."""
        self._event_schema: dict[str, Any] | None = None
        self.stall_watch = StallWatch(settings.viewer_send_timeout, metrics.count_dropped)

    @property
    def event_schema(self) -> dict[str, Any]:
        if self._event_schema is None:
            self._event_schema = events_json_schema()
        return self._event_schema


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.stagecast
    return state


async def require_api_key(
    request: Request,
    authorization: str | None = Header(None, include_in_schema=False),
    x_api_key: str | None = Header(None, include_in_schema=False),
) -> None:
    """When API keys are configured: a Bearer token, X-API-Key, or ``?api_key=`` must match."""
    keys = state_of(request).settings.api_keys
    if not keys:
        return
    given = x_api_key or request.query_params.get("api_key")
    if authorization and authorization.lower().startswith("bearer "):
        given = authorization[7:].strip()
    if given is None:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: send 'Authorization: Bearer <key>', 'X-API-Key: <key>' "
            "or '?api_key=<key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
        raise ApiError(
            401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"}
        )


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Malformed cursor, or a cursor past the end of the run.",
        401: "Missing or wrong API key (only when keys are configured).",
        404: "Unknown chain or run (finished runs are forgotten after their TTL).",
        409: "The run is not in a state that allows this.",
        410: "The events after the cursor were dropped (per-run event cap).",
        413: "The request body is over the configured limit.",
        422: "Invalid request or inputs; `details.fields` maps each field path to its problem.",
        429: "Too many runs are running; retry after `Retry-After` seconds.",
        500: "The chain file is broken, or an internal error.",
        503: "The shared event log (Redis) is unreachable; retry after `Retry-After` seconds.",
    }
    return {s: {"model": ErrorResponse, "description": text[s]} for s in statuses}


router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


# -- models ---------------------------------------------------------------------------------


class ChainSummary(BaseModel):
    id: str
    title: str | None
    description: str | None
    version: int | str | None
    file: str = Field(description="The YAML file in the chains directory.")
    error: str | None = Field(description="Why the file does not load, else null.")


class ChainList(BaseModel):
    chains: list[ChainSummary]


class PlanStepModel(BaseModel):
    stage: str
    label: str
    kind: str
    needs: list[str]
    weight: float
    fan_out: bool


class ChainDetail(ChainSummary):
    inputs_schema: dict[str, Any] = Field(description="JSON Schema of the run's `inputs`.")
    plan: list[PlanStepModel] = Field(description="The plan a run announces in run-start.")


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chain: str = Field(description="A chain id from GET /v1/chains.", examples=["advanced_summary"])
    inputs: dict[str, Any] = Field(default_factory=dict, description="The chain's inputs.")
    model: str | None = Field(None, description="A model name (configs/models.yaml).")
    on_disconnect: Literal["continue", "cancel"] | None = Field(
        None,
        description="`cancel`: cancel the run when its last viewer disconnects. Default "
        "`continue`, except with `?stream=true` where it is `cancel`.",
    )
    coalesce_ms: float | None = Field(
        None,
        ge=0,
        le=MAX_COALESCE_MS,
        description="Merge a stage's tokens arriving within this many ms into one `token` event "
        "(fewer, larger events for slow clients or many tokens). Default: the server's "
        "`coalesce_ms` setting (0: one event per model chunk).",
    )
    reuse: ReuseRequest | None = Field(
        None,
        description="Re-run: unchanged stages that succeeded in the earlier run (`run_id` or "
        "`recording`) end at once with that output (`reused: true`); `from` and its dependents "
        "run again. Its inputs are the defaults of `inputs`.",
    )


class ReuseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    run_id: str | None = Field(None, description="An earlier run on this server.")
    recording: str | None = Field(
        None, description="A recording in the server's recordings folder (`--recordings DIR`)."
    )
    from_: str | None = Field(
        None,
        alias="from",
        description="Run this top-level stage and everything downstream of it again.",
    )


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recording: str = Field(
        description="A recording's name in the server's recordings folder (GET /v1/recordings)."
    )
    speed: float | Literal["max"] = Field(
        1.0, description="How many times the recorded pace; `max`: no waiting at all."
    )
    on_disconnect: Literal["continue", "cancel"] = Field(
        "continue", description="`cancel`: cancel the replay when its last viewer disconnects."
    )


class RecordingSummary(BaseModel):
    name: str = Field(description="What to send as `recording`.")
    bytes: int
    chain: dict[str, Any] | None = Field(description="The recorded run's chain (run-start).")
    model: str | None


class RecordingList(BaseModel):
    recordings: list[RecordingSummary]


class RunCreated(BaseModel):
    run_id: str
    status: str
    events_url: str = Field(description="GET it for the SSE stream (EventSource-friendly).")
    status_url: str
    cancel_url: str


class CancelAccepted(BaseModel):
    run_id: str
    status: str = Field(description="The run's status now; it ends `cancelled` shortly.")


class InputAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str = Field(description="The `stage` of the input-required event.")
    path: list[str | int] | None = Field(
        None,
        description="The `path` of the input-required event (may be left out when the stage "
        "has one pending input).",
    )
    value: Any = Field(description="The answer; it must match the event's `schema`.")


class AnswerAccepted(BaseModel):
    run_id: str
    status: RunStatus = Field(description="The run's status now (`running` once answered).")


class RunStatusModel(BaseModel):
    run_id: str
    chain: dict[str, Any]
    status: RunStatus
    model: str
    created_at: int = Field(description="Milliseconds since the epoch.")
    finished_at: int | None
    last_seq: int
    on_disconnect: str
    viewers: int = Field(description="Open event streams on this run.")
    stages: dict[str, dict[str, Any]] = Field(
        description="Top-level stage id -> status, attempt, completed/total, output, usage, "
        "duration_ms, error."
    )
    pending_input: list[dict[str, Any]] = Field(
        description="Input stages waiting for an answer: `{stage, path, prompt, schema, "
        "expires_at}` each (empty when nothing waits)."
    )
    outputs: Any
    usage: dict[str, Any]
    error: dict[str, Any] | None
    takeovers: int = Field(
        description="How many times another worker took the run over after its worker was "
        "lost (a deployment on Redis): 0 for a run worked by one worker from start to end.",
    )


# -- helpers --------------------------------------------------------------------------------


def _find_chain(state: AppState, chain_id: str) -> ChainEntry:
    entry = state.catalog.find(chain_id)
    if entry is None:
        known = [e.id for e in state.catalog.entries()]
        raise ApiError(
            404,
            "unknown_chain",
            f"no chain {chain_id!r}; chains are: {', '.join(known) or '(none)'}",
            {"chain": chain_id, "chains": known},
        )
    return entry


def _loaded(entry: ChainEntry) -> Any:
    if entry.chain is None:
        raise ApiError(
            500,
            "chain_invalid",
            f"chain {entry.id!r} does not load: {entry.error}",
            {"file": entry.path.name},
        )
    return entry.chain


def _urls(request: Request, run_id: str) -> dict[str, str]:
    root = request.scope.get("root_path", "")
    base = f"{root}/v1/runs/{run_id}"
    return {"events_url": f"{base}/events", "status_url": base, "cancel_url": f"{base}/cancel"}


def _managed(state: AppState, run_id: str) -> ManagedRun:
    try:
        return state.manager.get(run_id)
    except RunNotFound as exc:
        raise ApiError(404, "unknown_run", str(exc), {"run_id": run_id}) from None


_CURSOR = re.compile(r"^[0-9]{1,18}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _idempotency(raw: str | None, body: RunRequest) -> tuple[str, str] | None:
    """(key, fingerprint of the request body) for an ``Idempotency-Key`` header, else None."""
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.match(raw):
        problem = "expected 1 to 255 printable ASCII characters without spaces (a UUID is good)"
        raise ApiError(
            422,
            "invalid_request",
            f"Idempotency-Key: {raw[:40]!r}: {problem}",
            {"fields": {"Idempotency-Key": problem}},
        )
    canonical = json.dumps(body.model_dump(), sort_keys=True, separators=(",", ":"))
    return raw, hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


def _cursor(raw: str | None, where: str) -> int | None:
    if raw is None or not raw.strip():  # an empty SSE id means "no id"
        return None
    text = raw.strip()
    if not _CURSOR.match(text):
        raise ApiError(
            400,
            "invalid_cursor",
            f"{where}: {raw[:40]!r} is not an event id; expected a whole number >= 0 "
            "(the seq of the last event received)",
            {"where": where},
        )
    return int(text)


async def _stream(
    state: AppState,
    managed: ManagedRun | None,
    after: int,
    headers: dict[str, str],
    run_id: str | None = None,
) -> Response:
    """The event stream of a run after the cursor. ``managed`` is None for a run that another
    process of the deployment executes (a shared event log): it is streamed from the log."""
    run_id = managed.run_id if managed is not None else run_id
    assert run_id is not None
    info = await _checked_cursor(state, run_id, after)
    if info.finished and after == info.last_seq:
        # Nothing more will come. 204 is what makes an EventSource stop reconnecting.
        return Response(status_code=204, headers=headers)
    manager = state.manager
    on_close = None
    cluster = state.cluster
    if cluster is not None:  # viewers are counted in the registry, across the deployment
        await cluster.attach(run_id)
        loop = asyncio.get_running_loop()
        on_close = lambda disconnected: _spawn(  # noqa: E731
            loop, cluster.detach(run_id, disconnected)
        )
    elif managed is not None:
        manager.attach(run_id)
        on_close = lambda disconnected: manager.detach(managed, disconnected)  # noqa: E731
    return EventStreamResponse(
        state.log.follow_frames(run_id, after, heartbeat=state.settings.ping_interval),
        retry_ms=state.settings.retry_ms,
        headers=headers,
        on_sent=state.metrics.count_sent,
        on_close=on_close,
        watch=state.stall_watch,
    )


_BACKGROUND: set[asyncio.Task[None]] = set()


def _spawn(loop: asyncio.AbstractEventLoop, job: Any) -> None:
    """Run ``job`` in the background, kept referenced until it is done."""
    task = loop.create_task(job)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


_SSE_DOC = (
    "Server-Sent Events. Each event is `id: <seq>`, `event: <type>`, `data: <JSON>`; the JSON "
    "is a RunEvent (protocol v1, schema at `GET /v1/schema/events` and under "
    "`#/components/schemas/RunEvent`). The stream starts with `retry:` and a comment, sends "
    "`: ping` when idle, and ends after `run-end`."
)
_SSE_CONTENT = {
    "text/event-stream": {
        "schema": {"type": "string", "description": _SSE_DOC},
        "itemSchema": {"$ref": "#/components/schemas/RunEvent"},
    }
}


# -- models ---------------------------------------------------------------------------------


class ModelInfo(BaseModel):
    name: str = Field(description="The name to pass as `model` in a run request.")
    provider: str = Field(description="auto, offline or openai.")
    model: str | None = Field(None, description="The provider's model name.")
    description: str | None = Field(None, description="What the entry is for.")
    usable: bool = Field(description="False when the entry needs a key the server does not have.")
    why_not: str | None = Field(None, description="What to set to make it usable.")
    default: bool = Field(False, description="True for the server's default model.")


class ModelList(BaseModel):
    models: list[ModelInfo]


@v1.get("/models", response_model=ModelList, summary="List the models", responses=_errors(401))
async def list_models(request: Request) -> dict[str, Any]:
    """The entries of configs/models.yaml, and which are usable. Never a key or a URL secret."""
    rows = describe_models(state_of(request).manager.registry)
    return {"models": [{k: row.get(k) for k in ModelInfo.model_fields} for row in rows]}


# -- chains ---------------------------------------------------------------------------------


@v1.get("/chains", response_model=ChainList, summary="List the chains", responses=_errors(401))
async def list_chains(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"chains": [ChainCatalog.summary(e) for e in state.catalog.entries()]}


@v1.get(
    "/chains/{chain_id}",
    response_model=ChainDetail,
    summary="One chain: its inputs' JSON Schema and its plan",
    responses=_errors(401, 404, 500),
)
async def get_chain(chain_id: str, request: Request) -> dict[str, Any]:
    entry = _find_chain(state_of(request), chain_id)
    chain = _loaded(entry)
    return {
        **ChainCatalog.summary(entry),
        "inputs_schema": inputs_json_schema(chain),
        "plan": [asdict(step) for step in plan_of(chain)],
    }


# -- runs -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _start_errors(model: str | None) -> Iterator[None]:
    """What starting a run (here, queued, or a replay) can refuse, as the client sees it."""
    try:
        yield
    except InputError as exc:
        fields = {f"inputs.{name}": problem for name, problem in exc.errors.items()}
        raise ApiError(
            422, "invalid_inputs", f"the inputs are invalid: {exc}", {"fields": fields}
        ) from None
    except ModelConfigError as exc:
        field = "model" if model is not None else "chain"
        raise ApiError(422, "invalid_model", str(exc), {"fields": {field: str(exc)}}) from None
    except RunLimitError as exc:
        raise ApiError(
            429,
            "too_many_runs",
            str(exc),
            {"limit": exc.limit, "setting": exc.setting},
            headers={"Retry-After": "1"},
        ) from None
    except IdempotencyConflict as exc:
        raise ApiError(
            422,
            "idempotency_key_reused",
            str(exc),
            {"fields": {"Idempotency-Key": str(exc)}, "run_id": exc.run_id},
        ) from None


@v1.post(
    "/runs",
    status_code=201,
    summary="Start a run (or start and stream it with ?stream=true)",
    response_model=RunCreated,
    responses={
        201: {"description": "Started; `Location` is the status URL.", "model": RunCreated},
        # 200 is also a retried create with the same Idempotency-Key (`Idempotent-Replayed`)
        200: {"description": "With `?stream=true`: the event stream.", "content": _SSE_CONTENT},
        **_errors(401, 404, 413, 422, 429, 500),
    },
)
async def create_run(
    body: RunRequest,
    request: Request,
    stream: bool = Query(False, description="Answer with the event stream instead of JSON."),
    idempotency_key: str | None = Header(
        None,
        description="Makes the request safe to retry: the same key with the same body finds "
        "the run the first request started (with `?stream=true`, re-attached after "
        "`Last-Event-ID`) instead of starting another; the same key with another body is a "
        "422 `idempotency_key_reused`. Kept as long as its run.",
    ),
    last_event_id: str | None = Header(
        None, description="With `Idempotency-Key` and `?stream=true`: resume after this seq."
    ),
) -> Response:
    state = state_of(request)
    idempotency = _idempotency(idempotency_key, body)
    if state.cluster is not None:
        return await _create_queued(state, request, body, stream, idempotency, last_event_id)
    if idempotency is not None:
        with _start_errors(body.model):
            known = state.manager.find_idempotent(*idempotency)
        if known is not None:
            return await _replayed(state, request, known, stream, last_event_id)
    chain = _loaded(_find_chain(state, body.chain))
    on_disconnect = body.on_disconnect or ("cancel" if stream else "continue")
    reuse = await _reuse(state, body.reuse, chain) if body.reuse is not None else None
    with _start_errors(body.model):
        managed = state.manager.start(
            chain,
            body.inputs,
            model=body.model,
            on_disconnect=on_disconnect,
            coalesce_ms=body.coalesce_ms,
            idempotency=idempotency,
            reuse=reuse,
        )
    run_id = managed.run_id
    urls = _urls(request, run_id)
    # a shared log: the run is visible to every process before its id is (bounded wait)
    await state.log.flush(timeout=2.0)
    if stream:
        headers = {"Content-Location": urls["events_url"], "X-Stagecast-Run-Id": run_id}
        return await _stream(state, managed, 0, headers)
    return JSONResponse(
        {"run_id": run_id, "status": managed.status, **urls},
        status_code=201,
        headers={"Location": urls["status_url"]},
    )


async def _create_queued(
    state: AppState,
    request: Request,
    body: RunRequest,
    stream: bool,
    idempotency: tuple[str, str] | None,
    last_event_id: str | None,
) -> Response:
    """``POST /v1/runs`` of a deployment on Redis: checked here, queued for any worker."""
    assert state.cluster is not None
    chain = _loaded(_find_chain(state, body.chain))
    on_disconnect = body.on_disconnect or ("cancel" if stream else "continue")
    # checked here, as in one process: an unknown run, another chain or version is refused now
    # (after the Idempotency-Key: a retried create finds its run even if the earlier one is gone)
    reuse = None
    if body.reuse is not None:
        with _start_errors(body.model):
            known = await state.cluster.known(idempotency) if idempotency else None
        if known is None:
            reuse = await _reuse(state, body.reuse, chain)
    with _start_errors(body.model):
        run_id, replayed = await state.cluster.submit(
            chain,
            body.inputs,
            model=body.model,
            on_disconnect=on_disconnect,
            coalesce_ms=body.coalesce_ms,
            idempotency=idempotency,
            reuse=reuse,
            reuse_from=body.reuse.from_ if body.reuse is not None else None,
        )
    urls = _urls(request, run_id)
    extra = {"Idempotent-Replayed": "true"} if replayed else {}
    if stream:
        headers = {"Content-Location": urls["events_url"], "X-Stagecast-Run-Id": run_id, **extra}
        after = _cursor(last_event_id, "Last-Event-ID") or 0 if replayed else 0
        return await _stream(state, None, after, headers, run_id)
    status = (await state.cluster.status(run_id))["status"] if replayed else "pending"
    return JSONResponse(
        {"run_id": run_id, "status": status, **urls},
        status_code=200 if replayed else 201,
        headers={"Location": urls["status_url"], **extra},
    )


# -- recordings, reuse and replays ---------------------------------------------------------------

_RECORDING_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def _recording_path(state: AppState, name: str, where: str) -> Path:
    folder = state.settings.recordings_dir
    if folder is None:
        raise ApiError(
            404,
            "unknown_recording",
            f"{where}: this server serves no recordings (start it with --recordings DIR)",
            {"fields": {where: "no recordings folder"}},
        )
    if not _RECORDING_NAME.match(name) or ".." in name:
        problem = "expected a file name of the recordings folder (letters, digits, . _ -)"
        raise ApiError(
            422,
            "invalid_request",
            f"{where}: {name[:40]!r}: {problem}",
            {"fields": {where: problem}},
        )
    path = folder / (name if name.endswith(".ndjson") else name + ".ndjson")
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.ndjson"))
        raise ApiError(
            404,
            "unknown_recording",
            f"{where}: no recording {name!r}; recordings are: {', '.join(known) or '(none)'}",
            {"fields": {where: "unknown recording"}, "recordings": known},
        )
    return path


async def _load_recording(state: AppState, name: str, where: str) -> Recording:
    path = _recording_path(state, name, where)
    try:
        recording = await asyncio.to_thread(Recording.read, path)
    except RecordingError as exc:
        message = str(exc).replace(str(path.parent) + "/", "")  # no server paths in answers
        raise ApiError(422, "invalid_recording", message, {"fields": {where: message}}) from None
    recording.name = path.name  # what messages about it say: no server paths in answers
    return recording


async def _run_recording(state: AppState, run_id: str) -> Recording:
    """An earlier run of this server (of any process of a deployment: the shared log), as a
    recording (the events its log still holds)."""
    try:
        part = await state.log.read(run_id, 0)
    except UnknownRun as exc:
        raise ApiError(
            404, "unknown_run", f"reuse.run_id: {exc}", {"fields": {"reuse.run_id": str(exc)}}
        ) from None
    except EventsExpired as exc:
        raise ApiError(
            422,
            "invalid_recording",
            f"reuse.run_id: {exc}",
            {"fields": {"reuse.run_id": str(exc)}},
        ) from None
    try:
        return Recording.from_lines([entry.data for entry in part.entries], run_id)
    except RecordingError as exc:
        raise ApiError(
            422, "invalid_recording", str(exc), {"fields": {"reuse.run_id": str(exc)}}
        ) from None


async def _reuse(state: AppState, body: ReuseRequest, chain: Any) -> Reuse:
    if (body.run_id is None) == (body.recording is None):
        problem = "give exactly one of run_id and recording"
        raise ApiError(422, "invalid_request", f"reuse: {problem}", {"fields": {"reuse": problem}})
    if body.run_id is not None:
        recording = await _run_recording(state, body.run_id)
    else:
        assert body.recording is not None
        recording = await _load_recording(state, body.recording, "reuse.recording")
    try:
        return Reuse(recording, chain, body.from_)
    except ReuseError as exc:
        field = "reuse.from" if str(exc).startswith("from:") else "reuse"
        raise ApiError(422, "invalid_reuse", str(exc), {"fields": {field: str(exc)}}) from None


@v1.get(
    "/recordings",
    response_model=RecordingList,
    summary="The recordings this server can replay (`--recordings DIR`)",
    responses=_errors(401),
)
async def list_recordings(request: Request) -> dict[str, Any]:
    folder = state_of(request).settings.recordings_dir
    if folder is None:
        return {"recordings": []}
    return {"recordings": await asyncio.to_thread(_recording_summaries, folder)}


def _recording_summaries(folder: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob("*.ndjson")):
        chain: dict[str, Any] | None = None
        model: str | None = None
        try:
            with path.open("rb") as file:
                first = json.loads(file.readline(1_000_000) or b"null")
            if isinstance(first, dict) and first.get("type") == "run-start":
                chain, model = first.get("chain"), first.get("model")
        except (OSError, ValueError):
            pass
        found.append(
            {"name": path.stem, "bytes": path.stat().st_size, "chain": chain, "model": model}
        )
    return found


@v1.post(
    "/replays",
    status_code=201,
    response_model=RunCreated,
    summary="Serve a recording as a new live run (same routes, resume and cancel)",
    responses={
        201: {"description": "Started; `Location` is the status URL.", "model": RunCreated},
        **_errors(401, 404, 422, 429),
    },
)
async def create_replay(body: ReplayRequest, request: Request) -> Response:
    state = state_of(request)
    recording = await _load_recording(state, body.recording, "recording")
    try:
        speed = parse_speed(body.speed)
    except ValueError as exc:
        raise ApiError(
            422, "invalid_request", f"speed: {exc}", {"fields": {"speed": str(exc)}}
        ) from None
    if state.cluster is not None:  # queued: any worker plays it, any process serves it
        with _start_errors(None):
            run_id = await state.cluster.submit_replay(
                recording, speed=speed, on_disconnect=body.on_disconnect
            )
        status = "pending"
    else:
        with _start_errors(None):
            managed = state.manager.start_replay(
                recording, speed=speed, on_disconnect=body.on_disconnect
            )
        run_id, status = managed.run_id, managed.status
    urls = _urls(request, run_id)
    return JSONResponse(
        {"run_id": run_id, "status": status, **urls},
        status_code=201,
        headers={"Location": urls["status_url"]},
    )


async def _checked_cursor(state: AppState, run_id: str, after: int) -> LogInfo:
    """Where the run's log stands, once ``after`` is known to be a cursor it can resume from:
    404, 400 or 410 otherwise (503 when the log is away: the app's EventLogUnavailable handler)."""
    try:
        return await state.log.acheck_cursor(run_id, after)
    except UnknownRun as exc:
        raise ApiError(404, "unknown_run", str(exc), {"run_id": run_id}) from None
    except CursorError as exc:
        raise ApiError(
            400, "cursor_past_end", str(exc), {"after": exc.after, "last_seq": exc.last_seq}
        ) from None
    except EventsExpired as exc:
        raise ApiError(
            410, "events_expired", str(exc), {"after": exc.after, "first_seq": exc.first_seq}
        ) from None


async def _ndjson(state: AppState, run_id: str, after: int) -> Response:
    """The run's events as NDJSON (a recording): what the log holds, then live to the end."""
    await _checked_cursor(state, run_id, after)

    async def lines() -> AsyncIterator[bytes]:
        async for batch in state.log.follow(run_id, after):
            yield "".join(entry.data + "\n" for entry in batch).encode("utf-8", "backslashreplace")

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={
            "Content-Disposition": f'attachment; filename="{run_id}.ndjson"',
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )


async def _replayed(
    state: AppState, request: Request, managed: ManagedRun, stream: bool, last_event_id: str | None
) -> Response:
    """The answer to a retried create: the same run, streamed after the cursor or as JSON."""
    run_id = managed.run_id
    urls = _urls(request, run_id)
    if stream:
        headers = {
            "Content-Location": urls["events_url"],
            "X-Stagecast-Run-Id": run_id,
            "Idempotent-Replayed": "true",
        }
        return await _stream(state, managed, _cursor(last_event_id, "Last-Event-ID") or 0, headers)
    return JSONResponse(
        {"run_id": run_id, "status": managed.status, **urls},
        status_code=200,
        headers={"Location": urls["status_url"], "Idempotent-Replayed": "true"},
    )


@v1.get(
    "/runs/{run_id}/events",
    summary="Follow a run's events (SSE): replay after the cursor, then live",
    response_class=EventStreamResponse,
    status_code=200,
    responses={
        200: {"description": "The event stream.", "content": _SSE_CONTENT},
        204: {"description": "The run is finished and the cursor is at its last event."},
        **_errors(400, 401, 404, 410, 503),
    },
    description="Resume with the `Last-Event-ID` header (EventSource sends it by itself) or "
    "`?after=N`; the header wins when both are given. " + _SSE_DOC,
)
async def run_events(
    run_id: str,
    request: Request,
    after: str | None = Query(
        None, description="Replay the events after this seq (0 = everything)."
    ),
    last_event_id: str | None = Header(None, description="Set by EventSource on reconnect."),
    format: Literal["sse", "ndjson"] = Query(
        "sse",
        description="`ndjson`: the events as NDJSON, one wire-JSON event a line (a recording, "
        "for download; a live run streams to its end).",
    ),
) -> Response:
    state = state_of(request)
    try:
        if state.cluster is not None:
            raise RunNotFound(run_id)  # a deployment: every stream comes from the shared log
        managed: ManagedRun | None = state.manager.get(run_id)
    except RunNotFound:
        managed = None  # another process's run, if the shared log has it (else 404 below)
    if managed is None:
        try:
            await state.log.ainfo(run_id)  # an unknown run is a 404 whatever the cursor
        except UnknownRun:
            raise ApiError(
                404, "unknown_run", str(RunNotFound(run_id)), {"run_id": run_id}
            ) from None
    cursor = _cursor(last_event_id, "Last-Event-ID")
    if cursor is None:
        cursor = _cursor(after, "after")
    if format == "ndjson":
        return await _ndjson(state, run_id, cursor or 0)
    return await _stream(state, managed, cursor or 0, {}, run_id)


@v1.get(
    "/runs/{run_id}",
    response_model=RunStatusModel,
    summary="A run's status, stages, outputs and usage",
    responses=_errors(401, 404),
)
async def run_status(run_id: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if state.cluster is not None:
        try:
            return await state.cluster.status(run_id)
        except RunNotFound as exc:
            raise ApiError(404, "unknown_run", str(exc), {"run_id": run_id}) from None
    _managed(state, run_id)
    return state.manager.status(run_id)


@v1.post(
    "/runs/{run_id}/cancel",
    status_code=202,
    response_model=CancelAccepted,
    summary="Cancel a run (idempotent); it ends `cancelled` and model calls stop",
    responses=_errors(401, 404),
)
async def cancel_run(run_id: str, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if state.cluster is not None:
        try:
            return {"run_id": run_id, "status": await state.cluster.cancel(run_id)}
        except RunNotFound as exc:
            raise ApiError(404, "unknown_run", str(exc), {"run_id": run_id}) from None
    _managed(state, run_id)
    managed = state.manager.cancel(run_id)
    return {"run_id": run_id, "status": managed.status}


@v1.post(
    "/runs/{run_id}/input",
    status_code=202,
    response_model=AnswerAccepted,
    summary="Answer a run's pending input-required event",
    description="202 once the answer is taken (the input stage ends with it as its output). "
    "422 `invalid_answer` when it does not match the event's schema: `details.fields` maps "
    "`value`, `value.<property>` … to the problem; the run keeps waiting and emits nothing. "
    "409 `not_waiting_input` when that stage/path is not waiting (answered already, or never "
    "asked): `details.waiting` lists what is.",
    responses=_errors(401, 404, 409, 422, 503),
)
async def answer_input(run_id: str, body: InputAnswer, request: Request) -> dict[str, Any]:
    state = state_of(request)
    if state.cluster is not None:  # the owning worker checks and takes it, wherever it is
        try:
            status = await state.cluster.answer(run_id, body.stage, body.path, body.value)
        except RunNotFound as exc:
            raise ApiError(404, "unknown_run", str(exc), {"run_id": run_id}) from None
        return {"run_id": run_id, "status": status}
    managed = _managed(state, run_id)
    try:
        state.manager.answer(run_id, body.stage, body.path, body.value)
    except NotWaiting as exc:
        raise ApiError(
            409,
            "not_waiting_input",
            f"run {run_id!r}: {exc} (status: {managed.status})",
            {"status": managed.status, "waiting": exc.waiting},
        ) from None
    except AnswerRefused as exc:
        raise ApiError(
            422, "invalid_answer", str(exc), {"fields": exc.problems, "path": exc.path}
        ) from None
    return {"run_id": run_id, "status": managed.status}


@v1.get("/schema/events", summary="JSON Schema of the event union (protocol v1)")
async def event_schema(request: Request) -> dict[str, Any]:
    return state_of(request).event_schema


# -- service --------------------------------------------------------------------------------


@router.get("/healthz", summary="Liveness")
async def healthz(request: Request) -> dict[str, Any]:
    state = state_of(request)
    return {"status": "ok", "runs_active": state.manager.active}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(require_api_key)],
    responses={200: {"content": {PROMETHEUS_CONTENT_TYPE: {}}}, **_errors(401)},
)
async def metrics(request: Request) -> Response:
    state = state_of(request)
    return PlainTextResponse(state.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)


_PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>Stagecast</title>
<p>Stagecast API. The demo page is not installed; see <a href="docs">/docs</a> and
<a href="static/stagecast.js">/static/stagecast.js</a>.</p>
"""


@router.get(
    "/",
    summary="The demo page (`/?run=<id>` opens it on that run)",
    response_class=HTMLResponse,
)
async def index(run: str | None = Query(None, description="A run id to show.")) -> Response:
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})
    return HTMLResponse(_PLACEHOLDER)


router.include_router(v1)
