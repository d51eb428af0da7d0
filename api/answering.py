"""Answers to a run's input stages from the CLI: a file given in advance, or the terminal.

``stagecast run`` (locally or with ``--server``) hands every ``input-required`` to an
``Answerer``: with ``--answers FILE.json`` the value comes from the file (by the input stage's
id, a list for the items of a map); on a terminal the question is asked there, with the schema's
constraints shown, and asked again when the answer is refused. A run that cannot be answered (no
file and no terminal, or ``--events``) fails with a message that says how to answer it, instead
of waiting forever.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown
from rich.rule import Rule
from rich.text import Text

from stagecast.engine.asking import path_text
from stagecast.engine.resources import data_path

__all__ = ["Answerer", "AnswersFile", "Ask", "NoAnswer", "TerminalAsker", "describe_schema"]

Path_ = list[str | int]
Submit = Callable[[Any], Awaitable[dict[str, str] | None]]
"""Sends an answer; returns the problems (field path -> problem) when it was refused."""


@dataclass(frozen=True)
class Ask:
    """One question: the input-required event's stage, path, prompt and schema."""

    stage: str
    path: Path_
    prompt: str
    schema: dict[str, Any]

    @property
    def key(self) -> str:
        """The input stage's own id: the last name in the path (``answer`` in
        ``interview[2].answer``; the map's id for a map of inputs)."""
        names = [p for p in self.path if isinstance(p, str)]
        return names[-1] if names else self.stage

    @property
    def item(self) -> int | None:
        """The map item the question belongs to (the last index in the path), if any."""
        indexes = [p for p in self.path if isinstance(p, int)]
        return indexes[-1] if indexes else None


class NoAnswer(Exception):
    """There is no answer to give (the message says why and how to give one)."""


class AnswersFile:
    """``--answers FILE.json``: ``{"<input stage id>": value}``, a list of values for the
    items of a map (``{"answer": ["first", "second"]}``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = json.loads(data_path(str(path)).read_text(encoding="utf-8"))
        except OSError as exc:
            raise NoAnswer(f"--answers {path}: cannot read it ({exc.strerror or exc})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise NoAnswer(f"--answers {path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise NoAnswer(
                f"--answers {path}: expected a JSON object (input stage id -> answer), "
                f"got {type(data).__name__}"
            )
        self.answers: dict[str, Any] = data

    def value_for(self, ask: Ask) -> Any:
        if ask.key not in self.answers:
            known = ", ".join(self.answers) or "none"
            raise NoAnswer(f"no answer for '{ask.key}' in --answers {self.path} (it has: {known})")
        value = self.answers[ask.key]
        if ask.item is None:
            return value
        if not isinstance(value, list):
            raise NoAnswer(
                f"'{ask.key}' is asked once per map item: --answers {self.path} must give a "
                "list for it"
            )
        if ask.item >= len(value):
            raise NoAnswer(
                f"--answers {self.path} has {len(value)} answer{'s' * (len(value) != 1)} for "
                f"'{ask.key}'; item "
                f"{ask.item} (counting from 0) needs one more"
            )
        return value[ask.item]


class TerminalAsker:
    """Asks on the terminal: the prompt as Markdown, what the schema allows, then the answer
    (field by field for an object). Runs in a thread of its own, so the run goes on meanwhile."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def ask(self, ask: Ask, problems: dict[str, str] | None) -> Any:
        console = self.console
        if problems:
            for field, problem in problems.items():
                console.print(Text(f"  {field}: {problem}", style="red"))
            console.print(Text("  please answer again", style="red"))
        else:
            console.print(Rule(f"input · {path_text(ask.path)}", style="yellow", align="left"))
            console.print(Markdown(ask.prompt))
        return self._value(ask.schema, "", required=True)

    def _value(self, schema: dict[str, Any], name: str, *, required: bool) -> Any:
        kind = schema.get("type")
        label = schema.get("title") or name
        if kind == "object" and isinstance(schema.get("properties"), dict):
            needed = set(schema.get("required") or [])
            out: dict[str, Any] = {}
            for prop, sub in schema["properties"].items():
                sub = sub if isinstance(sub, dict) else {}
                value = self._value(sub, prop, required=prop in needed)
                if value is not _SKIP:
                    out[prop] = value
            return out
        hint = describe_schema(schema, required=required)
        head = f"{label} ({hint})" if label else f"({hint})"
        if kind == "string" and _multiline(schema):
            self.console.print(Text(f"{head} — finish with an empty line:", style="bold"))
            lines: list[str] = []
            while True:
                line = self.console.input("  ")
                if not line and (lines or not required):
                    break
                if not line:
                    continue
                lines.append(line)
            if not lines and not required:
                return _SKIP
            return "\n".join(lines)
        text = self.console.input(Text(f"{head}: ", style="bold")).strip()
        if not text and not required:
            return _SKIP
        return _parse(schema, text)


class _Skip:
    pass


_SKIP: Any = _Skip()


def describe_schema(schema: dict[str, Any], *, required: bool = True) -> str:
    """What a schema allows, in words: ``a whole number from 1 to 10``, ``one of: a, b``."""
    kind = schema.get("type")
    parts: list[str] = []
    if "enum" in schema:
        choices = schema["enum"]
        parts.append("one of: " + ", ".join(f"{i}) {c}" for i, c in enumerate(choices, 1)))
    elif kind in ("integer", "number"):
        word = "a whole number" if kind == "integer" else "a number"
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            word += f" from {low:g} to {high:g}"
        elif low is not None:
            word += f", at least {low:g}"
        elif high is not None:
            word += f", at most {high:g}"
        parts.append(word)
    elif kind == "boolean":
        parts.append("yes or no")
    elif kind == "array":
        parts.append("a JSON list")
    elif kind == "object":
        parts.append("a JSON object")
    elif kind == "string" or kind is None:
        low, high = schema.get("minLength"), schema.get("maxLength")
        word = "text"
        if low and high:
            word += f", {low} to {high} characters"
        elif low and low > 1:
            word += f", at least {low} characters"
        elif high:
            word += f", at most {high} characters"
        parts.append(word)
    if not required:
        parts.append("optional, Enter skips")
    return "; ".join(parts)


def _multiline(schema: dict[str, Any]) -> bool:
    high = schema.get("maxLength")
    return "enum" not in schema and not (isinstance(high, int) and high <= 200)


def _parse(schema: dict[str, Any], text: str) -> Any:
    kind = schema.get("type")
    choices = schema.get("enum")
    if isinstance(choices, list):
        if text.isdigit() and 1 <= int(text) <= len(choices):
            return choices[int(text) - 1]
        for choice in choices:
            if str(choice) == text:
                return choice
        return text
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        return text  # the schema check says what is wrong
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("y", "yes", "true", "1"):
            return True
        if lowered in ("n", "no", "false", "0"):
            return False
        return text
    if kind in ("array", "object"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


class Answerer:
    """Answers each input-required of one run: from ``answers`` when given, else on the
    terminal when there is one (``asker``), else fails the input with a clear message.

    ``pause``/``resume`` stop the live view while a question is on the terminal; questions are
    asked one at a time."""

    def __init__(
        self,
        answers: AnswersFile | None,
        asker: TerminalAsker | None,
        *,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
        why_not: str = "",
    ) -> None:
        self.answers, self.asker = answers, asker
        self.pause, self.resume = pause, resume
        self.why_not = why_not
        self._one_at_a_time = asyncio.Lock()

    async def handle(self, ask: Ask, submit: Submit, fail: Callable[[str], None]) -> None:
        """Answer ``ask`` through ``submit``; ``fail(message)`` when there is no answer."""
        if self.answers is not None:
            try:
                value = self.answers.value_for(ask)
            except NoAnswer as exc:
                fail(str(exc))
                return
            refused = await submit(value)
            if refused:
                listed = "; ".join(f"{k}: {v}" for k, v in refused.items())
                fail(f"the answer in --answers {self.answers.path} was refused: {listed}")
            return
        if self.asker is None:
            fail(f"no answer: {self.why_not}; give the answers with --answers FILE.json")
            return
        async with self._one_at_a_time:
            self.pause()
            try:
                problems: dict[str, str] | None = None
                while True:
                    try:
                        value = await _in_thread(self.asker.ask, ask, problems)
                    except (EOFError, KeyboardInterrupt):
                        fail("no answer: the terminal input ended")
                        return
                    problems = await submit(value)
                    if not problems:
                        return
            finally:
                self.resume()


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a daemon thread: a prompt still waiting when the run ends (Ctrl-C,
    a timeout) does not keep the process alive, as ``asyncio.to_thread`` would."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def work() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # EOF on stdin, Ctrl-D: the caller decides
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=work, name="stagecast-ask", daemon=True).start()
    return await future


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
