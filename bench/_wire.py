"""A lean OpenAI-wire server for the benchmarks: raw asyncio, pre-encoded frames, 127.0.0.1.

``POST /v1/chat/completions`` with ``stream: true`` answers like OpenAI: a role chunk, ``tokens``
content chunks (``w0 ``, ``w1 `` …), a finish chunk, the usage chunk when the request asked for
``stream_options.include_usage``, ``data: [DONE]``; HTTP/1.1 chunked, keep-alive. With
``delay_ms`` each content chunk is written on its own timer (one ``call_later`` per chunk, the
first at a random phase), so C streams are spread out as real ones are; without, the whole body
is written at once. It runs in its own process (``bench/_servers.py wire``) so the benchmarks
report the CPU of the Stagecast side only. tests/providers/openai_server.py is the test server
with every fault; this one is only fast.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "bench-model",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return _frame(json.dumps(data, separators=(",", ":")).encode())


def _frame(payload: bytes) -> bytes:
    sse = b"data: " + payload + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(sse), sse)


class Wire:
    def __init__(self, tokens: int, delay_ms: float) -> None:
        self.delay = delay_ms / 1000
        self.first = _chunk({"role": "assistant", "content": ""})
        self.tokens = [_chunk({"content": f"w{i % 997} "}) for i in range(tokens)]
        usage = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": "bench-model",
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": tokens,
                "total_tokens": 12 + tokens,
            },
        }
        self.finish = _chunk({}, "stop")
        self.usage = _frame(json.dumps(usage).encode())
        self.done = _frame(b"[DONE]") + b"0\r\n\r\n"


class WireProtocol(asyncio.Protocol):
    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.buf = b""
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = json.loads(self.buf[end + 4 : end + 4 + length] or b"{}")
            self.buf = self.buf[end + 4 + length :]
            self.respond(body)

    def respond(self, body: dict[str, Any]) -> None:
        wire = self.wire
        usage = (body.get("stream_options") or {}).get("include_usage")
        tail = wire.finish + wire.usage if usage else wire.finish
        if not wire.delay:
            self.transport.write(HEAD + wire.first + b"".join(wire.tokens) + tail + wire.done)
            return
        self.transport.write(HEAD + wire.first)
        loop = asyncio.get_running_loop()
        frames = iter(wire.tokens)

        def send() -> None:
            frame = next(frames, None)
            if self.transport.is_closing():
                return
            if frame is None:
                self.transport.write(tail + wire.done)
                self.timer = None
                return
            self.transport.write(frame)
            self.timer = loop.call_later(wire.delay, send)

        self.timer = loop.call_later(wire.delay * random.random(), send)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


async def serve(port: int, tokens: int, delay_ms: float) -> None:
    wire = Wire(tokens, delay_ms)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: WireProtocol(wire), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()
