"""In-process overhead: µs per token event, Stagecast vs the alternatives, same workload, same run.

Workload: 3 sequential stages × N tokens (2,000), each stage's prompt holding the previous
stage's output, one fake chat model with a native ``_astream`` (one chunk per token, no sleeps)
shared by every contender. Contenders run interleaved (the order rotates every repetition);
figures are medians; ratios are taken per repetition, then the median ratio is reported.

    python bench/bench_inprocess.py              # ~1 min
    python bench/bench_inprocess.py --uvloop     # same on uvloop
    python bench/bench_inprocess.py --profile stagecast   # pyinstrument profile of one contender
    python bench/bench_inprocess.py --smoke      # seconds, checks it still runs
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

CHAIN_YAML = """
id: bench_three_stages
title: Three stages, each fed the previous output
inputs:
  topic: {type: string, default: streaming benchmarks}
defaults:
  model: fake
stages:
  - id: first
    kind: llm
    prompt: "Write about {{ inputs.topic }}."
  - id: second
    kind: llm
    prompt: "Continue this text: {{ stages.first.output }}"
  - id: third
    kind: llm
    prompt: "Continue this text: {{ stages.second.output }}"
"""

Contender = Callable[[], Awaitable[int]]


def build_contenders(tokens: int, *, extras: bool) -> dict[str, Contender]:
    from langchain_core.messages import HumanMessage

    model = C.make_fake_model(tokens)
    words = [f"w{i % 997} " for i in range(tokens)]
    topic = "streaming benchmarks"

    # -- the floor: plain async generators, no model -----------------------------------------
    async def floor_stage(prompt: str) -> Any:
        for word in words:
            yield word

    async def floor_run() -> Any:
        prompt = f"Write about {topic}."
        for stage in ("first", "second", "third"):
            parts = []
            async for text in floor_stage(prompt):
                parts.append(text)
                yield stage, text
            prompt = "Continue this text: " + "".join(parts)

    async def floor() -> int:
        n = 0
        async for _stage, _text in floor_run():
            n += 1
        return n

    # -- hand-written loop over BaseChatModel.astream() --------------------------------------
    async def astream_run() -> Any:
        prompt = f"Write about {topic}."
        for stage in ("first", "second", "third"):
            parts = []
            async for chunk in model.astream([HumanMessage(prompt)]):
                text = chunk.content
                if text:
                    parts.append(text)
                    yield stage, text
            prompt = "Continue this text: " + "".join(parts)

    async def astream_loop() -> int:
        n = 0
        async for _stage, _text in astream_run():
            n += 1
        return n

    # -- Stagecast: run_chain over a chain loaded from YAML text ----------------------------
    from stagecast.engine.loading import load_chain_text
    from stagecast.engine.orchestrator import ChainRun, run_chain

    chain = load_chain_text(CHAIN_YAML, filename="bench_three_stages.yaml")
    models = {"fake": model}

    async def stagecast() -> int:
        n = 0
        async for event in run_chain(chain, {"topic": topic}, models=models):
            if event.type == "token":
                n += 1
        return n

    async def stagecast_sink() -> int:
        count = [0]

        def sink(event: Any) -> None:
            if event.type == "token":
                count[0] += 1

        await ChainRun(chain, {"topic": topic}, models=models, sink=sink).execute()
        return count[0]

    # -- LangGraph: 3-node StateGraph, stream_mode="messages" --------------------------------
    langgraph = None if C.missing("langgraph") else _langgraph_contender(model, topic)

    # -- LCEL astream_events(version="v2") ---------------------------------------------------
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.runnables import RunnableLambda

    def lcel_chain(parser: bool) -> Any:
        steps: list[Any] = [RunnableLambda(lambda t: [HumanMessage(f"Write about {t}.")])]
        for i in range(3):
            if i:
                steps.append(
                    RunnableLambda(
                        (lambda s: [HumanMessage("Continue this text: " + s)])
                        if parser
                        else (lambda m: [HumanMessage("Continue this text: " + m.content)])
                    )
                )
            steps.append(model)
            if parser:
                steps.append(StrOutputParser())
        chain_ = steps[0]
        for step in steps[1:]:
            chain_ = chain_ | step
        return chain_

    lcel_parser, lcel_bare = lcel_chain(True), lcel_chain(False)

    def events(runnable: Any) -> Contender:
        async def run() -> int:
            n = 0
            async for ev in runnable.astream_events(topic, version="v2"):
                if ev["event"] == "on_chat_model_stream" and ev["data"]["chunk"].content:
                    n += 1
            return n

        return run

    contenders: dict[str, Contender] = {
        "floor (plain async generators)": floor,
        "hand-written astream() loop": astream_loop,
        "Stagecast run_chain": stagecast,
    }
    if extras:
        contenders["Stagecast ChainRun + sink"] = stagecast_sink
    if langgraph is not None:
        contenders["LangGraph stream_mode=messages"] = langgraph
    contenders["LCEL astream_events v2"] = events(lcel_parser)
    if extras:
        contenders["LCEL astream_events v2, no StrOutputParser"] = events(lcel_bare)
    return contenders


async def measure(fn: Contender) -> tuple[float, float, int]:
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    n = await fn()
    t1, cpu1 = time.perf_counter(), time.process_time()
    return t1 - t0, cpu1 - cpu0, n


async def main_async(args: argparse.Namespace) -> None:
    contenders = build_contenders(args.tokens, extras=not args.no_extras)
    names = list(contenders)
    expected = 3 * args.tokens
    for name, fn in contenders.items():  # warm-up, and every contender sees every token
        _, _, n = await measure(fn)
        if n != expected:
            raise SystemExit(f"{name}: {n} token events, expected {expected}")
    if args.profile:
        await profile(contenders, args.profile, expected)
        return
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            w, c, n = await measure(contenders[name])
            wall[name].append(w / n * 1e6)
            cpu[name].append(c / n * 1e6)

    base = "hand-written astream() loop"
    ours = "Stagecast run_chain"

    def ratio(a: str, b: str, src: dict[str, list[float]]) -> float:
        return C.median([x / y for x, y in zip(src[a], src[b], strict=True)])

    rows = []
    for name in names:
        rows.append(
            [
                name,
                C.fmt(C.median(wall[name])),
                C.spread(wall[name]),
                C.fmt(C.median(cpu[name])),
                C.fmt(ratio(name, base, wall)),
                C.fmt(ratio(name, ours, wall)),
            ]
        )
    C.header(
        "In-process overhead: µs per token event (3 stages × "
        f"{args.tokens:,} tokens, {args.reps} interleaved repetitions, "
        f"{'uvloop' if args.uvloop else 'asyncio'} loop)"
    )
    print(
        C.table(
            [
                "contender",
                "µs/token (wall, median)",
                "noise (min–max)",
                "µs/token (CPU)",
                "× hand-written (per-rep median)",
                "× Stagecast",
            ],
            rows,
        )
    )
    r = ratio(ours, base, wall)
    print(
        f"\ntarget: Stagecast ≤ 1.3× hand-written astream loop → {r:.2f}× "
        f"({'met' if r <= 1.3 else 'MISSED'})"
    )
    lg = "LangGraph stream_mode=messages"
    ev = "LCEL astream_events v2"
    langgraph = (
        f"LangGraph / Stagecast = {ratio(lg, ours, wall):.1f}× (goal ≥ 2.5×)"
        if lg in wall
        else "LangGraph: not measured (langgraph is not installed)"
    )
    print(f"{langgraph}; astream_events / Stagecast = {ratio(ev, ours, wall):.1f}× (goal ≥ 15×)")


async def profile(contenders: dict[str, Contender], which: str, expected: int) -> None:
    from pyinstrument import Profiler

    match = [k for k in contenders if which.lower() in k.lower()]
    if not match:
        raise SystemExit(f"no contender matches {which!r}; contenders: {', '.join(contenders)}")
    fn = contenders[match[0]]
    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    for _ in range(5):
        await fn()
    profiler.stop()
    print(profiler.output_text(unicode=True, color=False, show_all=False))


def _langgraph_contender(model: Any, topic: str) -> Contender:
    from typing import TypedDict

    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, StateGraph

    class State(TypedDict, total=False):
        topic: str
        first: str
        second: str
        third: str

    def node(name: str, template: str, source: str) -> Any:
        async def run(state: State) -> dict[str, str]:
            message = await model.ainvoke([HumanMessage(template.format(state[source]))])
            return {name: message.content}

        return run

    builder = StateGraph(State)
    builder.add_node("first", node("first", "Write about {}.", "topic"))
    builder.add_node("second", node("second", "Continue this text: {}", "first"))
    builder.add_node("third", node("third", "Continue this text: {}", "second"))
    builder.add_edge(START, "first")
    builder.add_edge("first", "second")
    builder.add_edge("second", "third")
    builder.add_edge("third", END)
    graph = builder.compile()

    async def langgraph() -> int:
        n = 0
        async for message, _meta in graph.astream({"topic": topic}, stream_mode="messages"):
            if message.content:
                n += 1
        return n

    return langgraph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per stage")
    parser.add_argument("--reps", type=int, default=11, help="interleaved repetitions")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the extra rows (ChainRun sink, LCEL without parser)",
    )
    parser.add_argument(
        "--profile",
        metavar="CONTENDER",
        help="print a pyinstrument profile of one contender instead",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny workload, 2 repetitions")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.reps = 200, 2
    C.run_async(main_async(args), uvloop=args.uvloop)


if __name__ == "__main__":
    main()
