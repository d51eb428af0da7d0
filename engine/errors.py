"""Errors, in two branches: the author's chain is wrong, or a run failed.

ChainError
├── ChainSpecError        the chain YAML is wrong; holds every Problem found (file:line:col)
├── InputError            the run's inputs do not match the chain's declared inputs
├── ModelConfigError      configs/models.yaml is wrong, or a model name is unknown
├── CollectionError       a document collection is missing, unreadable, empty or unknown
└── StageError            a stage failed while running (raised inside the orchestrator)
    ├── TransientError    worth retrying (timeouts, connection drops, 429, 5xx, bad JSON)
    └── TemplateError     a template failed to render (undefined value, sandbox violation)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ChainError",
    "ChainSpecError",
    "CollectionError",
    "InputError",
    "ModelConfigError",
    "Problem",
    "StageError",
    "TemplateError",
    "TransientError",
]


class ChainError(Exception):
    """Base of every error Stagecast raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a chain file, with where it is and how to fix it."""

    file: str
    line: int | None
    col: int | None
    key: str
    problem: str
    hint: str = ""

    def __str__(self) -> str:
        if not self.file and self.line is None and not self.key:  # a problem of no one file
            return self.problem + (f"\n  hint: {self.hint}" if self.hint else "")
        where = f"{self.file}:{self.line or '?'}:{self.col or '?'}"
        text = f"{where}: {self.key}: {self.problem}" if self.key else f"{where}: {self.problem}"
        return text + (f"\n  hint: {self.hint}" if self.hint else "")


class ChainSpecError(ChainError):
    """The chain YAML is wrong. ``problems`` lists everything found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.col or 0, p.key))
        super().__init__("\n".join(str(p) for p in self.problems))

    @classmethod
    def single(
        cls, path: Path | str, line: int | None, key: str, problem: str, hint: str = ""
    ) -> ChainSpecError:
        return cls([Problem(str(path), line, None, key, problem, hint)])


class InputError(ChainError):
    """The run's inputs are wrong. ``errors`` maps a field path to its problem."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"inputs.{k}: {v}" for k, v in errors.items()))


class ModelConfigError(ChainError):
    """A model entry is unknown or unusable (names the entry and what to fix, never a secret)."""


class CollectionError(ChainError):
    """A collection cannot be used: missing, unreadable, empty or unknown (names the path)."""


class StageError(ChainError):
    """A stage failed. ``type`` is the short kind that goes into the event's error object."""

    type: str = "stage_error"

    def __init__(self, message: str, *, type: str | None = None) -> None:
        super().__init__(message)
        if type is not None:
            self.type = type


class TransientError(StageError):
    """A failure worth retrying with backoff; ``retry_after`` (seconds) when the server said."""

    type = "transient"

    def __init__(
        self, message: str, *, type: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, type=type)
        self.retry_after = retry_after


class TemplateError(StageError):
    """A template failed to render at run time."""

    type = "template_error"
