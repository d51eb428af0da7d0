"""Terminal views of a run for ``stagecast run``: NDJSON, a plain log, and a rich live view.

Each view takes the run's events one by one (``handle``), in ``seq`` order, on the event loop's
thread; the live view only redraws from a timer on that same thread, so no state is shared across
threads. ``RunState`` folds the events into what a person wants to see: one line per top-level
stage, the text the running stages are writing, and the run's end.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from langchain_core.messages import BaseMessage
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.json import JSON
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.rule import Rule
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from stagecast.engine.events import (
    Citation,
    InputRequired,
    RunEnded,
    RunEvent,
    RunStarted,
    SourceFound,
    StageEnded,
    StageProgress,
    StageRetried,
    StageStarted,
    Token,
    Usage,
    event_to_json,
)

__all__ = [
    "EventsView",
    "LiveView",
    "PlainView",
    "RunState",
    "StageLine",
    "View",
    "format_messages",
    "path_label",
]

ItemKey = tuple[str | int, ...]

_SYMBOLS = {
    "waiting": ("·", "dim"),
    "running": ("▸", "cyan"),
    "succeeded": ("✓", "green"),
    "failed": ("✗", "red"),
    "skipped": ("↷", "dim"),
    "cancelled": ("⊘", "yellow"),
}
_TAIL_LINES = 4
_ITEMS_SHOWN = 4
_SOURCES_SHOWN = 6


def path_label(path: Sequence[str | int] | None) -> str:
    """``["section_summaries", 3]`` -> ``section_summaries[3]``."""
    if not path:
        return "?"
    return str(path[0]) + "".join(f"[{p}]" for p in path[1:])


def format_messages(messages: Sequence[BaseMessage]) -> str:
    """A rendered prompt, role by role, as plain text."""
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    blocks = []
    for message in messages:
        content = message.content if isinstance(message.content, str) else str(message.content)
        blocks.append(f"[{roles.get(message.type, message.type)}]\n{content.rstrip()}")
    return "\n".join(blocks)


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def source_line(number: int, found: tuple[str, str, float | None]) -> str:
    """``[2] title (score 3.1) · id``: one source as the terminal lists it."""
    source_id, title, score = found
    scored = f" (score {score:g})" if score is not None else ""
    return f"[{number}] {title}{scored} · {source_id}"


def citations_line(citations: list[Citation]) -> str:
    """``cites [1] [2], unmatched [7]`` (``cites nothing`` when the answer has no markers)."""
    matched = [f"[{c.marker}]" for c in citations if c.source_id is not None]
    unmatched = [f"[{c.marker}]" for c in citations if c.source_id is None]
    text = "cites " + (" ".join(matched) if matched else "nothing")
    if unmatched:
        text += f", unmatched {' '.join(unmatched)}"
    return text


def usage_line(usage: Usage) -> str:
    """``46 in / 44 out tokens · $0.0012``; usage the provider did not report is unknown, and
    so is the cost then (never shown as 0 or $0)."""
    used_in, used_out = usage.input_tokens, usage.output_tokens
    if not usage.reported and not used_in and not used_out:
        return "usage unknown (the provider reported none)"
    text = f"{used_in} in / {used_out} out tokens"
    if not usage.reported:
        text += " and more not reported · cost unknown"
    elif usage.cost is not None:
        text += f" · ${usage.cost:.4f}"
    return text


def usage_summary(usage: Usage) -> str:
    """``usage: 46 in / 44 out tokens``, or ``usage unknown (…)`` (the end of a run)."""
    line = usage_line(usage)
    return line if line.startswith("usage unknown") else f"usage: {line}"


@dataclass
class StageLine:
    """What the terminal shows of one top-level stage."""

    id: str
    label: str
    kind: str
    fan_out: bool
    status: str = "waiting"
    started: float | None = None
    duration_ms: int | None = None
    attempt: int = 1
    completed: int = 0
    total: int | None = None
    sources: int = 0
    found: list[tuple[str, str, float | None]] = field(default_factory=list)
    """(id, title, score) of each source the stage found, in order (numbered from 1)."""
    citations: list[Citation] | None = None
    text: list[str] = field(default_factory=list)
    items: dict[ItemKey, list[str]] = field(default_factory=dict)
    retry: str | None = None
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    reused: bool = False
    """Its output was taken from an earlier run (``--reuse``)."""
    reused_items: int = 0
    """For a map: how many of its items were taken from an earlier run."""

    def elapsed(self, now: float) -> float | None:
        if self.duration_ms is not None:
            return self.duration_ms / 1000
        if self.started is not None:
            return now - self.started
        return None


@dataclass
class RunState:
    """The events of one run, folded into lines for a terminal."""

    run_id: str = ""
    title: str = ""
    model: str = ""
    started: float = field(default_factory=time.monotonic)
    stages: dict[str, StageLine] = field(default_factory=dict)
    end: RunEnded | None = None
    waiting_input: str | None = None
    waiting_path: tuple[str | int, ...] | None = None

    def apply(self, event: RunEvent) -> StageLine | None:
        """Fold one event in; returns the stage line it touched, if any."""
        if isinstance(event, RunStarted):
            self.run_id, self.model = event.run_id, event.model
            self.title = event.chain.title or event.chain.id
            self.started = time.monotonic()
            self.stages = {
                s.stage: StageLine(s.stage, s.label, s.kind, s.fan_out) for s in event.plan
            }
            return None
        if isinstance(event, RunEnded):
            self.end = event
            return None
        path = event.path or [event.stage or "?"]
        line = self.stages.get(str(path[0]))
        if line is None:
            line = self.stages[str(path[0])] = StageLine(str(path[0]), str(path[0]), "?", False)
        key: ItemKey = tuple(path[1:])
        if isinstance(event, Token):
            if key:
                line.items.setdefault(key, []).append(event.text)
            elif event.attempt in (None, line.attempt):
                line.text.append(event.text)
        elif isinstance(event, StageStarted):
            if key:
                line.items[key] = []
                if event.total is not None and len(key) == 1:
                    line.total = event.total
            else:
                line.status, line.started, line.kind = "running", time.monotonic(), event.kind
        elif isinstance(event, StageRetried):
            failed = event.attempt or 1
            note = f"attempt {failed} failed ({event.error.type}: {event.error.message})"
            if key:
                line.items[key] = []
                line.retry = f"item {path_label(key)}: {note}"
            else:
                line.attempt = failed + 1
                line.text = []
                line.retry = note
        elif isinstance(event, StageProgress):
            if not key:
                line.completed, line.total = event.completed, event.total
        elif isinstance(event, SourceFound):
            line.sources += 1
            source = event.source
            line.found.append((source.id, source.title or source.id, source.score))
        elif isinstance(event, InputRequired):
            question = " ".join(event.prompt.split())
            if len(question) > 100:
                question = question[:99] + "…"
            self.waiting_input = f"{path_label(path)}: {question}"
            self.waiting_path = tuple(path)
        elif isinstance(event, StageEnded):
            if self.waiting_path == tuple(path):
                self.waiting_input = self.waiting_path = None
            if key:
                line.items.pop(key, None)
                line.reused_items += event.reused
            else:
                line.reused = event.reused
                line.status, line.duration_ms, line.usage = (
                    event.status,
                    event.duration_ms,
                    event.usage,
                )
                if event.error is not None:
                    line.error = event.error.message
                line.citations = event.citations
        return line


class View:
    """Shows a run: ``start``, ``handle`` every event, ``prompt`` (dry runs), ``finish``."""

    on_broken: Callable[[], None] | None = None
    """Called once when the output closed (``| head``): the run should stop."""
    broken: bool = False

    def start(self) -> None:
        pass

    def handle(self, event: RunEvent) -> None:
        """Show one event (called in ``seq`` order, on the event loop's thread)."""
        raise NotImplementedError  # every view shows events its own way

    def prompt(self, stage: str, path: list[str | int], messages: list[BaseMessage]) -> None:
        pass

    def pause(self) -> None:
        """Stop drawing (a question is asked on the terminal); events still fold in."""

    def resume(self) -> None:
        """Draw again after ``pause``."""

    def note(self, message: str) -> None:
        """A diagnostic for the person at the terminal (never on an NDJSON stdout)."""
        print(message, file=sys.stderr, flush=True)

    def finish(self, end: RunEnded | None) -> None:
        pass


class EventsView(View):
    """One wire-JSON event per line on ``out``, nothing else; prompts go to stderr."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._flush_pending = False

    def _broke(self) -> None:
        if not self.broken:
            self.broken = True
            if self.on_broken is not None:
                self.on_broken()

    def handle(self, event: RunEvent) -> None:
        if self.broken:
            return
        try:
            self.out.write(event_to_json(event) + "\n")
        except BrokenPipeError:
            self._broke()
            return
        if event.type == "run-end":
            self._flush()
        elif not self._flush_pending:
            # One flush per loop iteration: a burst of tokens costs one write, not one each.
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        if self.broken:
            return
        try:
            self.out.flush()
        except BrokenPipeError:
            self._broke()

    def prompt(self, stage: str, path: list[str | int], messages: list[BaseMessage]) -> None:
        print(f"--- prompt: {path_label(path)} ---", file=sys.stderr)
        print(format_messages(messages), file=sys.stderr, flush=True)

    def finish(self, end: RunEnded | None) -> None:
        self._flush()


class PlainView(View):
    """A readable progress log for pipes and files: one line per thing that happened."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.state = RunState()

    def _line(self, text: str) -> None:
        elapsed = time.monotonic() - self.state.started
        self._print(f"{elapsed:7.2f}s  {text}")

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def handle(self, event: RunEvent) -> None:
        state = self.state
        line = state.apply(event)
        if isinstance(event, RunStarted):
            self._print(f"run {event.run_id} · {state.title} · model: {event.model}")
            return
        if isinstance(event, RunEnded) or line is None:
            return
        where = path_label(event.path)
        nested = bool(event.path and len(event.path) > 1)
        if isinstance(event, StageStarted) and not nested:
            self._line(f"start     {where}  {event.label} ({event.kind})")
        elif isinstance(event, StageRetried):
            error = event.error
            self._line(
                f"retry     {where}  attempt {event.attempt} failed "
                f"({error.type}: {error.message}); trying again"
            )
        elif isinstance(event, StageProgress) and not nested:
            self._line(f"progress  {where}  {event.completed}/{event.total}")
        elif isinstance(event, SourceFound):
            self._line(f"source    {where}  {source_line(len(line.found), line.found[-1])}")
        elif isinstance(event, InputRequired):
            self._line(f"input     {where}  waiting for input: {event.prompt}")
        elif isinstance(event, StageEnded):
            if nested and event.status == "succeeded":
                return
            detail = ""
            if event.status in ("succeeded", "failed", "cancelled"):
                detail = f" in {event.duration_ms} ms"
            if event.usage.output_tokens or not event.usage.reported:  # a model answered
                detail += f" · {usage_line(event.usage)}"
            if event.error is not None:
                detail += f": {event.error.message}"
            if event.citations is not None and not nested:
                detail += f" · {citations_line(event.citations)}"
            detail += _reused_note(line) if not nested else ""
            self._line(f"{event.status:<9} {where}{detail}")

    def prompt(self, stage: str, path: list[str | int], messages: list[BaseMessage]) -> None:
        self._print(f"--- prompt: {path_label(path)} ---")
        self._print(format_messages(messages))
        self._print("---")

    def finish(self, end: RunEnded | None) -> None:
        if end is None:
            return
        seconds = end.duration_ms / 1000
        summary = f"run {end.status} in {seconds:.2f}s"
        if end.error is not None:
            stage = f"{end.error.stage}: " if end.error.stage else ""
            summary += f": {stage}{end.error.message}"
        self._print(summary)
        self._print(usage_summary(end.usage))
        self._print(f"model: {self.state.model}")
        if end.status == "succeeded":
            self._print()
            self._print("outputs:")
            for name, value in _named_outputs(end.outputs):
                self._print(f"== {name} ==")
                if isinstance(value, str):
                    self._print(value.rstrip())
                else:
                    self._print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _reused_note(line: StageLine) -> str:
    """`` · reused`` (a stage taken from an earlier run), `` · 3/4 items reused`` (a map)."""
    if line.reused:
        return " · reused"
    if line.reused_items:
        return f" · {line.reused_items}/{line.total or line.reused_items} items reused"
    return ""


def _named_outputs(outputs: Any) -> list[tuple[str, Any]]:
    if isinstance(outputs, dict):
        return [(str(k), v) for k, v in outputs.items()]
    return [("output", outputs)]


class _Tail:
    """The last ``lines`` lines of a text, as the terminal would wrap it."""

    def __init__(self, text: str, lines: int, style: str = "") -> None:
        self.text, self.lines, self.style = text, lines, style

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        text = Text(self.text[-4000:].rstrip(), style=self.style)
        wrapped = text.wrap(console, max(options.max_width, 10))
        yield Text("\n").join(list(wrapped)[-self.lines :])


class LiveView(View):
    """rich.live: a line per stage with status, time and bars, plus the text being written."""

    def __init__(self, console: Console, *, refresh_per_second: float = 12.0) -> None:
        self.console = console
        self.state = RunState()
        self.live = Live(
            console=console, auto_refresh=False, transient=False, redirect_stdout=False
        )
        self.interval = 1 / refresh_per_second
        self._spinners: dict[str, Spinner] = {}
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.live.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    def pause(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self.live.update(self.render(), refresh=True)
        self.live.stop()

    def resume(self) -> None:
        if self._ticker is None:
            self.start()

    async def _tick(self) -> None:
        while True:
            self.live.update(self.render(), refresh=True)
            await asyncio.sleep(self.interval)

    def handle(self, event: RunEvent) -> None:
        line = self.state.apply(event)
        if isinstance(event, StageRetried) and line is not None:
            self.console.print(
                Text(f"↻ {path_label(event.path)}: {line.retry}; trying again", style="yellow")
            )

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="yellow"))

    def prompt(self, stage: str, path: list[str | int], messages: list[BaseMessage]) -> None:
        self.console.print(Rule(f"prompt · {path_label(path)}", style="dim", align="left"))
        self.console.print(Text(format_messages(messages)), markup=False, highlight=False)

    def render(self) -> RenderableType:
        state = self.state
        now = time.monotonic()
        header = Text.assemble(
            (state.title or "…", "bold"),
            (f"  {state.run_id}  model: {state.model}", "dim"),
        )
        grid = Table.grid(padding=(0, 1))
        for _ in range(5):
            grid.add_column()
        writing: list[RenderableType] = []
        for line in state.stages.values():
            grid.add_row(*self._row(line, now))
            if line.status != "running":
                continue
            if line.text:
                body = _Tail("".join(line.text), _TAIL_LINES)
                title = line.label + (f" (attempt {line.attempt})" if line.attempt > 1 else "")
                writing.append(Panel(body, title=title, title_align="left", border_style="dim"))
            running = [(k, t) for k, t in line.items.items() if t][-_ITEMS_SHOWN:]
            for key, parts in running:
                label = Text(f"{line.id}{''.join(f'[{k}]' for k in key)} ", style="cyan")
                writing.append(_item_row(label, "".join(parts)))
        if state.waiting_input:
            writing.append(Text(f"waiting for input: {state.waiting_input}", style="yellow"))
        return Group(header, grid, *self._sources(), *writing)

    def _sources(self) -> list[RenderableType]:
        """The sources each stage found, listed under the stages (the first few of each)."""
        blocks: list[RenderableType] = []
        for line in self.state.stages.values():
            if not line.found:
                continue
            blocks.append(Text(f"sources · {line.label}", style="bold"))
            for number, found in enumerate(line.found[:_SOURCES_SHOWN], start=1):
                blocks.append(Text(f"  {source_line(number, found)}", style="dim"))
            if len(line.found) > _SOURCES_SHOWN:
                blocks.append(Text(f"  … and {len(line.found) - _SOURCES_SHOWN} more", style="dim"))
        return blocks

    def _row(self, line: StageLine, now: float) -> list[RenderableType]:
        symbol: RenderableType
        if line.status == "running":
            spinner = self._spinners.setdefault(line.id, Spinner("dots", style="cyan"))
            symbol = spinner
        else:
            char, style = _SYMBOLS.get(line.status, ("?", ""))
            symbol = Text(char, style=style)
        elapsed = line.elapsed(now)
        label_style = "dim" if line.status in ("waiting", "skipped") else ""
        detail: list[RenderableType] = []
        if line.fan_out and line.total is not None:
            bar = ProgressBar(total=max(line.total, 1), completed=line.completed, width=24)
            detail.append(bar)
            detail.append(Text(f" {line.completed}/{line.total}"))
        if line.sources:
            detail.append(Text(f" {line.sources} sources", style="dim"))
        if line.status == "running" and line.retry:
            detail.append(Text(f" attempt {line.attempt} · {line.retry}", style="yellow"))
        elif line.status == "succeeded" and line.attempt > 1:
            detail.append(Text(f" after {line.attempt} attempts", style="yellow"))
        if line.status == "failed" and line.error:
            detail.append(Text(f" {line.error}", style="red"))
        if line.status in ("skipped", "cancelled"):
            detail.append(Text(f" {line.status}", style="dim"))
        if line.usage.output_tokens and line.status == "succeeded":
            detail.append(Text(f" {line.usage.output_tokens} tokens", style="dim"))
        elif not line.usage.reported and line.status == "succeeded":
            detail.append(Text(" tokens unknown", style="dim"))
        if line.reused or line.reused_items:
            detail.append(Text(_reused_note(line).replace(" · ", " ", 1), style="magenta"))
        if line.citations is not None:
            unmatched = any(c.source_id is None for c in line.citations)
            style = "yellow" if unmatched else "green"
            detail.append(Text(f" {citations_line(line.citations)}", style=style))
        cell = Table.grid()
        for _ in detail:
            cell.add_column()
        if detail:
            cell.add_row(*detail)
        return [
            symbol,
            Text(line.label, style=label_style),
            Text(line.kind, style="dim"),
            Text(_seconds(elapsed) if elapsed is not None else "", style="dim"),
            cell,
        ]

    def finish(self, end: RunEnded | None) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.live.update(self.render(), refresh=True)
        self.live.stop()
        if end is None:
            return
        console = self.console
        if end.status == "succeeded":
            for name, value in _named_outputs(end.outputs):
                console.print(Rule(name, style="bold", align="left"))
                if isinstance(value, str):
                    console.print(Markdown(value))
                else:
                    console.print(JSON(json.dumps(value, ensure_ascii=False, default=str)))
            console.print()
        char, style = _SYMBOLS.get(end.status, ("?", ""))
        summary = Text.assemble(
            (f"{char} {end.status}", f"bold {style}"),
            f" in {end.duration_ms / 1000:.2f}s · {usage_summary(end.usage)}",
            f" · model: {self.state.model}",
        )
        console.print(summary)
        if end.error is not None:
            stage = f"{end.error.stage}: " if end.error.stage else ""
            console.print(Text(f"{stage}{end.error.message}", style="red"))


def _item_row(label: Text, text: str) -> RenderableType:
    grid = Table.grid()
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1)
    grid.add_row(label, _Tail(text, 1, style="dim"))
    return grid
