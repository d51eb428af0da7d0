"""Where every key and value of a chain file is: key paths mapped to lines and columns.

``loading`` builds a ``SourceMap`` from one ``yaml.compose`` parse; problems found later (pydantic
errors, cross-stage checks) ask it for the position of a key path, or of a line inside a
template, so every message points at the file.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from stagecast.engine.errors import Problem
from stagecast.engine.spec import STAGE_ID_PATTERN

__all__ = ["KeyPath", "SourceMap", "Span"]

KeyPath = tuple[str | int, ...]
"""Where a value sits in the chain document: ``("stages", 0, "prompt", "user")``."""

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Span:
    """Where one key and its value start in the file (1-based lines and columns)."""

    key_line: int
    key_col: int
    line: int
    col: int
    end_line: int
    style: str | None = None
    """The scalar style of the value: None (plain), ``|``, ``>``, ``'`` or ``"``."""


@dataclass
class SourceMap:
    """Key paths of a chain document -> their positions, plus the plain data they hold."""

    filename: str
    text: str
    data: Any = None
    spans: dict[KeyPath, Span] = field(default_factory=dict)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def nearest(self, path: KeyPath) -> tuple[KeyPath, Span]:
        """The longest prefix of ``path`` that exists in the file, and its span."""
        for end in range(len(path), -1, -1):
            span = self.spans.get(path[:end])
            if span is not None:
                return path[:end], span
        return (), Span(1, 1, 1, 1, 1)

    def position(self, path: KeyPath, *, at_key: bool = False) -> tuple[int, int]:
        """Line and column of the value at ``path`` (or of its key), else of its nearest parent."""
        found, span = self.nearest(path)
        if at_key and found == path:
            return span.key_line, span.key_col
        return span.line, span.col

    def key(self, path: KeyPath) -> str:
        """``stages[draft].prompt.user``: a stage shows its id when it has a unique one."""
        out = ""
        for depth, seg in enumerate(path):
            if isinstance(seg, int):
                label = self._stage_labels.get(seg) if path[:depth] == ("stages",) else None
                out += f"[{label or seg}]"
            elif _PLAIN_KEY.match(seg):
                out += f".{seg}" if out else seg
            else:
                out += f"[{seg!r}]"
        return out

    @cached_property
    def _stage_labels(self) -> dict[int, str]:
        stages = self.data.get("stages") if isinstance(self.data, dict) else None
        if not isinstance(stages, list):
            return {}
        ids = [s.get("id") if isinstance(s, dict) else None for s in stages]
        return {
            i: sid
            for i, sid in enumerate(ids)
            if isinstance(sid, str) and re.match(STAGE_ID_PATTERN, sid) and ids.count(sid) == 1
        }

    def value(self, path: KeyPath) -> Any:
        """The plain value at ``path`` (None when it is not there)."""
        node = self.data
        for seg in path:
            if isinstance(node, dict) and seg in node:
                node = node[seg]
            elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
                node = node[seg]
            else:
                return None
        return node

    def problem(
        self, path: KeyPath, problem: str, hint: str = "", *, at_key: bool = False
    ) -> Problem:
        line, col = self.position(path, at_key=at_key)
        return Problem(self.filename, line, col, self.key(path), problem, hint)

    def template_position(
        self, path: KeyPath, template_line: int, needles: Collection[str] = ()
    ) -> tuple[int, int]:
        """The file position of line ``template_line`` (1-based) of the template at ``path``.

        Literal block scalars (``|``) keep their lines, so the line is exact; for other styles
        the template's lines are searched for within the value. ``needles`` (e.g.
        ``stages.outlin``) narrow the column down to the reference itself.
        """
        found, span = self.nearest(path)
        if found != path:
            return span.line, span.col
        if span.style == "|":
            candidates = [span.line + template_line]
        elif span.style == ">":
            candidates = list(range(span.line + 1, max(span.end_line, span.line + 1) + 1))
        else:
            candidates = list(range(span.line, span.end_line + 1))
        candidates = [n for n in candidates if 1 <= n <= len(self.lines)] or [span.line]
        for number in candidates:
            text = self.lines[number - 1] if number <= len(self.lines) else ""
            for needle in needles:
                index = _find_word(text, needle)
                if index >= 0 and (number > span.line or index + 1 >= span.col):
                    return number, index + 1
        number = candidates[0]
        if number == span.line:
            return number, span.col
        text = self.lines[number - 1] if number <= len(self.lines) else ""
        return number, len(text) - len(text.lstrip()) + 1

    def template_problem(
        self,
        path: KeyPath,
        template_line: int,
        problem: str,
        hint: str = "",
        needles: Collection[str] = (),
    ) -> Problem:
        line, col = self.template_position(path, template_line, needles)
        return Problem(self.filename, line, col, self.key(path), problem, hint)


def _find_word(text: str, needle: str) -> int:
    match = re.search(r"(?<![\w.])" + re.escape(needle) + r"(?![\w])", text)
    return match.start() if match else -1
