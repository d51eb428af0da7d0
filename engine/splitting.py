"""Split a text into chunks, preferring paragraph, then sentence, then word boundaries."""

from __future__ import annotations

import re
from typing import TypedDict

__all__ = ["Chunk", "split_text"]

_SENTENCE_END = re.compile(r"[.!?。！？…](?:[\"')\]]*)\s+|\n")


class Chunk(TypedDict):
    index: int
    text: str
    start: int
    end: int


def _break_at(text: str, start: int, end: int) -> int:
    """The best place in text[start:end] to end a chunk, looking in its second half."""
    floor = start + (end - start) // 2
    para = text.rfind("\n\n", floor, end)
    if para != -1:
        return para + 2
    last = -1
    for match in _SENTENCE_END.finditer(text, floor, end):
        last = match.end()
    if last != -1:
        return last
    space = text.rfind(" ", floor, end)
    return space + 1 if space != -1 else end


def split_text(text: str, chunk_size: int, overlap: int = 0) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` characters; ``start``/``end`` index into ``text``."""
    if overlap >= chunk_size:
        raise ValueError("overlap must be smaller than chunk_size")
    chunks: list[Chunk] = []
    n = len(text)
    start = 0
    while start < n:
        end = n if n - start <= chunk_size else _break_at(text, start, start + chunk_size)
        piece = text[start:end]
        if piece.strip():
            chunks.append(Chunk(index=len(chunks), text=piece, start=start, end=end))
        if end >= n:
            break
        nxt = end - overlap if overlap else end
        if overlap:
            space = text.find(" ", nxt, end)
            nxt = space + 1 if space != -1 else nxt
        start = max(nxt, start + 1)
    return chunks
