"""``stagecast diff A.ndjson B.ndjson``: two recorded runs, stage by stage.

What an author reads after changing a prompt: per top-level stage its status, duration and
usage in A and in B (and whether B reused A's output), then a unified diff of each output that
changed, then of the run's outputs.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from stagecast.engine.events import RunEnded, StageEnded, Usage
from stagecast.engine.reuse import Recording

__all__ = ["diff_recordings"]


def _ends(recording: Recording) -> dict[str, StageEnded]:
    return {
        str(e.path[0]): e
        for e in recording.events
        if isinstance(e, StageEnded) and e.path is not None and len(e.path) == 1
    }


def _run_end(recording: Recording) -> RunEnded | None:
    last = recording.events[-1]
    return last if isinstance(last, RunEnded) else None


def _usage(usage: Usage) -> str:
    text = f"{usage.input_tokens}/{usage.output_tokens} tok"
    if usage.cost is not None:
        text += f" ${usage.cost:.4f}"
    return text


def _cell(end: StageEnded | None) -> str:
    if end is None:
        return "(not run)"
    text = f"{end.status} {end.duration_ms} ms {_usage(end.usage)}"
    return text + (" reused" if end.reused else "")


def _text(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text.splitlines(keepends=False)


def _unified(a: Any, b: Any, name: str) -> list[str]:
    return list(
        difflib.unified_diff(_text(a), _text(b), f"A/{name}", f"B/{name}", lineterm="", n=2)
    )


def _summary(label: str, recording: Recording) -> str:
    start = recording.start
    end = _run_end(recording)
    chain = f"{start.chain.id} v{start.chain.version}"
    if end is None:
        tail = "no run-end (cut off)"
    else:
        tail = f"{end.status} in {end.duration_ms} ms · {_usage(end.usage)}"
    return f"{label}: {recording.name} · {start.run_id} · {chain} · model {start.model} · {tail}"


def diff_recordings(a: Recording, b: Recording) -> str:
    """The report, as text ending with a newline."""
    lines = [_summary("A", a), _summary("B", b)]
    if a.start.inputs != b.start.inputs:
        changed = sorted(
            k
            for k in a.start.inputs.keys() | b.start.inputs.keys()
            if a.start.inputs.get(k) != b.start.inputs.get(k)
        )
        lines.append("inputs changed: " + ", ".join(changed))
    ends_a, ends_b = _ends(a), _ends(b)
    order = [s.stage for s in a.start.plan]
    order += [s.stage for s in b.start.plan if s.stage not in order]
    width = max([len(s) for s in order] + [5])
    cells = [(stage, _cell(ends_a.get(stage)), _cell(ends_b.get(stage))) for stage in order]
    width_a = max([len(c[1]) for c in cells] + [1])
    width_b = max([len(c[2]) for c in cells] + [1])
    lines.append("")
    lines.append(f"{'stage':<{width}}  {'A':<{width_a}}  B")
    diffs: list[str] = []
    for stage, cell_a, cell_b in cells:
        end_a, end_b = ends_a.get(stage), ends_b.get(stage)
        out_a = end_a.output if end_a is not None else None
        out_b = end_b.output if end_b is not None else None
        same = "same output" if out_a == out_b else "output changed"
        lines.append(f"{stage:<{width}}  {cell_a:<{width_a}}  {cell_b:<{width_b}}  {same}")
        if out_a != out_b:
            diffs.extend(["", f"== {stage} ==", *_unified(out_a, out_b, stage)])
    run_a, run_b = _run_end(a), _run_end(b)
    outputs_a = run_a.outputs if run_a is not None else None
    outputs_b = run_b.outputs if run_b is not None else None
    lines.extend(diffs)
    lines.append("")
    if outputs_a == outputs_b:
        lines.append("run outputs: the same")
    else:
        lines.extend(["== run outputs ==", *_unified(outputs_a, outputs_b, "outputs")])
    return "\n".join(lines) + "\n"
