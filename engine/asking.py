"""Input stages: what a paused run waits for, and how an answer is checked.

A run that reaches an ``input`` stage registers a ``PendingInput`` (keyed by the stage's path),
emits ``input-required`` and waits on the pending input's future. ``ChainRun.answer`` resolves it:
a value that does not match the stage's schema is refused with ``AnswerRefused`` (field path ->
problem; the run keeps waiting and emits nothing), an answer for a path that is not waiting gets
``NotWaiting`` (naming what is waiting). The first valid answer wins: the pending input is removed
before its future is resolved, so a second answer to the same path is ``NotWaiting``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

__all__ = ["AnswerRefused", "NotWaiting", "PendingInput", "answer_problems", "path_text"]

Path = list[str | int]

_TYPE_WORDS = {
    "string": "text",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


@dataclass(eq=False)
class PendingInput:
    """One ``input-required`` that has no answer yet."""

    stage: str
    path: Path
    prompt: str
    schema: dict[str, Any]
    expires_at: int | None
    future: asyncio.Future[Any] = field(repr=False)
    validator: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """What ``GET /v1/runs/{id}`` shows under ``pending_input``."""
        return {
            "stage": self.stage,
            "path": list(self.path),
            "prompt": self.prompt,
            "schema": self.schema,
            "expires_at": self.expires_at,
        }


class AnswerRefused(Exception):
    """The answer does not match the input's schema. ``problems``: field path -> problem, with
    ``value`` for the answer itself (``value.count`` for its ``count`` property)."""

    def __init__(self, stage: str, path: Path, problems: dict[str, str]) -> None:
        self.stage, self.path, self.problems = stage, path, problems
        listed = "; ".join(f"{k}: {v}" for k, v in problems.items())
        super().__init__(f"the answer to {path_text(path)} was refused: {listed}")


class NotWaiting(Exception):
    """Nothing waits for an answer at that stage and path. ``waiting`` lists what does."""

    def __init__(self, stage: str, path: Path | None, waiting: list[PendingInput]) -> None:
        self.stage, self.path = stage, path
        self.waiting = [{"stage": p.stage, "path": list(p.path)} for p in waiting]
        asked = path_text(path) if path else stage
        if waiting:
            now = ", ".join(path_text(p.path) for p in waiting)
            message = f"{asked} is not waiting for input; waiting: {now}"
        else:
            message = f"{asked} is not waiting for input; the run is not waiting for any"
        super().__init__(message)


def path_text(path: Path | None) -> str:
    """``["interview", 2, "answer"]`` -> ``interview[2].answer``."""
    if not path:
        return "(run)"
    out = str(path[0])
    for part in path[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def compile_validator(schema: dict[str, Any]) -> Any:
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def answer_problems(validator: Any, value: Any) -> dict[str, str]:
    """Every problem of ``value``, by field path (``value``, ``value.count``, ``value.items[2]``);
    the first problem of each field, in a sentence a form can show beside the field."""
    problems: dict[str, str] = {}
    for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        base = "value" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        if error.validator == "required" and isinstance(error.instance, dict):
            for name in error.validator_value:
                if name not in error.instance:
                    problems.setdefault(f"{base}.{name}", "required")
            continue
        problems.setdefault(base, _sentence(error))
    return problems


def _sentence(error: Any) -> str:
    kind, expected = error.validator, error.validator_value
    if kind == "type":
        names = expected if isinstance(expected, list) else [expected]
        return "expected " + " or ".join(_TYPE_WORDS.get(n, str(n)) for n in names)
    if kind == "minLength":
        if expected == 1 and error.instance == "":
            return "required"
        return f"at least {expected} characters"
    if kind == "maxLength":
        return f"at most {expected} characters"
    if kind == "minimum":
        return f"at least {expected}"
    if kind == "maximum":
        return f"at most {expected}"
    if kind == "enum":
        return "one of: " + ", ".join(str(v) for v in expected)
    if kind == "minItems":
        return f"at least {expected} items"
    if kind == "maxItems":
        return f"at most {expected} items"
    message: str = error.message
    return message
