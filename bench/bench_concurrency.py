"""Concurrency: C runs at once on one uvicorn worker, each streaming ~20 tokens/s for ~20 s.

The server (``bench/_servers.py stagecast``, a fresh process per C) runs a chain of 7 sequential
llm stages on the model ``offline-50`` — an entry of the models file the server is given
(``provider: offline, delay_ms: 50``) — so each run streams ~56 tokens per stage at one token
per 50 ms: ~390 tokens over ~20 s. All C runs are started with ``POST /v1/runs?stream=true`` at
once and read by a raw asyncio protocol client (hand-written HTTP/1.1 + chunked + SSE parsing:
an httpx client costs 65–137 µs of CPU per event and saturates a core near C = 500).

Reported per C: runs completed with every event (run-end received, ``seq`` without gaps);
lateness of each event = receive time − the event's ``ts`` (p50/p99/max, ms); server RSS per run
(peak RSS during the runs minus the idle server's RSS, over C; summed over the servers with
``--servers N``); server CPU (% of one core over
the run time); the client's CPU share, to show it was not the bottleneck.

    python bench/bench_concurrency.py                 # C = 100, 500, 1000; ~1.5 min
    python bench/bench_concurrency.py -c 1000 --stages 3
    python bench/bench_concurrency.py -c 1000 --model raw-50   # without LangChain's chunk cost
    python bench/bench_concurrency.py -c 1000 --model wire     # real wire: OpenAI-wire server
    python bench/bench_concurrency.py -c 1000 --model wire-sdk # the same, the SDK's HTTP client
    python bench/bench_concurrency.py -c 1000 --log redis --servers 2  # scale-out on Redis
    python bench/bench_concurrency.py --smoke         # C = 20, one stage (~4 s)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

_TS = re.compile(rb'"ts":(\d+)')
_ID = re.compile(rb"^id: (\d+)$", re.M)
_EVENT = re.compile(rb"^event: ([a-z-]+)$", re.M)


def chain_yaml(stages: int, model: str = "offline-50") -> str:
    out = [
        "id: bench_long",
        "inputs:",
        "  topic: {type: string}",
        "defaults:",
        f"  model: {model}",
        "stages:",
    ]
    for i in range(stages):
        out += [f"  - id: s{i}", "    kind: llm", '    prompt: "{{ inputs.topic }}"']
        if i:
            out.append(f"    needs: [s{i - 1}]")
    return "\n".join(out) + "\n"


# 60 distinct words the offline model echoes (it streams the prompt's salient words).
TOPIC = " ".join(f"{a}{b}word" for a in "bcdfghjklm" for b in "aeiouy")


class SseClient(asyncio.Protocol):
    """One run's stream: de-chunks the body, splits SSE frames, records lateness per event."""

    def __init__(self, request: bytes, lateness: list[float], done: asyncio.Future[None]) -> None:
        self.request = request
        self.lateness = lateness
        self.done = done
        self.raw = b""
        self.headers_done = False
        self.body = b""
        self.need: int | None = None
        self.events = 0
        self.tokens = 0
        self.last_id = 0
        self.gaps = 0
        self.ended = False
        self.status = b""
        self.other_late: list[tuple[str, float]] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000
        raw = self.raw + data
        if not self.headers_done:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self.raw = raw
                return
            self.status = raw[:12]
            self.headers_done = True
            raw = raw[end + 4 :]
        # chunked transfer encoding
        last = False
        while True:
            if self.need is None:
                eol = raw.find(b"\r\n")
                if eol < 0:
                    break
                self.need = int(raw[:eol].split(b";")[0], 16)
                raw = raw[eol + 2 :]
                if self.need == 0:
                    last = True
                    break
            if len(raw) < self.need + 2:
                break
            self.body += raw[: self.need]
            raw = raw[self.need + 2 :]
            self.need = None
        self.raw = raw
        body = self.body
        start = 0
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            self._frame(body[start:end], now_ms)
            start = end + 2
        self.body = body[start:]
        if last:
            self._finish()

    def _frame(self, frame: bytes, now_ms: float) -> None:
        ev = _EVENT.search(frame)
        if ev is None:
            return  # retry/comment/ping
        self.events += 1
        kind = ev.group(1)
        seq = int(_ID.search(frame).group(1))  # type: ignore[union-attr]
        if seq != self.last_id + 1:
            self.gaps += 1
        self.last_id = seq
        ts = _TS.search(frame)
        late = now_ms - int(ts.group(1)) if ts is not None else None
        if late is not None:
            self.lateness.append(late)
        if kind == b"token":
            self.tokens += 1
        else:
            if late is not None:
                self.other_late.append((kind.decode(), late))
            if kind == b"run-end":
                self.ended = b'"status":"succeeded"' in frame

    def _finish(self) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def run_level(args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    wire = None
    extra: list[str] = []
    if args.model in (
        "wire",
        "wire-sdk",
        "wire-astream",
    ):  # a real OpenAI-wire server, its own process
        wire = C.Server("wire", "--tokens", "56", "--delay-ms", "50").wait_ready()
        extra = ["--wire-url", wire.url + "/v1"]
    redis_server = None
    if args.log == "redis":  # a redis-server of its own, no persistence; the servers share it
        import tempfile
        from pathlib import Path

        from tests.redis_server import RedisServer

        redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="stagecast-bench-redis-")))
        try:
            redis_server.start()
        except (OSError, RuntimeError) as exc:
            raise SystemExit(f"--log redis needs redis-server (tests/setup.sh): {exc}") from None
        extra += ["--event-log", redis_server.url]
    servers = [
        C.Server(
            "stagecast",
            "--tokens",
            "10",
            "--ttl",
            "600",
            "--chain-yaml",
            chain_yaml(args.stages, args.model),
            *extra,
        )
        for _ in range(args.servers)
    ]
    for one in servers:
        one.wait_ready()
    try:
        loop = asyncio.get_running_loop()
        body = json.dumps({"chain": "bench_long", "inputs": {"topic": TOPIC}}).encode()
        request = (
            b"POST /v1/runs?stream=true HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        # Warm-up: one short run on the measured model, so imports (langchain-openai and the
        # openai SDK are ~17 MiB, 17 KiB "per run" at C = 1,000), the model's client and
        # first-request paths are not counted as per-run memory.
        warm: list[float] = []
        warm_model = args.model if wire is not None else "offline"
        warm_body = json.dumps({"chain": "bench_stream", "model": warm_model}).encode()
        warm_request = (
            request.split(b"Content-Length:")[0]
            + b"Content-Length: "
            + str(len(warm_body)).encode()
            + b"\r\n\r\n"
            + warm_body
        )
        for one in servers:  # each one warms up (on Redis, some other process may work it)
            fut = loop.create_future()
            await loop.create_connection(
                lambda f=fut: SseClient(warm_request, warm, f), "127.0.0.1", one.port
            )
            await asyncio.wait_for(fut, 120)
        await asyncio.sleep(0.3)

        def rss() -> int:
            return sum(one.rss_kib() for one in servers)

        def cpu() -> float:
            return sum(one.cpu() for one in servers)

        def redis_cpu() -> float:
            if redis_server is None or redis_server.process is None:
                return 0.0
            return C.proc_cpu_seconds(redis_server.process.pid)

        rss0 = rss()
        wcpu0 = wire.cpu() if wire is not None else 0.0
        rcpu0 = redis_cpu()
        cpu0, ccpu0, t0 = cpu(), time.process_time(), time.perf_counter()
        lateness: list[float] = []
        clients: list[SseClient] = []
        futures = []
        for _i in range(concurrency):
            fut = loop.create_future()
            client = SseClient(request, lateness, fut)
            clients.append(client)
            futures.append(fut)
            port = servers[_i % len(servers)].port  # no sticky routing: round robin
            await loop.create_connection(lambda c=client: c, "127.0.0.1", port)
        peak = rss0
        pending = set(futures)
        deadline = time.monotonic() + args.timeout
        while pending and time.monotonic() < deadline:
            _, pending = await asyncio.wait(pending, timeout=0.25)
            peak = max(peak, rss())
        elapsed = time.perf_counter() - t0
        cpu_s, ccpu = cpu() - cpu0, time.process_time() - ccpu0
        wcpu = wire.cpu() - wcpu0 if wire is not None else None
        rcpu = redis_cpu() - rcpu0 if redis_server is not None else None
        for client in clients:
            if not client.transport.is_closing():
                client.transport.close()
        complete = sum(1 for c in clients if c.ended and not c.gaps and c.events == c.last_id)
        tokens = [c.tokens for c in clients]
        others = [late for c in clients for _, late in c.other_late]
        worst = sorted((x for c in clients for x in c.other_late), key=lambda kv: -kv[1])[:3]
        return {
            "C": concurrency,
            "complete": complete,
            "seconds": elapsed,
            "events": sum(c.events for c in clients),
            "tokens_min": min(tokens),
            "tokens_max": max(tokens),
            "p50": C.percentile(lateness, 50),
            "p99": C.percentile(lateness, 99),
            "max": max(lateness) if lateness else 0.0,
            "p99_other": C.percentile(others, 99),
            "worst_other": worst,
            "rss_per_run_kib": (peak - rss0) / concurrency,
            "rss0_kib": rss0,
            "peak_kib": peak,
            "server_cpu": cpu_s / elapsed * 100,
            "client_cpu": ccpu / elapsed * 100,
            "wire_cpu": wcpu / elapsed * 100 if wcpu is not None else None,
            "cpu_us_per_token": cpu_s / max(1, sum(tokens)) * 1e6,
            "redis_cpu": rcpu / elapsed * 100 if rcpu is not None else None,
            "status": sorted({c.status.decode(errors="replace") for c in clients}),
        }
    finally:
        for one in servers:
            one.stop()
        if wire is not None:
            wire.stop()
        if redis_server is not None:
            redis_server.stop()


async def main_async(args: argparse.Namespace) -> None:
    results = [await run_level(args, c) for c in args.c]
    where = (
        "one uvicorn worker, in-memory log"
        if args.servers == 1 and args.log == "memory"
        else f"{args.servers} stagecast serve process(es) on the {args.log} log, "
        "connections round robin, runs taken from the shared queue"
    )
    C.header(
        f"Concurrency: C runs at once on {where}, {args.stages} stages × ~56 "
        f"tokens at 50 ms/token each ({args.model}), raw asyncio client"
    )
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['C']:,}",
                f"{r['complete']:,}/{r['C']:,}",
                f"{r['seconds']:.1f}",
                f"{r['events']:,}",
                f"{r['tokens_min']}–{r['tokens_max']}",
                f"{r['p50']:.0f}",
                f"{r['p99']:.0f}",
                f"{r['max']:.0f}",
                f"{r['p99_other']:.0f}",
                f"{r['rss_per_run_kib']:.0f}",
                f"{r['peak_kib'] / 1024:.0f}",
                f"{r['server_cpu']:.0f}%",
                f"{r['cpu_us_per_token']:.1f}",
                f"{r['client_cpu']:.0f}%",
                "–" if r["wire_cpu"] is None else f"{r['wire_cpu']:.0f}%",
                "–" if r["redis_cpu"] is None else f"{r['redis_cpu']:.0f}%",
            ]
        )
    print(
        C.table(
            [
                "C",
                "complete",
                "wall s",
                "events",
                "tokens/run",
                "lateness p50 ms",
                "p99 ms",
                "max ms",
                "p99 non-token ms",
                "server RSS KiB/run",
                "server peak RSS MiB",
                "server CPU (of 1 core)",
                "server CPU µs/token",
                "client CPU",
                "wire server CPU",
                "redis-server CPU",
            ],
            rows,
        )
    )
    bad = [r for r in results if any(not s.startswith("HTTP/1.1 200") for s in r["status"])]
    for r in bad:
        print(f"C={r['C']}: HTTP status lines seen: {r['status']}")
    big = max(results, key=lambda r: r["C"])
    ok = big["complete"] == big["C"] and big["p99"] < 100 and big["rss_per_run_kib"] < 100
    print(
        f"\ntarget: C = {big['C']:,} completes, p99 lateness < 100 ms, < 100 KiB RSS per run → "
        f"{big['complete']}/{big['C']} complete, p99 {big['p99']:.0f} ms, "
        f"{big['rss_per_run_kib']:.0f} KiB/run ({'met' if ok else 'MISSED'})"
    )
    print(
        "lateness = client receive time − event ts (ms clock of the same machine; ts has 1 ms "
        "resolution)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-c", type=int, nargs="+", default=[100, 500, 1000], help="concurrency levels"
    )
    parser.add_argument(
        "--model",
        default="offline-50",
        help="offline-50 (the target), raw-50: the same pacing without LangChain's per-chunk "
        "cost, wire: 56 tokens at 50 ms from an OpenAI-wire server in its own process "
        "(bench/_wire.py) through the fast path (Stagecast's own HTTP client), wire-sdk: the "
        "fast path read by the SDK's httpx client, wire-astream: the same through "
        "ChatOpenAI.astream()",
    )
    parser.add_argument(
        "--stages", type=int, default=7, help="sequential stages per run (~2.8 s each)"
    )
    parser.add_argument(
        "--log",
        choices=["memory", "redis"],
        default="memory",
        help="the event log: memory (one process), or redis (a redis-server of its own; runs "
        "go through the shared queue)",
    )
    parser.add_argument(
        "--servers", type=int, default=1, help="stagecast serve processes (Redis for > 1)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after (s)")
    parser.add_argument("--smoke", action="store_true", help="C = 20, one stage")
    args = parser.parse_args()
    if args.servers > 1 and args.log != "redis":
        parser.error("--servers > 1 needs --log redis (processes share runs through Redis)")
    if args.smoke:
        args.c, args.stages = [20], 1
    elif args.model.startswith("wire") and args.c == [100, 500, 1000]:
        args.c = [1000]
    C.run_async(main_async(args))  # uvloop when installed (the bench extra), else asyncio


if __name__ == "__main__":
    main()
