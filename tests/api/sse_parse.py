"""A strict little SSE parser for tests: frames exactly as the server wrote them."""

from __future__ import annotations

import json
from typing import Any


def parse_frames(text: str) -> list[dict[str, Any]]:
    """Each blank-line-terminated block as {field: value}; comments under "comment"."""
    frames: list[dict[str, Any]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(": ")
            if line.startswith(":"):
                frame.setdefault("comment", []).append(line[1:].strip())
            else:
                assert name in ("id", "event", "data", "retry"), line
                assert name not in frame, f"field {name} twice in {block!r}"
                frame[name] = value
        frames.append(frame)
    return frames


def complete(text: str) -> str:
    """The frames received whole: up to the last blank line (a frame cut mid-way is not one;
    the opener and pings are lines, not frames, so a stream may start with none)."""
    end = text.rfind("\n\n")
    return text[: end + 2] if end >= 0 else ""


def events_of(text: str) -> list[dict[str, Any]]:
    """The events (frames with data), decoded, after checking id/event match the JSON."""
    out = []
    for frame in parse_frames(text):
        if "data" not in frame:
            continue
        event = json.loads(frame["data"])
        assert frame["id"] == str(event["seq"]) and frame["event"] == event["type"], frame
        out.append(event)
    return out
