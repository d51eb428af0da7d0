"""The shared event log on Redis Streams vs the in-memory one, and uvicorn[standard] vs plain.

Three measurements, each with its baseline in the same run (servers in their own processes,
``bench/_servers.py``; a redis-server of its own on 127.0.0.1, no persistence):

1. **One stream, N token events** (``POST /v1/runs?stream=true``, source ``raw-burst``): server
   CPU µs per event and events/s at the client, for the in-memory log and for Redis (the run
   queued and worked by whichever of the two Redis servers takes it, every event XADDed and
   published on the run's channel to the server streaming it): server CPU is the sum over the
   processes on that log, and the redis-server's own CPU per event is shown too. Interleaved
   repetitions, medians.
2. **Attach across processes**: two servers on one Redis; a run (``raw-50``: 56 tokens, 50 ms
   apart) started through A; the time from a ``GET /v1/runs/{id}/events`` with a cursor one
   before the live end to its first event (the newest one, replayed: no token wait), through B
   (the run is in another process) and through A, and on the in-memory server for its own run.
3. **uvicorn[standard] vs plain uvicorn** (the in-memory server): uvloop + httptools against
   asyncio + h11: the same one-stream figure, and small requests (``POST /v1/runs`` then
   ``GET /v1/runs/{id}``) per second on one connection.
4. **Channel messages**: the CPU the reading process spends per pub/sub message, the event log's
   subscription (``_Subscription``: hiredis parsing what the socket gives) against redis-py's
   ``PubSub.get_message``; the publisher is another process.

    python bench/bench_redis.py            # ~1.5 min
    python bench/bench_redis.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

C.ensure_root_on_path()


async def stream(client: Any, url: str, model: str) -> int:
    """Events of one ``?stream=true`` run, to its run-end."""
    from httpx_sse import aconnect_sse

    events = 0
    body = {"chain": "bench_stream", "model": model}
    async with aconnect_sse(client, "POST", f"{url}/v1/runs?stream=true", json=body) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            raise SystemExit(f"{url}: HTTP {source.response.status_code} {source.response.text}")
        async for sse in source.aiter_sse():
            events += 1
            if sse.event == "run-end":
                break
    return events


async def first_event_ms(client: Any, url: str, run_id: str, after: int) -> float:
    """ms from sending the GET to the first event frame of the stream."""
    t0 = time.perf_counter()
    headers = {"Last-Event-ID": str(after)}
    async with client.stream("GET", f"{url}/v1/runs/{run_id}/events", headers=headers) as resp:
        if resp.status_code != 200:
            raise SystemExit(f"attach {url}: HTTP {resp.status_code}")
        async for chunk in resp.aiter_text():
            if "\nid: " in chunk:
                return (time.perf_counter() - t0) * 1000
    raise SystemExit("the stream ended before an event")


async def last_seq(client: Any, url: str, run_id: str) -> int:
    seq: int = (await client.get(f"{url}/v1/runs/{run_id}")).json()["last_seq"]
    return seq


async def part1(args: argparse.Namespace, servers: dict[str, C.Server], redis_pid: int) -> None:
    import httpx

    names = ["in-memory log", "Redis Streams log"]
    urls = {"in-memory log": servers["memory"], "Redis Streams log": servers["redis"]}
    # Every process on the log counts: the run is taken from the shared queue by either Redis
    # server, so the one serving the stream may not be the one working the run.
    procs = {
        "in-memory log": [servers["memory"]],
        "Redis Streams log": [servers["redis"], servers["redis-b"]],
    }
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rcpu: dict[str, list[float]] = {n: [] for n in names}
    eps: dict[str, list[float]] = {n: [] for n in names}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for name in names:  # warm-up
            await stream(client, urls[name].url, "raw-burst")
        for rep in range(args.reps):
            for name in names[rep % 2 :] + names[: rep % 2]:
                srv = urls[name]
                await asyncio.sleep(0.1)
                c0, r0 = sum(p.cpu() for p in procs[name]), C.proc_cpu_seconds(redis_pid)
                t0 = time.perf_counter()
                events = await stream(client, srv.url, "raw-burst")
                elapsed = time.perf_counter() - t0
                await asyncio.sleep(0.05)
                if events != args.tokens + 4:  # run-start, stage-start, tokens, stage-end, run-end
                    raise SystemExit(f"{name}: {events} events, expected {args.tokens + 4}")
                cpu[name].append((sum(p.cpu() for p in procs[name]) - c0) / events * 1e6)
                rcpu[name].append((C.proc_cpu_seconds(redis_pid) - r0) / events * 1e6)
                eps[name].append(events / elapsed)
    C.header(
        f"1. One stream, {args.tokens:,} token events, one client; {args.reps} interleaved "
        "repetitions, medians"
    )
    base = "in-memory log"
    rows = []
    for name in names:
        ratios = [a / b if b else float("nan") for a, b in zip(cpu[name], cpu[base], strict=True)]
        rows.append(
            [
                name,
                C.fmt(C.median(cpu[name])),
                C.spread(cpu[name]),
                C.fmt(C.median(rcpu[name])) if name != base else "-",
                f"{C.median(eps[name]):,.0f}",
                C.fmt(C.median(ratios)),
            ]
        )
    print(
        C.table(
            [
                "event log",
                "server CPU µs/event",
                "noise",
                "redis-server CPU µs/event",
                "events/s (client)",
                "× in-memory CPU/event",
            ],
            rows,
        )
    )


async def part2(args: argparse.Namespace, servers: dict[str, C.Server]) -> None:
    import httpx

    a, b, mem = servers["redis"], servers["redis-b"], servers["memory"]
    samples: dict[str, list[float]] = {
        "through B (the run is in process A)": [],
        "through A (its own process, via Redis)": [],
        "in-memory server, its own run": [],
    }
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
        for _ in range(args.attach_runs):
            runs = {}
            for key, srv in (("redis", a), ("memory", mem)):
                created = await client.post(
                    f"{srv.url}/v1/runs", json={"chain": "bench_stream", "model": "raw-50"}
                )
                runs[key] = created.json()["run_id"]
            await asyncio.sleep(0.3)  # the runs are live
            for _ in range(args.attach_each):
                for label, srv, key in (
                    ("through B (the run is in process A)", b, "redis"),
                    ("through A (its own process, via Redis)", a, "redis"),
                    ("in-memory server, its own run", mem, "memory"),
                ):
                    after = max(0, await last_seq(client, srv.url, runs[key]) - 1)
                    samples[label].append(await first_event_ms(client, srv.url, runs[key], after))
            for key, srv in (("redis", a), ("memory", mem)):
                await client.post(f"{srv.url}/v1/runs/{runs[key]}/cancel")
    C.header(
        "2. Attach: a viewer opens a stream of a running run one event before its live end: "
        f"ms to that event; {sum(len(v) for v in samples.values())} attaches"
    )
    rows = [
        [label, C.fmt(C.median(v), 1), C.fmt(C.percentile(v, 95), 1), C.fmt(max(v), 1)]
        for label, v in samples.items()
    ]
    print(C.table(["viewer", "median ms", "p95 ms", "max ms"], rows))


async def part3(args: argparse.Namespace, servers: dict[str, C.Server]) -> None:
    import httpx

    names = ["uvicorn[standard] (uvloop, httptools)", "plain uvicorn (asyncio, h11)"]
    by = {names[0]: servers["memory"], names[1]: servers["plain"]}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    rps: dict[str, list[float]] = {n: [] for n in names}
    rcpu: dict[str, list[float]] = {n: [] for n in names}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        for name in names:
            await stream(client, by[name].url, "raw-burst")
        for rep in range(args.reps):
            for name in names[rep % 2 :] + names[: rep % 2]:
                srv = by[name]
                await asyncio.sleep(0.1)
                c0 = srv.cpu()
                events = await stream(client, srv.url, "raw-burst")
                await asyncio.sleep(0.05)
                cpu[name].append((srv.cpu() - c0) / events * 1e6)
                c0 = srv.cpu()
                t0 = time.perf_counter()
                for _ in range(args.requests // 2):
                    run = await client.post(
                        f"{srv.url}/v1/runs", json={"chain": "bench_stream", "model": "offline"}
                    )
                    await client.get(f"{srv.url}/v1/runs/{run.json()['run_id']}")
                elapsed = time.perf_counter() - t0
                rps[name].append(args.requests / elapsed)
                rcpu[name].append((srv.cpu() - c0) / args.requests * 1e6)
    C.header(
        f"3. uvicorn[standard] vs plain uvicorn (in-memory log): one stream of {args.tokens:,} "
        f"events, and {args.requests} small requests on one connection; {args.reps} "
        "interleaved repetitions, medians"
    )
    base = names[1]
    rows = []
    for name in names:
        ratios = [x / y if y else float("nan") for x, y in zip(cpu[name], cpu[base], strict=True)]
        rows.append(
            [
                name,
                C.fmt(C.median(cpu[name])),
                C.fmt(C.median(ratios)),
                f"{C.median(rps[name]):,.0f}",
                C.fmt(C.median(rcpu[name]), 0),
            ]
        )
    print(
        C.table(
            [
                "server",
                "stream CPU µs/event",
                "× plain",
                "requests/s (client)",
                "server CPU µs/request (a run each 2nd)",
            ],
            rows,
        )
    )


PUBLISHER = """
import asyncio, sys
import redis.asyncio as aioredis

async def main(url, n, channels, size):
    client = aioredis.from_url(url)
    payload = b"x" * size
    for at in range(0, n, 500):
        pipe = client.pipeline(transaction=False)
        for i in range(at, min(n, at + 500)):
            pipe.publish(b"ch%d" % (i % channels), payload)
        await pipe.execute()
    await client.publish(b"ch0", b"END")
    await client.aclose()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
"""


class _Counter:
    """Stands in for the event log behind a ``_Subscription``: counts the messages."""

    def __init__(self, redis: Any, channels: int) -> None:
        self.redis = redis
        self.messages = 0
        self.confirmed = 0
        self.channels = channels
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def _on_reply(self, reply: Any) -> None:
        if reply[0] == b"message":
            if reply[2] == b"END":
                self.done.set_result(None)
            else:
                self.messages += 1
        elif reply[0] == b"subscribe":
            self.confirmed += 1
            if self.confirmed == self.channels:
                self.ready.set_result(None)

    def _subscription_lost(self, sub: Any, exc: BaseException) -> None:
        pass


async def _publish(url: str, args: argparse.Namespace) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PUBLISHER, url, str(args.messages), str(args.channels), "200"
    )
    if await proc.wait() != 0:
        raise SystemExit("the publisher failed")


async def _read_pubsub(url: str, args: argparse.Namespace) -> tuple[int, float]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(*[b"ch%d" % i for i in range(args.channels)])
    publisher = asyncio.create_task(_publish(url, args))
    c0, n = time.process_time(), 0
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is None:
            continue
        if message["data"] == b"END":
            break
        n += 1
    spent = time.process_time() - c0
    await publisher
    await pubsub.aclose()
    await client.aclose()
    return n, spent


async def _read_subscription(url: str, args: argparse.Namespace) -> tuple[int, float]:
    from stagecast.api.redislog import _Subscription, redis_client

    client = redis_client(url, socket_timeout=5.0)
    counter = _Counter(client, args.channels)
    sub = _Subscription(counter)  # type: ignore[arg-type]
    await sub.connect()
    sub.subscribe([b"ch%d" % i for i in range(args.channels)])
    await counter.ready
    publisher = asyncio.create_task(_publish(url, args))
    c0 = time.process_time()
    await counter.done
    spent = time.process_time() - c0
    await publisher
    await sub.aclose()
    await client.aclose()
    return counter.messages, spent


async def part4(args: argparse.Namespace, url: str) -> None:
    names = [
        "the event log's subscription (hiredis on the socket)",
        "redis-py PubSub.get_message",
    ]
    readers = {names[0]: _read_subscription, names[1]: _read_pubsub}
    cost: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for name in names[rep % 2 :] + names[: rep % 2]:
            n, spent = await readers[name](url, args)
            if n != args.messages:
                raise SystemExit(f"{name}: {n} messages, expected {args.messages}")
            cost[name].append(spent / n * 1e6)
    C.header(
        f"4. Channel messages: {args.messages:,} of 200 bytes on {args.channels} channels, "
        f"published by another process; the reader's CPU per message; {args.reps} interleaved "
        "repetitions, medians"
    )
    base = names[0]
    rows = []
    for name in names:
        ratios = [x / y if y else float("nan") for x, y in zip(cost[name], cost[base], strict=True)]
        rows.append(
            [name, C.fmt(C.median(cost[name])), C.spread(cost[name]), C.fmt(C.median(ratios))]
        )
    print(C.table(["reader", "CPU µs/message", "noise", "× the log's"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 100,000 events: /proc's 10 ms CPU ticks read to 0.1 µs per event (20,000 gave 0.5 µs steps)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--attach-runs", type=int, default=4)
    parser.add_argument("--attach-each", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="tiny workloads, 1 repetition")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.reps, args.attach_runs, args.attach_each, args.requests = (
            2000,
            1,
            1,
            2,
            20,
        )
        args.messages = 2000
    from tests.redis_server import RedisServer

    redis_server = RedisServer(Path(tempfile.mkdtemp(prefix="stagecast-bench-redis-")))
    try:
        redis_server.start()
    except (OSError, RuntimeError) as exc:
        raise SystemExit(f"bench_redis needs redis-server (tests/setup.sh): {exc}") from None
    assert redis_server.process is not None
    tok = ["--tokens", str(args.tokens)]
    shared = ["--event-log", redis_server.url]
    servers = {
        "memory": C.Server("stagecast", *tok, "--loop", "uvloop", "--http", "httptools"),
        "plain": C.Server("stagecast", *tok, "--loop", "asyncio", "--http", "h11"),
        "redis": C.Server("stagecast", *tok, *shared, "--loop", "uvloop", "--http", "httptools"),
        "redis-b": C.Server("stagecast", *tok, *shared, "--loop", "uvloop", "--http", "httptools"),
    }
    try:
        for srv in servers.values():
            srv.wait_ready()
        asyncio.run(part1(args, servers, redis_server.process.pid))
        asyncio.run(part2(args, servers))
        asyncio.run(part3(args, servers))
        asyncio.run(part4(args, redis_server.url))
        print(
            "\ntarget: the issue asks for these figures with their baselines in the same run "
            "(no pass/fail threshold here; C = 1,000 runs across 2 processes on Redis: "
            "python bench/bench_concurrency.py -c 1000 --log redis --servers 2)"
        )
    finally:
        for srv in servers.values():
            srv.stop()
        redis_server.stop()


if __name__ == "__main__":
    main()
