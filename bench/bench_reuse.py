"""Re-runs with reuse: what fingerprinting costs a run, and what reuse saves.

Workload: advanced_summary over a long document on the offline model (no delay), in-process.

- ``fingerprints off``: the baseline, in the same run: ``ChainRun._fingerprint`` patched to
  return None (no hashing, nothing recorded for reuse);
- ``fingerprints on``: a plain run as shipped (every stage-end carries its fingerprint);
- ``reuse, unchanged``: the same chain re-run with ``Reuse`` of the first run's recording;
- ``reuse, merge prompt edited``: one prompt changed; only merge and polish call the model.

Model calls are counted by wrapping the offline model's stream.

    python bench/bench_reuse.py            # 400,000 characters, 9 runs each
    python bench/bench_reuse.py --smoke    # 20,000 characters, 1 run each
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()


def document(chars: int) -> str:
    base = (C.ROOT / "chains" / "examples" / "quarterly_report.md").read_text(encoding="utf-8")
    text = ""
    while len(text) < chars:
        text += base + "\n\n"
    return text[:chars]


async def one(chain: Any, inputs: dict[str, Any], reuse: Any = None) -> tuple[float, int, list]:
    from stagecast.engine.offline import OfflineChatModel
    from stagecast.engine.orchestrator import run_chain

    calls: list[int] = []

    class Counting(OfflineChatModel):
        async def stream_pieces(self, messages: Any) -> Any:  # type: ignore[override]
            calls.append(1)
            async for piece in super().stream_pieces(messages):
                yield piece

    started = time.perf_counter()
    events = [e async for e in run_chain(chain, inputs, model=Counting(), reuse=reuse)]
    assert events[-1].status == "succeeded", events[-1].error
    return time.perf_counter() - started, len(calls), events


async def main(args: argparse.Namespace) -> None:
    from stagecast.engine.events import event_to_json
    from stagecast.engine.loading import load_chain
    from stagecast.engine.orchestrator import ChainRun
    from stagecast.engine.reuse import Recording, Reuse

    path = C.ROOT / "chains" / "advanced_summary.yaml"
    chain = load_chain(path)
    text = path.read_text(encoding="utf-8")
    edited_path = C.ROOT / "bench" / "out" / "advanced_summary_edited.yaml"
    edited_path.parent.mkdir(parents=True, exist_ok=True)
    edited_path.write_text(
        text.replace("Write the merged draft now.", "Write the merged draft now, briefly."),
        encoding="utf-8",
    )
    edited = load_chain(edited_path)
    inputs = {"document": document(args.chars)}
    original = ChainRun._fingerprint

    async def no_fingerprint(self: Any, unit: Any) -> None:
        return None

    rows: list[list[Any]] = []
    results: dict[str, float] = {}
    for name in ("fingerprints off", "fingerprints on"):
        ChainRun._fingerprint = no_fingerprint if name.endswith("off") else original  # type: ignore[method-assign]
        times: list[float] = []
        for _ in range(args.runs):
            seconds, calls, events = await one(chain, inputs)
            times.append(seconds)
        results[name] = C.median(times)
        rows.append([name, f"{C.median(times) * 1000:.1f}", C.spread(times), calls, len(events)])
    ChainRun._fingerprint = original  # type: ignore[method-assign]
    _, _, first = await one(chain, inputs)
    recording = Recording.from_lines([event_to_json(e) for e in first])
    for name, target in (("reuse, unchanged", chain), ("reuse, merge prompt edited", edited)):
        times = []
        for _ in range(args.runs):
            seconds, calls, events = await one(target, {}, Reuse(recording, target))
            times.append(seconds)
        results[name] = C.median(times)
        rows.append([name, f"{C.median(times) * 1000:.1f}", C.spread(times), calls, len(events)])
    C.header("Reuse: fingerprint cost and re-run savings (advanced_summary, offline model)")
    sections = len(next(e for e in first if e.type == "stage-end" and e.stage == "sections").output)
    print(f"document: {args.chars:,} characters, {sections} sections; {args.runs} runs each\n")
    print(C.table(["run", "median ms", "spread", "model calls", "events"], rows))
    overhead = results["fingerprints on"] / results["fingerprints off"]
    print(
        f"\ntarget: fingerprinting costs a run ≤ 1.10× the run without it → {overhead:.2f}× "
        f"({'met' if overhead <= 1.10 else 'missed'})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny workload, no claims")
    parser.add_argument("--chars", type=int, default=400_000)
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    if args.smoke:
        args.chars, args.runs = 20_000, 1
    asyncio.run(main(args))
