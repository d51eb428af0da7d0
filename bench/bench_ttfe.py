"""Time to first event: ``POST /v1/runs?stream=true`` until ``run-start`` is received, vs a raw
SSE endpoint (a bare Starlette ``StreamingResponse`` that reads the JSON body and sends one
pre-formatted frame). Median of 50 requests each, interleaved, one keep-alive connection per
contender, raw asyncio streams on the client (no HTTP library in the measured path).

    python bench/bench_ttfe.py            # ~10 s
    python bench/bench_ttfe.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C


class Conn:
    """One keep-alive HTTP/1.1 connection; reads a chunked SSE response by hand."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def first_event(self, path: str, body: dict[str, object], event: bytes) -> float:
        """Seconds from sending the request to holding the first ``event:`` frame."""
        payload = json.dumps(body).encode()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        t0 = time.perf_counter()
        self.writer.write(request)
        buf = b""
        needle = b"event: " + event
        while needle not in buf:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise SystemExit(f"{path}: connection closed before {event.decode()}")
            buf += chunk
        elapsed = time.perf_counter() - t0
        # Drain the rest of the response (a chunked body ends with 0\r\n\r\n) to reuse the socket.
        while not buf.endswith(b"0\r\n\r\n"):
            chunk = await self.reader.read(65536)
            if not chunk:
                break
            buf += chunk
        if not buf.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"{path}: {buf[:300]!r}")
        return elapsed

    def close(self) -> None:
        self.writer.close()


async def run(args: argparse.Namespace, stagecast: C.Server, plain: C.Server) -> None:
    cases = {
        "Stagecast POST /v1/runs?stream=true → run-start": (
            stagecast.port,
            "/v1/runs?stream=true",
            {"chain": "bench_stream", "model": "offline"},
            b"run-start",
        ),
        "raw SSE endpoint (Starlette StreamingResponse) → first frame": (
            plain.port,
            "/first",
            {"chain": "x"},
            b"run-start",
        ),
    }
    conns = {}
    for name, (port, *_rest) in cases.items():
        conns[name] = Conn(port)
        await conns[name].open()
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(args.warmup + args.n):
        for name in names if i % 2 == 0 else names[::-1]:
            _, path, body, event = cases[name]
            t = await conns[name].first_event(path, body, event)
            if i >= args.warmup:
                times[name].append(t * 1000)
            await asyncio.sleep(0.005)
    for conn in conns.values():
        conn.close()
    C.header(
        f"Time to first event: median of {args.n} requests each, interleaved, loopback, "
        "one uvicorn worker per server"
    )
    rows = []
    for name in names:
        v = times[name]
        rows.append(
            [
                name,
                f"{C.median(v):.2f}",
                f"{C.percentile(v, 10):.2f}",
                f"{C.percentile(v, 90):.2f}",
                f"{max(v):.2f}",
            ]
        )
    print(C.table(["what", "median ms", "p10 ms", "p90 ms", "max ms"], rows))
    ours = C.median(times[names[0]])
    print(
        f"\nStagecast / raw = {ours / C.median(times[names[1]]):.1f}×; "
        f"target: ≤ 2 ms → {ours:.2f} ms ({'met' if ours <= 2 else 'MISSED'})"
    )
    print(
        "each Stagecast request runs a one-stage chain to the end (its stream is drained); "
        "only the time to its first event is measured"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=50, help="requests per contender")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="5 requests each")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.warmup = 5, 1
    tokens = "200" if args.smoke else "2000"
    with (
        C.Server("stagecast", "--tokens", tokens) as stagecast,
        C.Server("plain", "--tokens", "10") as plain,
    ):
        asyncio.run(run(args, stagecast, plain))


if __name__ == "__main__":
    main()
