"""Memory: peak RSS of one long advanced_summary run, and the memory of 1,000 finished runs kept
for replay.

Each measurement runs in a fresh subprocess (this script re-invoked with ``--child``), so peak RSS
(``ru_maxrss``) belongs to that measurement alone:

- ``baseline``: a process that imports the engine and loads the chain, nothing else;
- ``long-run``: one advanced_summary run over a 400,000-character document on the offline model,
  every event serialized and appended to the API's in-memory event log (``api.eventlog``; a plain
  list of wire JSON strings when it does not exist), as the server would;
- ``replay``: 1,000 finished runs (advanced_summary over chains/examples/quarterly_report.md,
  offline model) kept in the in-memory event log: RSS growth and tracemalloc bytes per run, next
  to the bytes of wire JSON per run (what an uncompressed log of serialized events holds) and
  the bytes the log actually holds (frames; zlib blocks once a run is finished).

    python bench/bench_memory.py          # ~30 s
    python bench/bench_memory.py --smoke  # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

WORDS = (
    "revenue margin customer pipeline latency deployment region quarter forecast churn "
    "contract renewal incident migration roadmap hiring budget vendor compliance audit "
    "throughput backlog release feature partner pricing inventory logistics warehouse "
    "analytics retention onboarding security outage capacity storage network"
).split()


def make_document(chars: int) -> str:
    """Deterministic prose-like text with paragraphs and sentences, ``chars`` long."""
    out: list[str] = []
    size = 0
    state = 12345
    sentence = 0
    while size < chars:
        words = []
        for _ in range(8 + sentence % 11):
            state = (state * 1103515245 + 12345) & 0x7FFFFFFF
            words.append(WORDS[state % len(WORDS)])
        text = " ".join(words).capitalize() + f" in {2000 + sentence % 26}. "
        sentence += 1
        if sentence % 7 == 0:
            text += "\n\n"
        out.append(text)
        size += len(text)
    return "".join(out)[:chars]


def load_summary_chain() -> tuple[Any, str]:
    from stagecast.engine.loading import load_chain

    return load_chain(C.ROOT / "chains" / "advanced_summary.yaml"), "chains/advanced_summary.yaml"


def new_log() -> tuple[Any, str]:
    try:
        from stagecast.api.memlog import InMemoryEventLog
    except ImportError:
        return None, "list of wire JSON strings"
    return InMemoryEventLog(max_events=1_000_000, ttl=1e9), "stagecast.api.memlog.InMemoryEventLog"


def make_sink(log: Any, run_id: str, store: list[str]) -> Any:
    from stagecast.engine.events import event_to_json

    if log is None:
        return lambda event: store.append(event_to_json(event))
    from stagecast.api.eventlog import LogEntry

    log.create(run_id)

    def sink(event: Any) -> None:
        log.append(run_id, LogEntry(event.seq, event.type, event_to_json(event)))
        if event.type == "run-end":
            log.finish(run_id)

    return sink


def logged_entries(log: Any, run_ids: list[str]) -> list[Any]:
    """Every event the log holds for these runs (``entries()`` since the log stores frames)."""
    if hasattr(log, "entries"):
        return [e for run_id in run_ids for e in log.entries(run_id)]
    return [e for run_id in run_ids for e in log._runs[run_id].entries]


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# --------------------------------------------------------------------------------------------
# Children


def child_baseline(_: argparse.Namespace) -> dict[str, Any]:
    load_summary_chain()
    from stagecast.engine.offline import OfflineChatModel  # noqa: F401

    gc.collect()
    return {"maxrss_kib": maxrss_kib(), "rss_kib": C.proc_rss_kib(os.getpid())[0]}


def child_long_run(args: argparse.Namespace) -> dict[str, Any]:
    from stagecast.engine.orchestrator import ChainRun

    chain, source = load_summary_chain()
    log, log_kind = new_log()
    document = make_document(args.chars)
    gc.collect()
    before = maxrss_kib()
    store: list[str] = []
    run_id = "run_long"
    sink = make_sink(log, run_id, store)
    run = ChainRun(chain, {"document": document}, model="offline", run_id=run_id, sink=sink)
    t0 = time.perf_counter()
    end = asyncio.run(run.execute())
    elapsed = time.perf_counter() - t0
    if end.status != "succeeded":
        raise SystemExit(f"the run ended {end.status}: {end.error}")
    peak = maxrss_kib()  # before reading the events back for the figures below
    if log is not None:
        entries = logged_entries(log, [run_id])
        events, wire = len(entries), sum(len(e.data.encode()) for e in entries)
    else:
        events, wire = len(store), sum(len(s.encode()) for s in store)
    return {
        "maxrss_kib": peak,
        "before_kib": before,
        "events": events,
        "wire_bytes": wire,
        "seconds": elapsed,
        "chain": source,
        "log": log_kind,
        "chars": len(document),
        "sections": end.outputs.get("sections") if isinstance(end.outputs, dict) else None,
    }


def child_replay(args: argparse.Namespace) -> dict[str, Any]:
    import tracemalloc

    from stagecast.engine.orchestrator import ChainRun

    chain, source = load_summary_chain()
    log, log_kind = new_log()
    document = (C.ROOT / "chains" / "examples" / "quarterly_report.md").read_text()
    store: list[str] = []

    async def run_all(n: int, prefix: str) -> None:
        for i in range(n):
            run_id = f"{prefix}{i:06d}"
            sink = make_sink(log, run_id, store)
            run = ChainRun(chain, {"document": document}, model="offline", run_id=run_id, sink=sink)
            end = await run.execute()
            assert end.status == "succeeded", end.error

    asyncio.run(run_all(20, "warm"))  # caches, templates, interned strings
    if log is not None:
        for run_id in list(log._runs):
            log.discard(run_id)
    store.clear()
    gc.collect()
    if args.tracemalloc:
        tracemalloc.start()
        base_traced = tracemalloc.get_traced_memory()[0]
    rss0 = C.proc_rss_kib(os.getpid())[0]
    t0 = time.perf_counter()
    asyncio.run(run_all(args.runs, "run_"))
    elapsed = time.perf_counter() - t0
    gc.collect()
    rss1 = C.proc_rss_kib(os.getpid())[0]
    traced = tracemalloc.get_traced_memory()[0] - base_traced if args.tracemalloc else None
    log_bytes = None
    if log is not None:
        log_bytes = log.stored_bytes() if hasattr(log, "stored_bytes") else None
        entries = logged_entries(log, list(log._runs))
        events, wire = len(entries), sum(len(e.data.encode()) for e in entries)
    else:
        events, wire = len(store), sum(len(s.encode()) for s in store)
    by_type: dict[str, int] = {}
    if log is not None:
        for e in entries:
            by_type[e.type] = by_type.get(e.type, 0) + len(e.data.encode())
    return {
        "runs": args.runs,
        "rss_delta_kib": rss1 - rss0,
        "traced_bytes": traced,
        "events": events,
        "wire_bytes": wire,
        "seconds": elapsed,
        "log": log_kind,
        "chain": source,
        "wire_by_type": by_type,
        "log_bytes": log_bytes,
    }


CHILDREN = {"baseline": child_baseline, "long-run": child_long_run, "replay": child_replay}


def spawn(mode: str, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=C.ROOT, timeout=600)
    if out.returncode:
        raise SystemExit(f"child {mode} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars", type=int, default=400_000, help="document length")
    parser.add_argument("--runs", type=int, default=1000, help="finished runs kept for replay")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each child")
    parser.add_argument(
        "--smoke", action="store_true", help="small document, 40 runs, 1 repetition"
    )
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--tracemalloc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if args.smoke:
        args.chars, args.runs, args.reps = 40_000, 40, 1

    sizes = ["--chars", str(args.chars), "--runs", str(args.runs)]
    base, long, replay, traced = [], [], [], []
    for rep in range(args.reps):  # interleaved
        base.append(spawn("baseline", *sizes))
        long.append(spawn("long-run", *sizes))
        if rep < 2:  # the replay child is the slow one (~15 s): two repetitions
            replay.append(spawn("replay", *sizes))
    # tracemalloc slows allocation ~2×; a quarter of the runs gives the same per-run figure.
    traced.append(spawn("replay", "--runs", str(max(10, args.runs // 4)), "--tracemalloc"))

    C.header(
        f"Memory ({args.reps} repetitions of the long run, {len(replay)} of the replay; "
        "medians; each in a fresh process)"
    )
    base_kib = C.median([b["maxrss_kib"] for b in base])
    peak_kib = C.median([r["maxrss_kib"] for r in long])
    info = long[0]
    rows = [
        ["baseline: import engine + load chain (peak RSS)", mib(base_kib), ""],
        [
            f"long run: {info['chars']:,} chars, {info['sections']} sections (peak RSS)",
            mib(peak_kib),
            f"{C.spread([r['maxrss_kib'] for r in long])} noise",
        ],
        ["long run minus baseline", mib(peak_kib - base_kib), ""],
        [
            "long run: events / wire JSON kept",
            f"{info['events']:,} / {info['wire_bytes'] / 2**20:.1f} MiB",
            f"{C.median([r['seconds'] for r in long]):.2f} s run time",
        ],
    ]
    print(f"chain: {info['chain']}; events stored in: {info['log']}\n")
    print(C.table(["what", "value", "note"], rows))

    r0 = replay[0]
    per_run_rss = C.median([r["rss_delta_kib"] / r["runs"] for r in replay])
    per_run_traced = traced[0]["traced_bytes"] / traced[0]["runs"] / 1024
    per_run_wire = r0["wire_bytes"] / r0["runs"] / 1024
    rows = [
        [
            f"{r0['runs']:,} finished runs: RSS growth",
            mib(C.median([r["rss_delta_kib"] for r in replay])),
            f"{C.spread([r['rss_delta_kib'] for r in replay])} noise",
        ],
        ["per run: RSS growth", f"{per_run_rss:.1f} KiB", ""],
        [
            "per run: tracemalloc (live Python objects)",
            f"{per_run_traced:.1f} KiB",
            f"over {traced[0]['runs']} runs",
        ],
        [
            "per run: wire JSON bytes",
            f"{per_run_wire:.1f} KiB",
            f"{r0['events'] / r0['runs']:.0f} events per run",
        ],
    ]
    if r0.get("log_bytes") is not None:
        rows.append(
            [
                "per run: bytes the log holds (`stored_bytes()`)",
                f"{r0['log_bytes'] / r0['runs'] / 1024:.1f} KiB",
                "frames, zlib blocks once finished, + offsets",
            ]
        )
    by_type = sorted(r0["wire_by_type"].items(), key=lambda kv: -kv[1])
    print(
        f"\nreplay: {r0['runs']:,} runs of {r0['chain']} over "
        f"chains/examples/quarterly_report.md (offline model), kept in {r0['log']}\n"
    )
    print(C.table(["what", "value", "note"], rows))
    if by_type:
        total = sum(v for _, v in by_type)
        print(
            "\nwire bytes by event type: "
            + ", ".join(f"{k} {v / total * 100:.0f}%" for k, v in by_type)
        )


if __name__ == "__main__":
    main()
