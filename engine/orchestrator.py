"""Runs a chain's DAG and emits protocol v1 events.

``ChainRun`` executes one run and hands every event to a ``sink`` callable, synchronously, in
``seq`` order: the CLI prints them, the HTTP API appends them to its event log, ``run_chain``
turns them into an async iterator. Sequence numbers are assigned here and nowhere else.

The per-token path is hot (see FIELD-NOTES.md): a token costs one dataclass and one sink call —
no task, no queue hand-off, no thread hop, no pydantic validation. Each stage iterates its model's
``astream()`` itself and tags the chunks, instead of running LangChain's callback-based event
streaming over the whole chain.

Cancellation is real: ``cancel()`` cancels the task that runs the scheduler, which cancels the
stage tasks, whose ``astream()`` generators are closed (for an HTTP model, the connection to the
provider closes). Every stage that started ends (``cancelled``), then one ``run-end``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import jsonschema
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from stagecast.engine.asking import (
    AnswerRefused,
    NotWaiting,
    PendingInput,
    answer_problems,
    compile_validator,
)
from stagecast.engine.chain import Chain, PromptRole, prompt_parts
from stagecast.engine.citations import GivenSource, find_citations
from stagecast.engine.collections import CollectionError, CollectionsConfig, load_collections_config
from stagecast.engine.errors import StageError, TemplateError, TransientError
from stagecast.engine.events import (
    ChainInfo,
    Citation,
    ErrorInfo,
    FinalStatus,
    InputRequired,
    PlanStep,
    RunEnded,
    RunEvent,
    RunStarted,
    RunStatus,
    Source,
    SourceFound,
    StageEnded,
    StageProgress,
    StageRetried,
    StageStarted,
    StageStatus,
    Token,
    Usage,
)
from stagecast.engine.faults import classify_error, excerpt
from stagecast.engine.inputs import validate_inputs
from stagecast.engine.offline import OfflineChatModel
from stagecast.engine.openai_model import prepare_json_model
from stagecast.engine.openai_stream import fast_stream
from stagecast.engine.providers import ModelRegistry, ResolvedModel
from stagecast.engine.retrieval import Retriever, resolve_retriever
from stagecast.engine.reuse import Fingerprints, Resume, ResumeError, Reuse, own_templates
from stagecast.engine.spec import (
    InputStage,
    LlmStage,
    MapStage,
    RetrieveStage,
    SplitStage,
    StageSpec,
    TemplateStage,
)
from stagecast.engine.splitting import split_text
from stagecast.engine.templates import (
    DEFAULT_LIMITS,
    RenderLimits,
    compile_template,
    render_async,
)

__all__ = ["ChainRun", "StageState", "new_run_id", "plan_of", "run_chain"]

_MESSAGE_KINDS: dict[PromptRole, type[BaseMessage]] = {
    "system": SystemMessage,
    "user": HumanMessage,
    "assistant": AIMessage,
}
Sink = Callable[[RunEvent], None]
Path = list[str | int]


def plan_of(chain: Chain) -> list[PlanStep]:
    """The plan a run of ``chain`` announces in its run-start event: every top-level stage."""
    return [
        PlanStep(
            stage=s.id or "",
            label=s.label or s.id or "",
            kind=s.kind,
            needs=list(chain.deps.get(s.id or "", [])),
            weight=s.weight,
            fan_out=isinstance(s, MapStage),
        )
        for s in chain.spec.stages
    ]


def new_run_id() -> str:
    return "run_" + uuid.uuid4().hex[:20]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _monotonic_at(ts: int) -> float:
    """The ``time.monotonic()`` of the wall-clock ``ts`` (ms since the epoch; not later than
    now): durations of a continued run count from its own events' times."""
    return time.monotonic() - max(0, _now_ms() - ts) / 1000


@dataclass
class StageState:
    """What a status endpoint shows of one top-level stage."""

    status: str = "waiting"
    attempt: int = 0
    completed: int | None = None
    total: int | None = None
    output: Any = None
    usage: Usage = field(default_factory=Usage)
    duration_ms: int | None = None
    error: ErrorInfo | None = None


class _StageFailed(Exception):
    """A stage ended ``failed`` (its stage-end is already emitted)."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Unit:
    """One thing that emits stage-start/stage-end: a top-level stage or one map item."""

    spec: StageSpec
    stage_id: str
    path: Path
    context: dict[str, Any]
    share: float
    index: int | None = None
    total: int | None = None
    usage: Usage = field(default_factory=Usage)
    status: str | None = None
    parent: MapStage | None = None
    """For a map item, the map: its ``retries`` and ``timeout`` apply to each item."""
    fingerprint: str | None = None
    reused: bool = False
    rendered: list[Any] | None = None
    """Its own templates (``engine.reuse.own_templates``), rendered once for the fingerprint and
    used again by the stage itself: a render is never paid twice."""
    turn: list[asyncio.Event] | None = None
    """For a map item, the map's "item i ended" events: an input stage of item i asks only once
    items 0 … i-1 have ended (an interview asks one question at a time, in order)."""
    children: list[_Unit] = field(default_factory=list)
    """For an item of a map with a ``stages`` sequence: the units of its stages."""
    first_attempt: int = 1
    """Its first attempt here: after the attempt an interrupted run lost (``resume``)."""


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?```\s*$", re.DOTALL)


def parse_json_output(
    text: str, schema: dict[str, Any] | None, unwrap: Callable[[Any], Any] | None = None
) -> Any:
    """Parse a model's JSON answer (code fences tolerated) and validate it against ``schema``."""
    match = _FENCE.match(text)
    body = match.group(1) if match else text
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise TransientError(
            f"the answer is not valid JSON: {exc}; {_json_break(body, exc.pos)}",
            type="invalid_json",
        ) from None
    if unwrap is not None:
        value = unwrap(value)
    if schema is not None:
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(value)
        )
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            raise TransientError(
                f"the JSON answer does not match the schema at {where}: {excerpt(error.message)}",
                type="invalid_json",
            )
    return value


_START_CHARS, _AROUND_CHARS = 120, 60


def _json_break(text: str, pos: int) -> str:
    """Where a JSON answer broke, quoted: its start, and the text around the break."""
    if not text.strip():
        return "the answer is empty"
    size = f"the answer ({len(text):,} chars)"
    if len(text) <= _START_CHARS:
        return f"{size}: {text!r}"
    start = f"{size} starts {text[:_START_CHARS]!r}…"
    if pos < _START_CHARS - 20:
        return start
    before = text[max(0, pos - _AROUND_CHARS) : pos]
    after = text[pos : pos + _AROUND_CHARS // 2]
    more = "…" if pos + _AROUND_CHARS // 2 < len(text) else ""
    return f"{start}; it breaks at char {pos:,}: …{before!r} ⟵ here {after!r}{more}"


class ChainRun:
    """One run of a chain. Build it (inputs are checked now), then ``await execute()``.

    Args:
        chain: the loaded chain.
        inputs: input values; defaults are applied and types checked (``InputError``).
        models: a ``ModelRegistry``, or a mapping of model name -> LangChain chat model.
        model: run-wide model name (overrides the chain's and stages' models), or a chat model.
        sink: called with every event, in order. Must not block.
        max_concurrency: most leaf stages (llm, template, split) running at once.
        coalesce_ms: when > 0, tokens of one stage arriving within this many ms become one event.
        retry_backoff: base seconds of the exponential backoff between attempts.
        on_prompt: called with (stage id, path, messages) each time an llm stage's prompt is
            rendered, before the model call (``stagecast dry-run`` prints them).
        render_limits: how big and how long one template render may get (``RenderLimits``).
        max_map_items: most items one map stage runs; more fail the stage (``map_limit``).
        retrievers: collection name -> a LangChain ``BaseRetriever`` or ``VectorStore`` (or a
            Stagecast retriever); wins over configs/collections.yaml for that name.
        collections: the collections config (default: configs/collections.yaml).
        index_cache_dir: where BM25 indexes are cached (default: beside each collection).
        reuse: an earlier run's outputs to reuse (``engine.reuse.Reuse``): unchanged stages that
            succeeded there end at once with that output and ``reused: true``; the recorded
            inputs are the defaults of ``inputs``.
        max_input_wait: most seconds an input stage waits for its answer, whatever its own
            ``timeout`` (None: no limit); past it the stage, and so the run, fails.
        on_input: called with each ``PendingInput`` right after its input-required event
            (the CLI asks on the terminal or answers from a file).
        resume: continue an interrupted run from its own log (``engine.reuse.Resume``; pass its
            ``run_id``): no run-start, seq after the log's last; units that had ended are taken
            as they ended and not emitted again; units that were running get a ``stage-retry``
            (``resume.lost``) and a new ``stage-start`` with the next attempt (one that does not
            start again, as the run or its map ended first, ends ``cancelled``). Raises
            ResumeError when the chain's id, version or plan, or the model, differ from the
            log's run-start.
    """

    def __init__(
        self,
        chain: Chain,
        inputs: Mapping[str, Any] | None = None,
        *,
        models: ModelRegistry | Mapping[str, BaseChatModel] | None = None,
        model: str | BaseChatModel | None = None,
        run_id: str | None = None,
        sink: Sink | None = None,
        max_concurrency: int | None = None,
        coalesce_ms: float = 0.0,
        retry_backoff: float = 0.5,
        on_prompt: Callable[[str, Path, list[BaseMessage]], None] | None = None,
        render_limits: RenderLimits | None = None,
        max_map_items: int = 10_000,
        retrievers: Mapping[str, Any] | None = None,
        collections: CollectionsConfig | None = None,
        index_cache_dir: FilePath | None = None,
        reuse: Reuse | None = None,
        max_input_wait: float | None = None,
        on_input: Callable[[PendingInput], None] | None = None,
        resume: Resume | None = None,
    ) -> None:
        self.chain = chain
        if reuse is not None:
            recorded = {k: v for k, v in reuse.inputs.items() if k in chain.spec.inputs}
            inputs = {**recorded, **(inputs or {})}
        self.inputs = validate_inputs(chain, inputs)
        self.reuse = reuse
        if isinstance(models, ModelRegistry):
            self.registry = models
        else:
            self.registry = ModelRegistry(overrides=models)
        if isinstance(model, BaseChatModel):  # a registry of its own: never touch a shared one
            self.registry = ModelRegistry(
                self.registry.config,
                overrides={**self.registry.overrides, "__run__": model},
                environ=self.registry.environ,
            )
            model = "__run__"
        self.model_override = model
        self.run_id = run_id or new_run_id()
        self.sink: Sink = sink or (lambda event: None)
        self.retry_backoff = retry_backoff
        self.on_prompt = on_prompt
        self.render_limits = render_limits or DEFAULT_LIMITS
        self.max_map_items = max_map_items
        self.coalesce_s = coalesce_ms / 1000
        self.status: RunStatus = "pending"
        self.outputs: Any = None
        self._usage: Usage | None = None
        self.error: ErrorInfo | None = None
        self.stages = {s.id or "": StageState() for s in chain.spec.stages}
        self.default_model = self._resolve(None)
        for stage in self._all_llm_stages():
            self._resolve(stage)  # unknown models and missing keys fail before the run starts
        self._limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._seq = 0
        self._done_weight = 0.0
        self._total_weight = sum(s.weight for s in chain.spec.stages) or 1.0
        self._results: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task[Any] | None = None
        self._cancel_requested = False
        self._pending_tokens: dict[int, list[Any]] = {}
        self._flush_handle: asyncio.TimerHandle | None = None
        self.emit_token: Callable[[str, Path, int, str], None] = (
            self._emit_token_coalesced if self.coalesce_s > 0 else self._emit_token_direct
        )
        self._retriever_objects = dict(retrievers or {})
        self._collections = collections
        self._index_cache_dir = index_cache_dir
        self._retrievers: dict[str, Retriever] = {}
        self._fingerprints = Fingerprints(chain, lambda spec: self._resolve(spec).label)
        self.max_input_wait = max_input_wait
        self.on_input = on_input
        self._pending: dict[tuple[str | int, ...], PendingInput] = {}
        self.resume = resume
        self._went_on: set[tuple[str | int, ...]] = set()
        """The units running when the run was interrupted that started again here."""
        if resume is not None:
            self._check_resume(resume)
            self._seq = resume.last_seq  # where the status stands before it goes on
            maps = {s.id for s in chain.spec.stages if isinstance(s, MapStage)}
            for key, end in resume.ended.items():
                state = self.stages.get(str(key[0])) if len(key) == 1 else None
                if state is not None:
                    _ended_state(state, end, key[0] in maps)
            for key, lost in resume.open.items():
                state = self.stages.get(str(key[0])) if len(key) == 1 else None
                if state is not None:
                    state.status, state.attempt = "running", lost.attempt

    def _check_resume(self, resume: Resume) -> None:
        start, spec = resume.start, self.chain.spec
        if (start.chain.id, start.chain.version) != (self.chain.id, spec.version):
            raise ResumeError(
                f"the run is of chain {start.chain.id!r} version {start.chain.version!r}; "
                f"here {self.chain.id!r} is version {spec.version!r}"
            )
        if start.plan != plan_of(self.chain):
            raise ResumeError(
                f"the stages of {self.chain.id!r} here differ from the run's plan (the chain "
                "was edited without a new version)"
            )
        if start.model != self.default_model.label:
            raise ResumeError(
                f"the run's model is {start.model!r}; here it resolves to "
                f"{self.default_model.label!r}"
            )

    # -- public ---------------------------------------------------------------------------

    @property
    def usage(self) -> Usage:
        """Token usage so far (the run's total once it ended)."""
        if self._usage is not None:
            return self._usage
        total = Usage()
        for state in self.stages.values():
            total.add(state.usage)
        return total

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def pending_inputs(self) -> list[PendingInput]:
        """The input stages waiting for an answer now, in the order they asked."""
        return list(self._pending.values())

    def answer(self, stage: str, path: Path | None, value: Any) -> None:
        """Answer a pending input. ``path`` may be None when ``stage`` has one pending input.

        Raises ``NotWaiting`` (that stage/path is not waiting; names what is) or
        ``AnswerRefused`` (the value does not match the schema; the run keeps waiting and
        emits nothing). The first valid answer wins; the stage ends with it as its output.
        """
        if path is None:
            matching = [p for p in self._pending.values() if p.stage == stage]
            if len(matching) != 1:
                raise NotWaiting(stage, None, self.pending_inputs)
            pending = matching[0]
        else:
            found = self._pending.get(tuple(path))
            if found is None or found.stage != stage:
                raise NotWaiting(stage, list(path), self.pending_inputs)
            pending = found
        problems = answer_problems(pending.validator, value)
        if problems:
            raise AnswerRefused(pending.stage, pending.path, problems)
        del self._pending[tuple(pending.path)]
        self._waiting_changed()
        if not pending.future.done():
            pending.future.set_result(value)

    def fail_input(self, stage: str, path: Path, message: str) -> None:
        """End a pending input ``failed`` with ``message`` (type ``no_answer``): for a caller
        that cannot answer (a script with no answer for it). Raises ``NotWaiting``."""
        pending = self._pending.get(tuple(path))
        if pending is None or pending.stage != stage:
            raise NotWaiting(stage, list(path), self.pending_inputs)
        del self._pending[tuple(path)]
        self._waiting_changed()
        if not pending.future.done():
            pending.future.set_exception(StageError(message, type="no_answer"))

    def _waiting_changed(self) -> None:
        if self.status in ("running", "waiting_input"):
            self.status = "waiting_input" if self._pending else "running"

    def cancel(self) -> None:
        """Stop the run: model calls stop, running stages end ``cancelled``, then run-end."""
        if self.status in ("succeeded", "failed", "cancelled") or self._cancel_requested:
            return  # idempotent: a second cancel must not interrupt the first one's cleanup
        self._cancel_requested = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def execute(self) -> RunEnded:
        """Run to the end and return the run-end event. Never raises for a failed stage."""
        if self._task is not None:
            raise RuntimeError("a ChainRun executes once")
        self._task = asyncio.current_task()
        started = time.monotonic()
        self.status = "running"
        spec = self.chain.spec
        if self.resume is not None:  # the run goes on: its run-start is in the log already
            self._seq = self.resume.last_seq
            started = _monotonic_at(self.resume.start.ts)
        else:
            self._emit(
                RunStarted,
                chain=ChainInfo(id=self.chain.id, title=self.chain.title, version=spec.version),
                plan=plan_of(self.chain),
                model=self.default_model.label,
                inputs=self.inputs,
            )
        error: ErrorInfo | None = None
        outputs: Any = None
        try:
            # one turn of the loop, so that viewers send run-start before a stage's first burst
            await asyncio.sleep(0)
            if self._cancel_requested:
                raise asyncio.CancelledError
            error = await self._schedule()
            if error is None:
                outputs = await self._render_outputs()
            status: FinalStatus = "succeeded" if error is None else "failed"
        except asyncio.CancelledError:
            status = "cancelled"
            task = asyncio.current_task()
            if self._cancel_requested and task is not None:
                task.uncancel()
            else:
                self._finish(status, None, None, started)
                raise
        except _StageFailed as exc:  # an output template failed
            status, error = "failed", exc.error
        except Exception as exc:  # a bug of ours: still end the stream properly
            status = "failed"
            error = ErrorInfo(type="internal_error", message=f"{type(exc).__name__}: {exc}")
        return self._finish(status, outputs, error, started)

    # -- events ---------------------------------------------------------------------------

    def _emit(self, cls: type[Any], **fields: Any) -> Any:
        if self._pending_tokens:
            self._flush_tokens()
        seq = self._seq + 1
        event = cls(run_id=self.run_id, seq=seq, ts=_now_ms(), **fields)
        self.sink(event)
        self._seq = seq  # only once delivered: a failing sink never leaves a gap
        return event

    def _emit_token_direct(self, stage: str, path: Path, attempt: int, text: str) -> None:
        seq = self._seq + 1
        self.sink(
            Token(
                run_id=self.run_id,
                seq=seq,
                ts=_now_ms(),
                stage=stage,
                path=path,
                attempt=attempt,
                text=text,
            )
        )
        self._seq = seq

    def _emit_token_coalesced(self, stage: str, path: Path, attempt: int, text: str) -> None:
        key = id(path)
        pending = self._pending_tokens.get(key)
        if pending is not None and pending[2] == attempt:
            pending[3].append(text)
            return
        if pending is not None:
            self._flush_tokens()
        self._pending_tokens[key] = [stage, path, attempt, [text]]
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.coalesce_s, self._flush_tokens)

    def _flush_tokens(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending_tokens = self._pending_tokens, {}
        for stage, path, attempt, parts in pending.values():
            self._emit_token_direct(stage, path, attempt, "".join(parts))

    def _progress(self) -> float:
        return min(1.0, round(self._done_weight / self._total_weight, 6))

    def _finish(
        self,
        status: FinalStatus,
        outputs: Any,
        error: ErrorInfo | None,
        started: float,
    ) -> RunEnded:
        self.status = status
        self.outputs = outputs
        self.error = error
        self._end_lost(())  # what was running when the run was interrupted and never went on
        self._usage = self.usage
        event: RunEnded = self._emit(
            RunEnded,
            status=status,
            outputs=outputs,
            usage=self.usage,
            duration_ms=int((time.monotonic() - started) * 1000),
            error=error,
        )
        return event

    # -- scheduling -----------------------------------------------------------------------

    async def _schedule(self) -> ErrorInfo | None:
        """Start each top-level stage once its dependencies ended; stop at the first failure."""
        waiting = {s.id or "": s for s in self.chain.spec.stages}
        finished: set[str] = set()
        running: dict[asyncio.Task[Any], str] = {}
        try:
            while waiting or running:
                for stage_id, stage in list(waiting.items()):
                    if all(d in finished for d in self.chain.deps.get(stage_id, [])):
                        del waiting[stage_id]
                        unit = _Unit(stage, stage_id, [stage_id], self._context(), stage.weight)
                        running[asyncio.create_task(self._run_unit(unit))] = stage_id
                if not running:  # only reachable with a cycle, which validation rejects
                    raise RuntimeError(f"stages can never start: {', '.join(waiting)}")
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    stage_id = running.pop(task)
                    exc = task.exception()
                    if isinstance(exc, _StageFailed):
                        await self._cancel_tasks(running)
                        return ErrorInfo(
                            type=exc.error.type, message=exc.error.message, stage=stage_id
                        )
                    if exc is not None:
                        raise exc
                    self._results[stage_id] = {"output": task.result()}
                    finished.add(stage_id)
        except BaseException:
            await self._cancel_tasks(running)
            raise
        return None

    @staticmethod
    async def _cancel_tasks(tasks: Mapping[asyncio.Task[Any], Any]) -> None:
        """Cancel ``tasks`` and wait until every one has ended (and emitted its stage-end)."""
        for task in tasks:
            task.cancel()
        interrupted = False
        while tasks and not all(task.done() for task in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:  # run-end must still come after every stage-end
                interrupted = True
        if interrupted:
            raise asyncio.CancelledError

    async def _render_outputs(self) -> Any:
        spec = self.chain.spec
        context = self._context()
        if spec.outputs is None:
            last = spec.stages[-1].id or ""
            return {"output": self._results.get(last, {}).get("output")}
        return await self._render_value(spec.outputs, context, "outputs")

    def _context(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "stages": dict(self._results)}

    def _resolve(self, stage: StageSpec | None) -> ResolvedModel:
        name = self.model_override
        if name is None and isinstance(stage, LlmStage):
            name = stage.model
        if name is None:
            name = self.chain.spec.defaults.model
        return self.registry.resolve(name if isinstance(name, str) else None)

    def _all_llm_stages(self) -> list[LlmStage]:
        found: list[LlmStage] = []
        todo: list[StageSpec] = list(self.chain.spec.stages)
        while todo:
            stage = todo.pop()
            if isinstance(stage, LlmStage):
                found.append(stage)
            elif isinstance(stage, MapStage):
                todo.extend(stage.item_stages)
        return found

    # -- one unit: a stage or a map item --------------------------------------------------

    def _state(self, unit: _Unit) -> StageState | None:
        return self.stages.get(unit.stage_id) if len(unit.path) == 1 else None

    async def _run_unit(self, unit: _Unit) -> Any:
        spec = unit.spec
        if self.resume is not None:
            ended = self.resume.ended.get(tuple(unit.path))
            if ended is not None:
                return self._take_ended(unit, ended)
        if spec.when is not None:
            try:
                go = await self._render(spec.when, unit.context)
            except TemplateError as exc:
                error = ErrorInfo(type=exc.type, message=f"when: {exc}")
                self._end(
                    unit, "failed", self._start(unit), None, Usage(), unit.first_attempt, error
                )
                raise _StageFailed(error) from None
            if not go:
                self._done_weight += unit.share
                self._end(unit, "skipped", None, None, Usage(), 1, None)
                return None
        if isinstance(spec, MapStage):
            return await self._run_map(unit, spec, self._start(unit))
        if self._limit is None or isinstance(spec, InputStage):  # waiting holds no slot
            return await self._run_leaf(unit)
        async with self._limit:  # held from stage-start to stage-end: a stable order at 1
            return await self._run_leaf(unit)

    async def _fingerprint(self, unit: _Unit) -> str | None:
        """The unit's content hash (``engine.reuse``); None when a template does not render
        (the stage then fails the usual way, and is never reused)."""
        text = not isinstance(unit.spec, MapStage)  # a map's `over` keeps its type (a list)
        try:
            rendered = [
                await self._render(t, unit.context, text=text) for t in own_templates(unit.spec)
            ]
        except Exception:  # TemplateError, RenderLimitError: the stage will fail on its own
            return None
        unit.rendered = rendered
        return self._fingerprints.of(unit.spec, rendered)

    async def _own_text(self, unit: _Unit, source: str) -> Any:
        """A stage's one own template (text, query, a map's over), rendered once."""
        if unit.rendered:
            return unit.rendered[0]
        return await self._render(source, unit.context, text=not isinstance(unit.spec, MapStage))

    def _reuse_unit(
        self, unit: _Unit, started: float, end: StageEnded, sources: list[SourceFound]
    ) -> Any:
        """End ``unit`` (started) with an earlier run's output: its sources again, zero usage."""
        self._emit_sources(unit, unit.first_attempt, (found.source for found in sources))
        self._done_weight += unit.share
        unit.reused = True
        self._end(
            unit, "succeeded", started, end.output, Usage(), unit.first_attempt, None, end.citations
        )
        return end.output

    def _take_ended(self, unit: _Unit, end: StageEnded) -> Any:
        """End ``unit`` as it ended before the run was interrupted (``resume``): its stage-end
        is in the log already, so nothing is emitted; its usage counts in the run's."""
        unit.status, unit.usage, unit.reused = end.status, end.usage, end.reused
        unit.fingerprint = end.fingerprint
        state = self._state(unit)
        if state is not None:
            _ended_state(state, end, isinstance(unit.spec, MapStage))
        self._done_weight += unit.share
        return end.output

    def _end_lost(self, under: tuple[str | int, ...]) -> None:
        """A ``cancelled`` stage-end for each unit under the path ``under`` that was running when
        the run was interrupted and did not start again here (the run, or its map, ended
        first): every stage that started ends, items before their map."""
        if self.resume is None:
            return
        for key, lost in reversed(self.resume.open.items()):
            if key[: len(under)] != under or key in self._went_on:
                continue
            self._went_on.add(key)
            state = self.stages.get(str(key[0])) if len(key) == 1 else None
            if state is not None:
                state.status = "cancelled"
            self._emit(
                StageEnded,
                stage=str(key[0]),
                path=list(key),
                attempt=lost.attempt,
                status="cancelled",
                duration_ms=max(0, _now_ms() - lost.ts),
                progress=self._progress(),
            )

    def _start(self, unit: _Unit) -> float:
        state = self._state(unit)
        started = time.monotonic()
        attempt = 1
        lost = self.resume.open.get(tuple(unit.path)) if self.resume is not None else None
        if lost is not None:  # it was running when the run was interrupted
            assert self.resume is not None
            self._went_on.add(tuple(unit.path))
            started = _monotonic_at(lost.ts)
            if isinstance(unit.spec, MapStage):  # the map goes on; its items start again
                unit.first_attempt = lost.attempt
                if state is not None:
                    state.status, state.attempt = "running", lost.attempt
                return started
            reason = self.resume.lost
            self._emit(
                StageRetried,
                stage=unit.stage_id,
                path=unit.path,
                attempt=lost.attempt,
                error=ErrorInfo(type=reason.type, message=reason.message, stage=unit.stage_id),
            )
            attempt = unit.first_attempt = lost.attempt + 1
        if state is not None:
            state.status, state.attempt = "running", attempt
        self._emit(
            StageStarted,
            stage=unit.stage_id,
            path=unit.path,
            attempt=attempt,
            label=unit.spec.label or unit.stage_id,
            kind=unit.spec.kind,
            index=unit.index,
            total=unit.total,
        )
        return started

    def _retry_policy(self, unit: _Unit) -> tuple[int, float | None]:
        spec = unit.spec
        if isinstance(spec, InputStage):
            return 0, None  # a person answers once; the stage's timeout bounds the wait
        retries, timeout = spec.retries, spec.timeout
        if unit.parent is not None:
            retries = unit.parent.retries if retries is None else retries
            timeout = unit.parent.timeout if timeout is None else timeout
        if isinstance(spec, LlmStage):
            defaults = self.chain.spec.defaults
            retries = defaults.retries if retries is None else retries
            timeout = defaults.timeout if timeout is None else timeout
            entry = self._resolve(spec).entry
            if retries is None and entry is not None:
                retries = entry.max_retries
        return retries or 0, timeout

    async def _run_leaf(self, unit: _Unit) -> Any:
        started = self._start(unit)
        state = self._state(unit)
        usage = unit.usage
        retries, timeout = self._retry_policy(unit)
        attempt = first = unit.first_attempt
        try:
            # rendered inside the stage (a heavy prompt shows as the stage running), once
            unit.fingerprint = await self._fingerprint(unit)
            if self.reuse is not None and unit.fingerprint is not None:
                earlier = self.reuse.find(unit.path, unit.fingerprint)
                if earlier is not None:
                    return self._reuse_unit(unit, started, earlier.end, earlier.sources)
            while True:
                try:
                    output = await self._attempt(unit, attempt, usage, timeout)
                    break
                except Exception as raw:
                    exc = self._as_stage_error(raw, unit, timeout)
                    if not isinstance(exc, TransientError) or attempt - first >= retries:
                        tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                        error = ErrorInfo(type=exc.type, message=f"{exc}{tries}")
                        self._end(unit, "failed", started, None, usage, attempt, error)
                        raise _StageFailed(error) from None
                    self._emit(
                        StageRetried,
                        stage=unit.stage_id,
                        path=unit.path,
                        attempt=attempt,
                        error=ErrorInfo(type=exc.type, message=str(exc)),
                    )
                    delay = self._backoff(attempt, exc.retry_after)
                    attempt += 1  # before the wait: a cancel during backoff ends this attempt
                    if state is not None:
                        state.attempt = attempt
                    await asyncio.sleep(delay)
        except asyncio.CancelledError:
            self._end(unit, "cancelled", started, None, usage, attempt, None)
            raise
        self._done_weight += unit.share
        citations = self._citations(unit, output)
        self._end(unit, "succeeded", started, output, usage, attempt, None, citations)
        return output

    def _as_stage_error(self, exc: BaseException, unit: _Unit, timeout: float | None) -> StageError:
        if isinstance(exc, TimeoutError):
            after = f" after {timeout:g} s" if timeout is not None else ""
            return TransientError(f"timed out{after}", type="timeout")
        if isinstance(exc, StageError):
            return exc
        name = self._resolve(unit.spec).name if isinstance(unit.spec, LlmStage) else ""
        return classify_error(exc, name, models_file=self.registry.config.source)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, 60.0)
        base = self.retry_backoff * (2 ** (attempt - 1))
        return float(min(base, 30.0) * (0.5 + random.random() / 2))

    def _end(
        self,
        unit: _Unit,
        status: StageStatus,
        started: float | None,
        output: Any,
        usage: Usage,
        attempt: int,
        error: ErrorInfo | None,
        citations: list[Citation] | None = None,
    ) -> None:
        duration = int((time.monotonic() - started) * 1000) if started else 0
        unit.status, unit.usage = status, usage
        state = self._state(unit)
        if state is not None:
            state.status, state.output, state.usage = status, output, usage
            state.duration_ms, state.error = duration, error
        self._emit(
            StageEnded,
            stage=unit.stage_id,
            path=unit.path,
            attempt=attempt,
            status=status,
            output=output,
            usage=usage,
            duration_ms=duration,
            error=error,
            progress=self._progress(),
            citations=citations,
            reused=unit.reused,
            fingerprint=unit.fingerprint,
        )

    async def _attempt(self, unit: _Unit, attempt: int, usage: Usage, timeout: float | None) -> Any:
        if timeout is None:
            return await self._work(unit, attempt, usage)
        async with asyncio.timeout(timeout):
            return await self._work(unit, attempt, usage)

    async def _work(self, unit: _Unit, attempt: int, usage: Usage) -> Any:
        spec = unit.spec
        if isinstance(spec, LlmStage):
            return await self._run_llm(unit, spec, attempt, usage)
        if isinstance(spec, TemplateStage):
            return await self._own_text(unit, spec.text)
        if isinstance(spec, SplitStage):
            return await self._run_split(unit, spec, attempt)
        if isinstance(spec, RetrieveStage):
            return await self._run_retrieve(unit, spec, attempt)
        if isinstance(spec, InputStage):
            return await self._run_input(unit, spec, attempt)
        raise StageError(f"unknown stage kind {spec.kind!r}")  # pragma: no cover

    async def _run_split(self, unit: _Unit, spec: SplitStage, attempt: int) -> Any:
        text = await self._own_text(unit, spec.text)
        chunks = split_text(text, spec.chunk_size, min(spec.overlap, spec.chunk_size - 1))
        if spec.sources:
            total = len(chunks)
            self._emit_sources(
                unit,
                attempt,
                (
                    Source(
                        id=f"{unit.stage_id}-{chunk['index']}",
                        title=f"Section {chunk['index'] + 1} of {total}",
                        text=chunk["text"],
                        metadata={"start": chunk["start"], "end": chunk["end"]},
                    )
                    for chunk in chunks
                ),
            )
        return chunks

    async def _run_input(self, unit: _Unit, spec: InputStage, attempt: int) -> Any:
        prompt = await self._own_text(unit, spec.prompt)
        if unit.turn is not None and unit.index is not None:
            for ended in unit.turn[: unit.index]:  # earlier items ask (and end) first
                await ended.wait()
        own, limit = spec.timeout, self.max_input_wait
        waits = [w for w in (own, limit) if w is not None]
        wait = min(waits) if waits else None
        schema = spec.answer_schema
        pending = PendingInput(
            stage=unit.stage_id,
            path=unit.path,
            prompt=prompt,
            schema=schema,
            expires_at=_now_ms() + int(wait * 1000) if wait is not None else None,
            future=asyncio.get_running_loop().create_future(),
            validator=compile_validator(schema),
        )
        key = tuple(unit.path)
        self._pending[key] = pending
        self._waiting_changed()
        state = self._state(unit)
        if state is not None:
            state.status = "waiting_input"
        try:
            self._emit(
                InputRequired,
                stage=unit.stage_id,
                path=unit.path,
                attempt=attempt,
                prompt=prompt,
                schema=schema,
                expires_at=pending.expires_at,
            )
            if self.on_input is not None:
                self.on_input(pending)
            try:
                async with asyncio.timeout(wait):
                    return await pending.future
            except TimeoutError:
                if own is not None and (limit is None or own <= limit):
                    if spec.has_default:
                        return spec.default
                    raise StageError(
                        f"no answer within {own:g} s (the stage's timeout)", type="input_timeout"
                    ) from None
                raise StageError(
                    f"no answer within {wait:g} s (the limit on waiting for input, max_input_wait)",
                    type="input_timeout",
                ) from None
        finally:
            if self._pending.get(key) is pending:
                del self._pending[key]
            self._waiting_changed()
            if state is not None:
                state.status = "running"

    def _emit_sources(self, unit: _Unit, attempt: int, sources: Iterable[Source]) -> None:
        """One ``source`` event per source, tagged with the stage and path that found it."""
        for source in sources:
            self._emit(
                SourceFound, stage=unit.stage_id, path=unit.path, attempt=attempt, source=source
            )

    async def _render(self, source: str, context: dict[str, Any], *, text: bool = False) -> Any:
        """Render a template field: inline when it is plain substitution, else off the loop."""
        return await render_async(compile_template(source), context, self.render_limits, text=text)

    async def _render_value(self, value: Any, context: dict[str, Any], key: str) -> Any:
        """Render every template inside ``value`` (nested mappings and lists included)."""
        if isinstance(value, str):
            try:
                return await self._render(value, context)
            except TemplateError as exc:
                raise _StageFailed(ErrorInfo(type=exc.type, message=f"{key}: {exc}")) from None
        if isinstance(value, dict):
            return {k: await self._render_value(v, context, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [
                await self._render_value(v, context, f"{key}[{i}]") for i, v in enumerate(value)
            ]
        return value

    async def _retriever(self, collection: str) -> Retriever:
        found = self._retrievers.get(collection)
        if found is None:
            # reads collections.yaml, may import a retriever factory and build a vector store:
            # off the event loop
            found = await asyncio.to_thread(self._resolve_retriever, collection)
            found = self._retrievers.setdefault(collection, found)
        return found

    def _resolve_retriever(self, collection: str) -> Retriever:
        if self._collections is None:
            self._collections = load_collections_config()
        base = self.chain.path.parent if self.chain.path is not None else FilePath.cwd()
        return resolve_retriever(
            collection,
            base=base,
            config=self._collections,
            retrievers=self._retriever_objects,
            cache_dir=self._index_cache_dir,
        )

    async def _run_retrieve(self, unit: _Unit, spec: RetrieveStage, attempt: int) -> Any:
        query = await self._own_text(unit, spec.query)
        try:
            retriever = await self._retriever(spec.collection)
            hits = await retriever.search(query, spec.top_k, spec.min_score)
        except CollectionError as exc:
            raise StageError(str(exc), type="collection_error") from None
        self._emit_sources(unit, attempt, (hit.source() for hit in hits))
        return [hit.to_output() for hit in hits]

    def _citations(self, unit: _Unit, output: Any) -> list[Citation] | None:
        """For an llm stage whose prompt read retrieve stages: its answer's markers, mapped."""
        cited = self.chain.cited_stages.get(id(unit.spec))
        if cited is None or not isinstance(output, str):
            return None
        given: list[GivenSource] = []
        stages = unit.context.get("stages", {})
        for stage_id in cited:
            for hit in _flat_hits(stages.get(stage_id, {}).get("output")):
                given.append((str(hit["id"]), stage_id))
        return find_citations(output, given)

    async def _messages(self, spec: LlmStage, context: dict[str, Any]) -> list[BaseMessage]:
        return [
            _MESSAGE_KINDS[role](await self._render(source, context, text=True))
            for role, _, source in prompt_parts(spec.prompt)
        ]

    async def _run_llm(self, unit: _Unit, spec: LlmStage, attempt: int, usage: Usage) -> Any:
        if unit.rendered is not None:  # rendered once already, for the fingerprint
            roles = [role for role, _, _ in prompt_parts(spec.prompt)]
            messages = [_MESSAGE_KINDS[r](t) for r, t in zip(roles, unit.rendered, strict=True)]
        else:
            messages = await self._messages(spec, unit.context)
        if self.on_prompt is not None:
            self.on_prompt(unit.stage_id, unit.path, messages)
        resolved = self._resolve(spec)
        kwargs: dict[str, Any] = {}
        temperature = spec.temperature
        if temperature is None:
            temperature = self.chain.spec.defaults.temperature
        if temperature is not None:
            kwargs["temperature"] = temperature
        max_tokens = spec.max_tokens or self.chain.spec.defaults.max_tokens
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        runnable: Any = resolved.chat_model
        unwrap: Callable[[Any], Any] = _identity
        if spec.output == "json":
            runnable, messages, unwrap = prepare_json_model(runnable, messages, spec.schema_)
        parts: list[str] = []
        stage_id, path, emit = unit.stage_id, unit.path, self.emit_token
        stream = spec.stream
        reported = _Reported()
        if isinstance(runnable, OfflineChatModel):
            source: AsyncGenerator[Any, None] = runnable.stream_pieces(messages)
        else:  # a registry-built OpenAI model streams straight into the stage too
            fast = fast_stream(runnable, messages, kwargs)
            source = runnable.astream(messages, **kwargs) if fast is None else fast
        try:
            async with contextlib.aclosing(source) as chunks:
                async for chunk in chunks:
                    reported.answered = True
                    text = chunk.content
                    if text:
                        if not isinstance(text, str):
                            text = _content_text(text)
                        parts.append(text)
                        if stream:
                            emit(stage_id, path, attempt, text)
                    meta = chunk.usage_metadata
                    if meta:
                        reported.count(meta)
        finally:  # a failed or cancelled attempt counts too: what it reported, else unknown
            usage.add(reported.usage(resolved.cost))
        text_out = "".join(parts)
        if spec.output == "json":
            return parse_json_output(text_out, spec.schema_, unwrap)
        return text_out

    async def _run_map(self, unit: _Unit, spec: MapStage, started: float) -> Any:
        state = self._state(unit)
        try:
            unit.fingerprint = await self._fingerprint(unit)
            items = await self._own_text(unit, spec.over)
        except TemplateError as exc:
            error = ErrorInfo(type=exc.type, message=f"over: {exc}")
            self._end(unit, "failed", started, None, Usage(), unit.first_attempt, error)
            raise _StageFailed(error) from None
        except asyncio.CancelledError:  # the render is a wait: the stage started, so it ends
            self._end_lost(tuple(unit.path))
            self._end(unit, "cancelled", started, None, Usage(), unit.first_attempt, None)
            raise
        if items is None:  # the stage it reads was skipped: nothing to do
            items = []
        if isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):
            error = ErrorInfo(
                type="template_error",
                message=f"over: expected a list, got {type(items).__name__}",
            )
            self._end(unit, "failed", started, None, Usage(), unit.first_attempt, error)
            raise _StageFailed(error)
        items = list(items)
        total = len(items)
        if total > self.max_map_items:
            error = ErrorInfo(
                type="map_limit",
                message=f"over: {total:,} items, more than the limit of {self.max_map_items:,} "
                "(max_map_items)",
            )
            self._end(unit, "failed", started, None, Usage(), unit.first_attempt, error)
            raise _StageFailed(error)
        if state is not None:
            state.completed, state.total = 0, total
        results: list[Any] = [None] * total
        turn = [asyncio.Event() for _ in range(total)]
        members = spec.item_stages
        item_units = [
            _Unit(
                members[0],
                unit.stage_id,
                [*unit.path, i],
                {**unit.context, spec.as_: item, "index": i},
                unit.share / total,
                index=i,
                total=total,
                parent=spec,
                turn=turn,
            )
            for i, item in enumerate(items)
        ]
        queue = deque(item_units)
        completed = 0
        ended: list[int] = []
        # an interrupted run's log holds the first counts already: they are not sent again
        shown = self.resume.progress.get(tuple(unit.path), 0) if self.resume is not None else 0

        async def worker() -> None:
            nonlocal completed
            while queue:
                item = queue.popleft()
                index = item.index or 0
                item.context["earlier"] = [results[j] for j in sorted(ended)]
                try:
                    if spec.stages is None:
                        results[index] = await self._run_unit(item)
                    else:
                        results[index] = await self._run_sequence(item, spec.stages)
                finally:
                    turn[index].set()
                ended.append(index)
                await asyncio.sleep(0)  # items that never wait (templates) still let others run
                completed += 1
                if state is not None:
                    state.completed = completed
                if completed <= shown:
                    continue
                self._emit(
                    StageProgress,
                    stage=unit.stage_id,
                    path=unit.path,
                    attempt=unit.first_attempt,
                    completed=completed,
                    total=total,
                )

        workers = {asyncio.create_task(worker()): i for i in range(min(spec.concurrency, total))}
        try:
            failure: _StageFailed | None = None
            pending = set(workers)
            while pending and failure is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    err = task.exception()
                    if isinstance(err, _StageFailed):
                        failure = err
                    elif err is not None:
                        raise err
            if failure is not None:
                await self._cancel_tasks({t: None for t in pending})
        except BaseException:
            await self._cancel_tasks(workers)
            self._end_lost(tuple(unit.path))
            self._end(
                unit, "cancelled", started, None, _sum_usage(item_units), unit.first_attempt, None
            )
            raise
        usage = _sum_usage(item_units)
        if failure is not None:
            index = next((u.index for u in item_units if u.status == "failed"), None)
            where = f"item {index}: " if index is not None else ""
            error = ErrorInfo(type=failure.error.type, message=where + failure.error.message)
            self._end_lost(tuple(unit.path))
            self._end(unit, "failed", started, None, usage, unit.first_attempt, error)
            raise _StageFailed(error)
        self._done_weight += unit.share - sum(u.share for u in item_units)
        unit.reused = self.reuse is not None and all(u.reused for u in item_units)
        self._end(unit, "succeeded", started, results, usage, unit.first_attempt, None)
        return results

    async def _run_sequence(self, item: _Unit, members: list[StageSpec]) -> dict[str, Any]:
        """One item of a map with ``stages``: each stage in turn, reading the ones before it."""
        outputs: dict[str, Any] = {}
        share = item.share / len(members)
        name = ""
        try:
            for member in members:
                name = member.id or ""
                stages = {**item.context["stages"]}
                stages.update({k: {"output": v} for k, v in outputs.items()})
                child = _Unit(
                    member,
                    item.stage_id,
                    [*item.path, name],
                    {**item.context, "stages": stages},
                    share,
                    index=item.index,
                    total=item.total,
                    parent=item.parent,
                    turn=item.turn,
                )
                item.children.append(child)
                outputs[name] = await self._run_unit(child)
        except _StageFailed as exc:
            item.status = "failed"
            raise _StageFailed(
                ErrorInfo(type=exc.error.type, message=f"{name}: {exc.error.message}")
            ) from None
        finally:
            item.usage = _sum_usage(item.children)
        item.status = "succeeded"
        item.reused = bool(item.children) and all(c.reused for c in item.children)
        return outputs


def _ended_state(state: StageState, end: StageEnded, fan_out: bool) -> None:
    """A top-level stage's status as its stage-end (of an interrupted run's log) left it."""
    state.status, state.attempt, state.output = end.status, end.attempt or 1, end.output
    state.usage, state.duration_ms, state.error = end.usage, end.duration_ms, end.error
    if fan_out and isinstance(end.output, list):
        state.completed = state.total = len(end.output)


def _flat_hits(output: Any) -> list[dict[str, Any]]:
    """A retrieve stage's hits; a map of retrieve stages gives a list of lists, flattened."""
    if isinstance(output, dict) and "id" in output:
        return [output]
    if isinstance(output, list):
        return [hit for item in output for hit in _flat_hits(item)]
    return []


class _Reported:
    """The usage one model call reported, as its chunks arrive."""

    __slots__ = ("answered", "input_tokens", "output_tokens")

    def __init__(self) -> None:
        self.answered = False
        """The model sent something (a call refused before any answer counts nothing)."""
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None

    def count(self, meta: Mapping[str, Any]) -> None:
        for name in ("input_tokens", "output_tokens"):
            value = meta.get(name)
            if isinstance(value, int):
                setattr(self, name, (getattr(self, name) or 0) + value)

    def usage(self, price: Callable[[int, int], float | None]) -> Usage:
        if not self.answered:
            return Usage()
        used_in, used_out = self.input_tokens, self.output_tokens
        if used_in is None or used_out is None:
            return Usage(input_tokens=used_in or 0, output_tokens=used_out or 0, reported=False)
        return Usage(input_tokens=used_in, output_tokens=used_out, cost=price(used_in, used_out))


def _sum_usage(units: list[_Unit]) -> Usage:
    total = Usage()
    for unit in units:
        total.add(unit.usage)
    return total


def _identity(value: Any) -> Any:
    return value


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(
            part if isinstance(part, str) else str(part.get("text", ""))
            for part in content
            if isinstance(part, (str, dict))
        )
    return str(content)


async def run_chain(
    chain: Chain, inputs: Mapping[str, Any] | None = None, **options: Any
) -> AsyncIterator[RunEvent]:
    """Run ``chain`` and yield its events as they happen. Closing the iterator cancels the run.

    ``options`` are ``ChainRun``'s keyword arguments (models, model, max_concurrency, …).
    """
    buffer: deque[RunEvent] = deque()
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[None] | None] = [None]

    def sink(event: RunEvent) -> None:
        buffer.append(event)
        fut = waiter[0]
        if fut is not None and not fut.done():
            fut.set_result(None)

    run = ChainRun(chain, inputs, sink=sink, **options)
    task = loop.create_task(run.execute())

    def wake(_: asyncio.Task[Any]) -> None:
        fut = waiter[0]
        if fut is not None and not fut.done():
            fut.set_result(None)

    task.add_done_callback(wake)
    try:
        while True:
            while buffer:
                event = buffer.popleft()
                yield event
                if event.type == "run-end":
                    return
            if task.done():
                task.result()  # re-raises a crash; a normal end always left run-end behind
                return
            fut = loop.create_future()
            waiter[0] = fut
            await fut
            waiter[0] = None
    finally:
        if not task.done():
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
