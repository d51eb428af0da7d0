"""Over HTTP: one run streaming 50,000 token events to one client on loopback, one uvicorn worker.

Server CPU µs per event (the server process's user+system time from /proc/<pid>/stat, read
before and after each stream) and events/s at the client (httpx + httpx-sse, for every
contender), for:

- Stagecast, ``POST /v1/runs?stream=true``, token source ``raw-burst`` (a model whose stream
  costs ~nothing, so the figure is Stagecast's own: engine + event log + SSE) — the contender for
  the target, since the comparison endpoints send pre-built events;
- Stagecast with ``lc-burst`` (a LangChain ``BaseChatModel`` fake through ``astream()``: what a
  real provider's chunk objects and callbacks add) and ``raw-yield`` (the source yields to the
  loop after every token, as a network stream does: no batching for free);
- plain sse-starlette ``EventSourceResponse`` over pre-built ``ServerSentEvent``s;
- plain Starlette ``StreamingResponse`` over pre-formatted frames, one write per event;
- Stagecast with coalescing on (``coalesce_ms``, a server setting), token source ``raw-yield``
  and ``lc-burst``: tokens/s.

Every server runs in its own process (``bench/_servers.py``); contenders are interleaved, the
order rotating every repetition; medians; ratios per repetition.

    python bench/bench_http.py            # ~1.5 min
    python bench/bench_http.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C


async def read_stream(client: Any, method: str, url: str, body: Any) -> tuple[int, int, str]:
    """(events, tokens, last event type). Tokens are counted in the text (coalesced or not)."""
    from httpx_sse import aconnect_sse

    events = tokens = 0
    last = ""
    kwargs = {"json": body} if body is not None else {}
    async with aconnect_sse(client, method, url, **kwargs) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            raise SystemExit(
                f"{url}: HTTP {source.response.status_code} {source.response.text[:300]}"
            )
        async for sse in source.aiter_sse():
            events += 1
            last = sse.event
            if sse.event == "token":
                if '"text":"w' in sse.data and sse.data.count("w") == 1:
                    tokens += 1
                else:  # coalesced: "w1 w2 w3 "
                    import json

                    tokens += json.loads(sse.data)["text"].count(" ")
            elif sse.event == "run-end":
                break
    return events, tokens, last


Case = tuple[str, Any, Callable[[Any], Awaitable[tuple[int, int, str]]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--coalesce-ms", type=float, default=20.0)
    parser.add_argument("--smoke", action="store_true", help="2,000 events, 1 repetition")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.reps = 2000, 1

    tok = ["--tokens", str(args.tokens)]
    servers = {
        "stagecast": C.Server("stagecast", *tok),
        "coalesce": C.Server("stagecast", *tok, "--coalesce-ms", str(args.coalesce_ms)),
        "plain": C.Server("plain", *tok),
    }
    try:
        for s in servers.values():
            s.wait_ready()
        asyncio.run(run(args, servers))
    finally:
        for s in servers.values():
            s.stop()


async def run(args: argparse.Namespace, servers: dict[str, C.Server]) -> None:
    import httpx

    def stagecast(model: str, server: str) -> tuple[C.Server, Any]:
        srv = servers[server]

        async def go(client: Any) -> tuple[int, int, str]:
            return await read_stream(
                client,
                "POST",
                f"{srv.url}/v1/runs?stream=true",
                {"chain": "bench_stream", "model": model},
            )

        return srv, go

    def plain(path: str) -> tuple[C.Server, Any]:
        srv = servers["plain"]

        async def go(client: Any) -> tuple[int, int, str]:
            return await read_stream(client, "GET", f"{srv.url}{path}", None)

        return srv, go

    cases: dict[str, tuple[C.Server, Any]] = {
        "Stagecast (raw-burst source)": stagecast("raw-burst", "stagecast"),
        "Stagecast (lc-burst: LangChain astream source)": stagecast("lc-burst", "stagecast"),
        "Stagecast (raw-yield: loop turn per token)": stagecast("raw-yield", "stagecast"),
        "sse-starlette, pre-built events": plain("/sse-starlette"),
        "Starlette StreamingResponse, pre-built frames": plain("/streaming"),
        f"Stagecast coalesce {args.coalesce_ms:g} ms (raw-yield)": stagecast(
            "raw-yield", "coalesce"
        ),
        f"Stagecast coalesce {args.coalesce_ms:g} ms (lc-burst)": stagecast("lc-burst", "coalesce"),
    }
    names = list(cases)
    cpu_us: dict[str, list[float]] = {k: [] for k in names}
    cpu_tok: dict[str, list[float]] = {k: [] for k in names}
    eps: dict[str, list[float]] = {k: [] for k in names}
    tps: dict[str, list[float]] = {k: [] for k in names}
    events_seen: dict[str, int] = {}
    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        for name in names:  # warm-up: imports, first-request paths, caches
            srv, go = cases[name]
            await go(client)
        for rep in range(args.reps):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                srv, go = cases[name]
                await asyncio.sleep(0.05)
                cpu0 = srv.cpu()
                t0 = time.perf_counter()
                events, tokens, _ = await go(client)
                elapsed = time.perf_counter() - t0
                await asyncio.sleep(0.02)  # let the server finish its bookkeeping
                cpu = srv.cpu() - cpu0
                if tokens != args.tokens:
                    raise SystemExit(f"{name}: {tokens} tokens received, expected {args.tokens}")
                events_seen[name] = events
                cpu_us[name].append(cpu / events * 1e6)
                cpu_tok[name].append(cpu / tokens * 1e6)
                eps[name].append(events / elapsed)
                tps[name].append(tokens / elapsed)

    ref = "sse-starlette, pre-built events"
    ours = "Stagecast (raw-burst source)"

    def ratio(a: str, b: str) -> float:
        return C.median([x / y for x, y in zip(cpu_us[a], cpu_us[b], strict=True)])

    C.header(
        f"Over HTTP: one run, {args.tokens:,} token events, one client (httpx-sse), "
        f"one uvicorn worker; {args.reps} interleaved repetitions, medians"
    )
    rows = []
    for name in names:
        rows.append(
            [
                name,
                f"{events_seen[name]:,}",
                C.fmt(C.median(cpu_us[name])),
                C.spread(cpu_us[name]),
                C.fmt(C.median(cpu_tok[name])),
                f"{C.median(eps[name]):,.0f}",
                f"{C.median(tps[name]):,.0f}",
                "-" if "coalesce" in name else C.fmt(ratio(name, ref)),
            ]
        )
    print(
        C.table(
            [
                "contender",
                "events",
                "server CPU µs/event",
                "noise",
                "server CPU µs/token",
                "events/s (client)",
                "tokens/s (client)",
                "× sse-starlette CPU/event",
            ],
            rows,
        )
    )
    print(
        "\nserver CPU is sampled at 10 ms resolution (/proc clock ticks); "
        "client events/s is bound by the httpx-sse client (one core)."
    )
    r = ratio(ours, ref)
    print(
        f"\ntarget: Stagecast ≤ 1.5× plain sse-starlette server CPU per event → {r:.2f}× "
        f"({'met' if r <= 1.5 else 'MISSED'})"
    )
    best = max(C.median(tps[n]) for n in names if "coalesce" in n)
    print(
        f"target: with coalescing ≥ 500k tokens/s → best {best:,.0f} tokens/s "
        f"({'met' if best >= 500_000 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
