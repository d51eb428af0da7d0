"""Real-wire cost: CPU µs per streamed token through a local OpenAI-wire server, per contender.

The server (``bench/_servers.py wire``, bench/_wire.py) runs in its own process and streams
``--tokens`` chat-completion chunks per request as fast as it can; only this process's CPU
(``time.process_time()``) is counted, so the figures are the client side's alone: what a
Stagecast worker spends per token of a real model. Contenders, interleaved, the order rotating
every repetition, each making ``--requests`` requests per repetition:

* ``floor (httpx)`` / ``floor (httpx2)``: POST, read the SSE lines (``aiter_lines``), orjson-parse
  each ``data:`` payload, take ``choices[0].delta.content``: nothing else (httpx2 is the HTTP
  client the openai SDK uses, so it is the fast path's own floor);
* ``fast path, bare``: ``engine/openai_stream.py::stream_pieces`` of a registry-built model,
  read by Stagecast's own HTTP client (engine/openai_wire.py); ``…, SDK transport``: the same
  read through the SDK's httpx2 client (``stream_transport: sdk``);
* ``ChatOpenAI.astream(), bare``: the same model's ``astream()`` (``fast_stream: false``);
* ``LangGraph messages``: a one-node graph that calls the same ChatOpenAI, read with
  ``stream_mode="messages"``;
* ``Stagecast run_chain, fast path`` / ``… astream()``: a one-stage chain through the engine,
  every token a ``token`` event.

Ratios are taken per repetition, then the median. Targets (issue 14): the fast path ≤ 1/3 of
the ``astream()`` path and ≤ 2× the parse-only floor.

    python bench/bench_openai.py             # 2,000 tokens × 5 requests × 7 repetitions, ~1 min
    python bench/bench_openai.py --smoke     # tiny (~5 s)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

PROMPT = "Say something."


class State(TypedDict):
    messages: list[Any]


def registry(url: str, fast: bool, transport: str = "wire") -> Any:
    from stagecast.engine.model_config import ModelEntry, ModelsConfig
    from stagecast.engine.providers import ModelRegistry

    entry = ModelEntry(
        provider="openai",
        model="bench-model",
        base_url=url,
        key_required=False,
        max_retries=0,
        read_timeout=60,
        fast_stream=fast,
        stream_transport=transport,
    )
    return ModelRegistry(ModelsConfig(default="wire", models={"wire": entry}), environ={})


def floor(module: Any, url: str) -> Callable[[], Awaitable[int]]:
    import orjson

    client = module.AsyncClient(timeout=60)
    body = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def run() -> int:
        n = 0
        async with client.stream("POST", url + "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = orjson.loads(line[6:])
                    choices = chunk.get("choices")
                    if choices and choices[0]["delta"].get("content"):
                        n += 1
        return n

    return run


def fast_bare(url: str, transport: str = "wire") -> Callable[[], Awaitable[int]]:
    from langchain_core.messages import HumanMessage

    from stagecast.engine.openai_stream import stream_pieces

    model = registry(url, True, transport).resolve("wire").chat_model
    messages = [HumanMessage(PROMPT)]

    async def run() -> int:
        n = 0
        async for piece in stream_pieces(model, messages, {}):
            if piece is not None and piece.content:
                n += 1
        return n

    return run


def astream_bare(url: str) -> Callable[[], Awaitable[int]]:
    from langchain_core.messages import HumanMessage

    model = registry(url, False).resolve("wire").chat_model
    messages = [HumanMessage(PROMPT)]

    async def run() -> int:
        n = 0
        async for chunk in model.astream(messages):
            if chunk.content:
                n += 1
        return n

    return run


def langgraph_messages(url: str) -> Callable[[], Awaitable[int]]:
    from langchain_core.messages import HumanMessage
    from langgraph.graph import END, START, StateGraph

    model = registry(url, False).resolve("wire").chat_model

    async def call(state: State) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    builder = StateGraph(State)
    builder.add_node("call", call)
    builder.add_edge(START, "call")
    builder.add_edge("call", END)
    graph = builder.compile()

    async def run() -> int:
        n = 0
        inputs = {"messages": [HumanMessage(PROMPT)]}
        async for message, _meta in graph.astream(inputs, stream_mode="messages"):
            if message.content:
                n += 1
        return n

    return run


def stagecast_chain(url: str, fast: bool) -> Callable[[], Awaitable[int]]:
    import yaml

    from stagecast.engine.chain import Chain
    from stagecast.engine.orchestrator import run_chain
    from stagecast.engine.spec import ChainSpec

    spec = {
        "defaults": {"model": "wire"},
        "stages": [{"id": "answer", "kind": "llm", "prompt": PROMPT}],
    }
    chain = Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(yaml.safe_dump(spec))), id="b")
    models = registry(url, fast)

    async def run() -> int:
        n = 0
        async for event in run_chain(chain, {}, models=models):
            if event.type == "token":
                n += 1
            elif event.type == "run-end" and event.status != "succeeded":
                raise SystemExit(f"run failed: {event}")
        return n

    return run


async def main_async(args: argparse.Namespace) -> None:
    import httpx
    import httpx2

    server = C.Server("wire", "--tokens", str(args.tokens)).wait_ready()
    url = server.url + "/v1"
    try:
        contenders: dict[str, Callable[[], Awaitable[int]]] = {
            "floor (httpx)": floor(httpx, url),
            "floor (httpx2)": floor(httpx2, url),
            "fast path, bare": fast_bare(url),
            "fast path, bare, SDK transport": fast_bare(url, "sdk"),
            "ChatOpenAI.astream(), bare": astream_bare(url),
            "LangGraph messages": langgraph_messages(url),
            "Stagecast run_chain, fast path": stagecast_chain(url, True),
            "Stagecast run_chain, astream()": stagecast_chain(url, False),
        }
        names = list(contenders)
        for run in contenders.values():  # warm-up: imports, connections, first-call paths
            got = await run()
            if got != args.tokens:
                raise SystemExit(f"expected {args.tokens} tokens, got {got}")
        cpu: dict[str, list[float]] = {name: [] for name in names}
        wall: dict[str, list[float]] = {name: [] for name in names}
        server_cpu: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                run = contenders[name]
                s0, c0, t0 = server.cpu(), time.process_time(), time.perf_counter()
                tokens = 0
                for _ in range(args.requests):
                    tokens += await run()
                c1, t1, s1 = time.process_time(), time.perf_counter(), server.cpu()
                cpu[name].append((c1 - c0) / tokens * 1e6)
                wall[name].append((t1 - t0) / tokens * 1e6)
                server_cpu[name].append((s1 - s0) / tokens * 1e6)
    finally:
        server.stop()

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(cpu[a], cpu[b], strict=True)]

    C.header(
        f"Real-wire cost: {args.tokens:,} tokens × {args.requests} requests per repetition, "
        f"{args.reps} repetitions, OpenAI-wire server in its own process"
    )
    rows = [
        [
            name,
            C.fmt(C.median(cpu[name])),
            C.spread(cpu[name]),
            C.fmt(C.median(wall[name])),
            C.fmt(C.median(server_cpu[name])),
        ]
        for name in names
    ]
    print(
        C.table(
            [
                "contender",
                "client CPU µs/token (median)",
                "spread",
                "wall µs/token",
                "wire server CPU µs/token (not counted)",
            ],
            rows,
        )
    )
    pairs = [
        ("fast path, bare", "ChatOpenAI.astream(), bare"),
        ("fast path, bare", "floor (httpx2)"),
        ("fast path, bare", "floor (httpx)"),
        ("fast path, bare", "fast path, bare, SDK transport"),
        ("Stagecast run_chain, fast path", "Stagecast run_chain, astream()"),
        ("Stagecast run_chain, fast path", "floor (httpx2)"),
        ("LangGraph messages", "Stagecast run_chain, fast path"),
    ]
    print()
    print(
        C.table(
            ["ratio (per repetition, median)", "median", "per repetition"],
            [
                [
                    f"{a} / {b}",
                    C.fmt(C.median(ratio(a, b))),
                    " ".join(f"{x:.2f}" for x in ratio(a, b)),
                ]
                for a, b in pairs
            ],
        )
    )
    vs_astream = C.median(ratio("fast path, bare", "ChatOpenAI.astream(), bare"))
    vs_floor = C.median(ratio("fast path, bare", "floor (httpx2)"))
    ok = vs_astream <= 1 / 3 and vs_floor <= 2
    print(
        f"\ntarget: fast path ≤ 1/3 of astream() and ≤ 2× the parse-only floor → "
        f"{vs_astream:.2f}× astream(), {vs_floor:.2f}× the floor (httpx2) "
        f"({'met' if ok else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000, help="tokens per request")
    parser.add_argument("--requests", type=int, default=5, help="requests per repetition")
    parser.add_argument("--reps", type=int, default=7, help="repetitions")
    parser.add_argument("--smoke", action="store_true", help="tiny workload, no timing meaning")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.requests, args.reps = 100, 1, 2
    C.run_async(main_async(args))


if __name__ == "__main__":
    main()
