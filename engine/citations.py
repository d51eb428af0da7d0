"""Citations: ``[1]``, ``[2]`` … in an llm stage's answer, mapped to the sources it was given.

The sources are numbered from 1 in the order the prompt received them: the hits of each retrieve
stage the prompt reads, in the order of those stages in the chain. Every marker is reported once,
in order of first appearance; a marker with no source (``[7]`` of five) is reported with
``source_id`` and ``stage`` null, never dropped. ``[1, 3]`` and ``[1][2]`` cite each number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stagecast.engine.events import Citation

__all__ = ["GivenSource", "find_citations"]

GivenSource = tuple[str, str]
"""(source id, the stage that found it), numbered from 1 in prompt order."""

_MARKER = re.compile(r"\[(\d{1,4}(?:\s*,\s*\d{1,4})*)\]")


def find_citations(text: str, sources: Sequence[GivenSource]) -> list[Citation]:
    """The citation markers of ``text``, each mapped to its source (or reported unmatched)."""
    seen: dict[int, None] = {}
    for match in _MARKER.finditer(text):
        for number in match.group(1).split(","):
            seen.setdefault(int(number), None)
    citations: list[Citation] = []
    for marker in seen:
        if 1 <= marker <= len(sources):
            source_id, stage = sources[marker - 1]
            citations.append(Citation(marker=marker, source_id=source_id, stage=stage))
        else:
            citations.append(Citation(marker=marker, source_id=None, stage=None))
    return citations
