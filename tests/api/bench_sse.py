"""Server-side cost of writing SSE, per event: this module vs sse-starlette vs one write each.

    python tests/api/bench_sse.py [N]

Each variant streams the same N pre-serialized events of a finished run to a fake ASGI ``send``
(no network, so only the server's own work counts), then the batched variant once more over
real HTTP (uvicorn on 127.0.0.1, a raw-socket reader) for events per second end to end.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import StreamingResponse

from stagecast.api.eventlog import LogEntry
from stagecast.api.memlog import InMemoryEventLog
from stagecast.api.sse import EventStreamResponse, encode_entry

N = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
DATA = (
    '{"v":1,"type":"token","run_id":"run_x","seq":%d,"ts":1,"stage":"s","path":["s"],'
    '"attempt":1,"text":"word "}'
)


def make_log() -> InMemoryEventLog:
    log = InMemoryEventLog(max_events=N + 10)
    log.create("r")
    for seq in range(1, N + 1):
        log.append("r", LogEntry(seq, "token", DATA % seq))
    log.finish("r")
    return log


async def run_asgi(app: Any) -> tuple[float, int, int]:
    writes = 0
    size = 0

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send(message: dict[str, Any]) -> None:
        nonlocal writes, size
        writes += 1
        size += len(message.get("body", b""))

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET", "headers": []}
    start = time.process_time()
    await app(scope, receive, send)
    return time.process_time() - start, writes, size


async def main() -> None:
    log = make_log()
    entries = (await log.read("r", 0)).entries

    async def one_each() -> AsyncIterator[str]:
        for e in entries:
            yield encode_entry(e)

    async def sse_events() -> AsyncIterator[ServerSentEvent]:
        for e in entries:
            yield ServerSentEvent(data=e.data, event=e.type, id=str(e.seq))

    variants = {
        "EventStreamResponse (batched, this module)": lambda: EventStreamResponse(
            log.follow("r", 0)
        ),
        "StreamingResponse (one frame per write)": lambda: StreamingResponse(
            one_each(), media_type="text/event-stream"
        ),
        "sse-starlette EventSourceResponse": lambda: EventSourceResponse(sse_events(), ping=15),
    }
    for name, build in variants.items():
        cpu, writes, size = await run_asgi(build())
        print(f"{name:45s} {cpu / N * 1e6:6.2f} µs/event  {writes:6d} writes  {size} bytes")


def over_http() -> None:
    import threading

    import uvicorn
    from fastapi import FastAPI

    log = make_log()
    app = FastAPI()

    @app.get("/e")
    async def events() -> EventStreamResponse:
        return EventStreamResponse(log.follow("r", 0))

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        start = time.perf_counter()
        conn.sendall(b"GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(10)
    print(
        f"over HTTP (uvicorn, raw socket client): {N / wall:,.0f} events/s, "
        f"{got.count(b'id: ')} events"
    )


if __name__ == "__main__":
    asyncio.run(main())
    over_http()
