"""The servers the HTTP benchmarks start, each in its own process (one uvicorn worker).

    python bench/_servers.py stagecast --port P [--coalesce-ms MS] [--tokens N]
    python bench/_servers.py plain --port P [--tokens N]

``stagecast``: ``api.app.create_app`` with a chains directory holding one bench chain and extra
models by name (``create_app(settings, models=...)``):

- ``lc-burst``: a LangChain ``BaseChatModel`` with a native ``_astream`` (one chunk per token,
  no sleeps), called through ``BaseChatModel.astream`` like any provider: its own per-token cost
  (~7 µs: pydantic chunks, callbacks) is part of every event;
- ``raw-burst``: the same tokens with ``astream`` overridden to hand out plain objects: the token
  source costs ~0.1 µs, so what is measured is Stagecast itself (engine, event log, SSE). This is
  the fair analogue of "sse-starlette sending pre-built events";
- ``raw-yield``: like ``raw-burst`` but yields to the event loop after every token, as a network
  stream does (one read per token): tokens trickle in and the writer wakes per token;
- ``offline-50``: the offline model with a 50 ms delay per token (the concurrency benchmark);
- ``raw-50``: ``raw-burst``'s plain objects, 56 tokens at 50 ms each: the concurrency workload
  without LangChain's per-chunk cost (``bench_concurrency.py --model raw-50``).

``plain``: a bare Starlette app with the comparison endpoints, all sending pre-built events:

- ``GET /sse-starlette``: ``EventSourceResponse`` over pre-built ``ServerSentEvent`` objects;
- ``GET /streaming``: ``StreamingResponse`` over pre-formatted frames, one per write;
- ``POST /first``: a raw SSE endpoint for the time-to-first-event benchmark: reads the JSON body,
  answers with one pre-formatted run-start frame and ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()

BENCH_CHAIN = """
id: bench_stream
title: One llm stage (benchmarks)
inputs:
  topic: {type: string, default: benchmarks}
stages:
  - id: answer
    kind: llm
    prompt: "Write about {{ inputs.topic }}."
"""

MODELS_YAML = """
default: offline
models:
  offline:
    provider: offline
  offline-50:
    provider: offline
    delay_ms: 50
    description: the offline model at 50 ms per token (benchmarks)
"""

WIRE_MODELS = """
  wire:
    provider: openai
    model: bench-model
    base_url: {url}
    key_required: false
    max_retries: 0
    read_timeout: 60
    description: bench/_wire.py through the fast path (Stagecast's own HTTP client)
  wire-sdk:
    provider: openai
    model: bench-model
    base_url: {url}
    key_required: false
    max_retries: 0
    read_timeout: 60
    stream_transport: sdk
    description: bench/_wire.py through the fast path read by the SDK's httpx client
  wire-astream:
    provider: openai
    model: bench-model
    base_url: {url}
    key_required: false
    max_retries: 0
    read_timeout: 60
    fast_stream: false
    description: bench/_wire.py through ChatOpenAI.astream()
"""

RUN_ID = "run_0123456789abcdef0123"


def token_json(seq: int, text: str) -> str:
    return (
        f'{{"v":1,"type":"token","run_id":"{RUN_ID}","seq":{seq},"ts":1767225600000,'
        f'"stage":"answer","path":["answer"],"attempt":1,"text":{json.dumps(text)}}}'
    )


def words(n: int) -> list[str]:
    return [f"w{i % 997} " for i in range(n)]


def raw_model(tokens: int, yield_every: int, delay_s: float = 0.0) -> Any:
    from langchain_core.language_models import BaseChatModel

    class _Chunk:
        __slots__ = ("content",)
        usage_metadata = None

        def __init__(self, content: str) -> None:
            self.content = content

    items = words(tokens)

    class RawTokenModel(BaseChatModel):
        """Hands out pre-made tokens with no LangChain machinery: measures the engine alone."""

        @property
        def _llm_type(self) -> str:
            return "bench-raw"

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        async def astream(self, input: Any, config: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
            if delay_s:
                for word in items:
                    await asyncio.sleep(delay_s)
                    yield _Chunk(word)
            elif yield_every:
                for i, word in enumerate(items):
                    if i % yield_every == 0:
                        await asyncio.sleep(0)
                    yield _Chunk(word)
            else:
                for word in items:
                    yield _Chunk(word)

    return RawTokenModel()


def stagecast_app(args: argparse.Namespace) -> Any:
    from stagecast.api.app import create_app
    from stagecast.api.settings import ServerSettings

    tmp = Path(tempfile.mkdtemp(prefix="stagecast-bench-"))
    (tmp / "chains").mkdir()
    (tmp / "chains" / "bench_stream.yaml").write_text(BENCH_CHAIN)
    if args.chain_yaml:
        (tmp / "chains" / "bench_long.yaml").write_text(args.chain_yaml)
    models_yaml = MODELS_YAML
    if args.wire_url:
        models_yaml += WIRE_MODELS.format(url=args.wire_url)
    (tmp / "models.yaml").write_text(models_yaml)
    settings = ServerSettings(
        chains_dir=tmp / "chains",
        models_file=tmp / "models.yaml",
        coalesce_ms=args.coalesce_ms,
        max_concurrent_runs=100_000,
        max_events_per_run=max(100_000, args.tokens + 100),
        finished_run_ttl=args.ttl,
        cors_origins=[],
        event_log=args.event_log,
    )
    models = {
        "lc-burst": C.make_fake_model(args.tokens),
        "raw-burst": raw_model(args.tokens, 0),
        "raw-yield": raw_model(args.tokens, 1),
        "raw-50": raw_model(56, 0, 0.05),
    }
    return create_app(settings, models=models)


def plain_app(args: argparse.Namespace) -> Any:
    from sse_starlette import EventSourceResponse, ServerSentEvent
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    datas = [token_json(i + 1, w) for i, w in enumerate(words(args.tokens))]
    events = [ServerSentEvent(data=d, id=str(i + 1), event="token") for i, d in enumerate(datas)]
    frames = [f"id: {i + 1}\nevent: token\ndata: {d}\n\n".encode() for i, d in enumerate(datas)]
    first = (
        f'retry: 2000\n: raw\n\nid: 1\nevent: run-start\ndata: {{"v":1,"type":"run-start",'
        f'"run_id":"{RUN_ID}","seq":1}}\n\n'
    ).encode()
    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}

    def count(request: Request) -> int:
        return int(request.query_params.get("n", len(datas)))

    async def sse_starlette(request: Request) -> Any:
        n = count(request)

        async def gen() -> Any:
            for event in events[:n]:
                yield event

        return EventSourceResponse(gen(), ping=15)

    async def streaming(request: Request) -> Any:
        n = count(request)

        async def gen() -> Any:
            for frame in frames[:n]:
                yield frame

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)

    async def first_event(request: Request) -> Any:
        await request.json()

        async def gen() -> Any:
            yield first

        return StreamingResponse(gen(), media_type="text/event-stream", headers=headers)

    return Starlette(
        routes=[
            Route("/sse-starlette", sse_starlette),
            Route("/streaming", streaming),
            Route("/first", first_event, methods=["POST"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["stagecast", "plain", "wire"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--coalesce-ms", type=float, default=0.0)
    parser.add_argument("--ttl", type=float, default=600.0)
    parser.add_argument("--chain-yaml", default="", help="an extra chain (id bench_long)")
    parser.add_argument("--loop", default="auto", help="uvicorn loop: auto (uvloop), asyncio")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="wire: ms per token")
    parser.add_argument("--http", default="auto", help="uvicorn HTTP parser: auto, h11, httptools")
    parser.add_argument(
        "--event-log", default="memory", help="stagecast: memory, or a redis:// URL (shared)"
    )
    parser.add_argument(
        "--wire-url", default="", help="stagecast: models wire / wire-astream at this /v1 URL"
    )
    args = parser.parse_args()
    if args.kind == "wire":  # the OpenAI-wire server (bench/_wire.py), no uvicorn
        import _wire

        C.run_async(_wire.serve(args.port, args.tokens, args.delay_ms))
        return
    import uvicorn

    app = stagecast_app(args) if args.kind == "stagecast" else plain_app(args)
    profile = os.environ.get("BENCH_PROFILE")  # a file: pyinstrument text profile, written on exit
    profiler = None
    if profile:
        import signal

        from pyinstrument import Profiler

        def stop(*_: Any) -> None:  # uvicorn re-raises SIGTERM after its shutdown: end cleanly
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, stop)
        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
    try:
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=args.port,
            log_level="warning",
            loop=args.loop,
            http=args.http,
            access_log=False,
            backlog=4096,
            timeout_keep_alive=60,
        )
    finally:
        if profiler is not None:
            profiler.stop()
            Path(profile).write_text(profiler.output_text(unicode=True, color=False))


if __name__ == "__main__":
    main()
