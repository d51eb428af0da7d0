"""The event logs: cursors, follow, the per-run cap and the TTL; encoded frames and blocks.

The behaviour every log shares (resume after a cursor, no gap, no duplicate, the cap's 410, the
404 of an unknown run, follow and its pings) runs over both logs: ``InMemoryEventLog`` and
``RedisEventLog`` against a real redis-server (``redis_url``; skipped outside CI without one).
The in-memory log's own storage (blocks, waiters, a fake clock for the TTL) is tested below.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from stagecast.api.eventlog import (
    CursorError,
    EventLog,
    EventsExpired,
    FrameBatch,
    LogEntry,
    LogInfo,
    LogSlice,
    UnknownRun,
)
from stagecast.api.memlog import InMemoryEventLog
from stagecast.api.redislog import POOL_CONNECTIONS, RedisEventLog
from stagecast.api.sse import SSE_CODEC, encode_frame

pytestmark = pytest.mark.anyio


def entry(seq: int, kind: str = "token") -> LogEntry:
    return LogEntry(seq, kind, f'{{"seq":{seq}}}')


def filled(n: int, **options: float) -> InMemoryEventLog:
    log = InMemoryEventLog(**options)  # type: ignore[arg-type]
    log.create("r")
    for seq in range(1, n + 1):
        log.append("r", entry(seq))
    return log


Logs = Callable[..., EventLog]


@pytest.fixture(params=["memory", "redis"])
async def make_log(request: pytest.FixtureRequest) -> AsyncIterator[Logs]:
    """``make_log(n, **options)``: a log of either kind with run "r" holding events 1..n."""
    made: list[EventLog] = []

    def make(n: int = 0, **options: Any) -> EventLog:
        log: EventLog
        if request.param == "memory":
            log = InMemoryEventLog(**options)
        else:
            url = request.getfixturevalue("redis_url")
            log = RedisEventLog(url, prefix=f"test:{len(made)}:", **options)
        made.append(log)
        log.create("r")
        for seq in range(1, n + 1):
            log.append("r", entry(seq))
        return log

    yield make
    for log in made:
        await log.aclose()
        if isinstance(log, RedisEventLog):  # nothing refused, nothing dropped on the way
            assert (log.write_errors, log.dropped_writes) == (0, 0)


async def test_read_after_a_cursor_and_the_errors(make_log: Logs) -> None:
    log = make_log(5)
    assert [e.seq for e in (await log.read("r", 2)).entries] == [3, 4, 5]
    assert [e.seq for e in (await log.read("r", 0, limit=2)).entries] == [1, 2]
    assert (await log.read("r", 5)).entries == []
    with pytest.raises(
        CursorError, match=r"cursor 6 is past the end of run 'r': its last event is 5"
    ):
        await log.read("r", 6)
    with pytest.raises(UnknownRun, match=r"no run 'x'"):
        await log.read("x", 0)
    with pytest.raises(ValueError, match=r"expected seq 6, got 8"):
        log.append("r", entry(8))


async def test_follow_replays_then_follows_live_in_batches_and_ends(make_log: Logs) -> None:
    log = make_log(3)
    batches: list[list[int]] = []
    blocked = anyio.Event()

    async def reader() -> None:
        async for batch in log.follow("r", 1):
            batches.append([e.seq for e in batch])
            if batch[-1].seq == 3:
                blocked.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            await blocked.wait()
            await until_waiting(log)
            for seq in (4, 5, 6):  # appended in one go: one batch
                log.append("r", entry(seq))
            await log.flush()
            while len(batches) < 2:  # bounded by fail_after
                await anyio.sleep(0.001)
            await until_waiting(log)
            log.append("r", entry(7, "run-end"))
            log.finish("r")
    assert batches == [[2, 3], [4, 5, 6], [7]]


async def until_waiting(log: EventLog) -> None:
    """Until every reader of the log waits for more (in Redis: joined the shared reader, which
    waits on its channel subscription with nothing left to read)."""
    await anyio.wait_all_tasks_blocked()
    if isinstance(log, RedisEventLog):
        while (
            not log._follows
            or log._dirty
            or not any(c.get("cmd") == "subscribe" for c in await log.redis.client_list())
        ):  # bounded by the caller's fail_after
            await anyio.sleep(0.001)
        await anyio.wait_all_tasks_blocked()


async def test_follow_heartbeat_yields_an_empty_batch_when_idle(make_log: Logs) -> None:
    log = make_log(1)
    seen: list[list[int]] = []
    with anyio.fail_after(5):
        async for batch in log.follow("r", 0, heartbeat=0.01):
            seen.append([e.seq for e in batch])
            if len(seen) == 3:
                break
    assert seen == [[1], [], []]


async def test_cap_drops_the_oldest_and_old_cursors_get_expired(make_log: Logs) -> None:
    log = make_log(40, max_events=16)  # memory: slack 1, trimmed back to 16 when over 17
    info = log.info("r")
    assert info.last_seq == 40 and 40 - info.first_seq + 1 in (16, 17)
    assert await log.ainfo("r") == info  # what Redis says is what the writer knows
    if isinstance(log, InMemoryEventLog):
        assert log.stored_events() <= 17
    else:
        assert info.first_seq == 25  # exact MAXLEN: the last 16
        assert await log.redis.xlen(log.key("r")) == 16
    with pytest.raises(EventsExpired, match=r"were dropped \(at most 16 events are kept per run\)"):
        await log.read("r", 0)
    with pytest.raises(EventsExpired, match=rf"resume from {info.first_seq - 1}"):
        await log.acheck_cursor("r", info.first_seq - 2)
    kept = (await log.read("r", info.first_seq - 1)).entries
    assert [e.seq for e in kept] == list(range(info.first_seq, 41))


async def test_resume_from_every_cursor_gives_each_event_once(make_log: Logs) -> None:
    log = make_log(30)
    log.append("r", entry(31, "run-end"))
    log.finish("r")
    whole = [e async for batch in log.follow("r", 0) for e in batch]
    assert whole == [entry(s) for s in range(1, 31)] + [entry(31, "run-end")]
    for after in range(0, 32):
        got = b""
        async for batch in log.follow_frames("r", after):
            assert batch.events > 0
            got += batch.body
        assert got == b"".join(encode_frame(e) for e in whole[after:])
    assert await log.ainfo("r") == LogInfo(1, 31, True)
    assert (await log.read("r", 31)).finished


async def test_unknown_runs_and_cursors_past_the_end(make_log: Logs) -> None:
    log = make_log(2)
    with pytest.raises(
        UnknownRun, match=r"no run 'nope' \(unknown, or expired after it finished\)"
    ):
        await log.ainfo("nope")
    with pytest.raises(UnknownRun):
        [b async for b in log.follow_frames("nope", 0)]
    with pytest.raises(CursorError, match=r"cursor 3 is past the end of run 'r'"):
        await log.acheck_cursor("r", 3)
    with pytest.raises(CursorError):
        [b async for b in log.follow_frames("r", 3)]
    with pytest.raises(ValueError, match=r"already has a log"):
        log.create("r")


async def test_a_created_run_with_no_event_yet_exists(make_log: Logs) -> None:
    log = make_log(0)
    assert await log.ainfo("r") == LogInfo(1, 0, False)
    assert await log.read("r", 0, wait=0.01) == LogSlice([], False)
    log.finish("r")
    assert await log.ainfo("r") == LogInfo(1, 0, True)
    assert [b async for b in log.follow_frames("r", 0)] == []


async def test_a_finished_run_expires_after_the_ttl_on_both_logs(make_log: Logs) -> None:
    """Real time, both logs: within the TTL a finished run is served; after it, 404
    (``UnknownRun``) for its info, cursors and reads; a run still going is kept."""
    log = make_log(3, ttl=2.0)
    log.create("going")
    log.append("going", entry(1))
    log.finish("r")
    await log.flush(5.0)
    assert await log.acheck_cursor("r", 1) == LogInfo(1, 3, True)
    assert [e.seq for e in (await log.read("r", 0)).entries] == [1, 2, 3]
    await anyio.sleep(2.5)
    assert log.expire() == ["r"]  # in memory the sweeper drops it; Redis deleted the stream
    for check in (log.ainfo("r"), log.acheck_cursor("r", 0), log.read("r", 0)):
        with pytest.raises(UnknownRun, match=r"no run 'r' \(unknown, or expired after it"):
            await check
    assert await log.ainfo("going") == LogInfo(1, 1, False)


async def test_redis_streams_carry_the_ttl_and_an_orphan_ttl(redis_url: str) -> None:
    """On Redis the TTL is the stream's own PEXPIRE: set by ``finish``; a run whose process
    died before it finished expires ``orphan_ttl`` after its last write."""
    import redis.asyncio as aioredis

    log = RedisEventLog(redis_url, prefix="test:ttl:", ttl=30.0, orphan_ttl=300.0)
    direct = aioredis.Redis.from_url(redis_url)
    try:
        log.create("done")
        log.create("orphan")
        log.append("done", entry(1))
        log.append("orphan", entry(1))
        await log.flush(5.0)
        assert 290_000 < await direct.pttl("test:ttl:run:orphan") <= 300_000
        log.finish("done")
        await log.flush(5.0)
        assert 25_000 < await direct.pttl("test:ttl:run:done") <= 30_000
        assert 290_000 < await direct.pttl("test:ttl:run:orphan") <= 300_000
    finally:
        await log.aclose()
        await direct.delete("test:ttl:run:done", "test:ttl:run:orphan")
        await direct.aclose()


async def test_a_run_taken_over_is_fenced_off_its_old_writer(redis_url: str) -> None:
    """A worker taken for dead that is not (stalled, cut off) keeps writing: once the new owner
    fenced the run, Redis skips the old writer's events and the old writer is told, so the
    stream holds one writer's events at each seq, never both interleaved."""
    old = RedisEventLog(redis_url, prefix="test:fence:")
    new = RedisEventLog(redis_url, prefix="test:fence:")
    told: list[str] = []
    old.on_fenced = told.append

    def event(seq: int, writer: str) -> LogEntry:
        return LogEntry(seq, "token", f'{{"seq":{seq},"by":"{writer}"}}')

    try:
        old.create("r")
        for seq in (1, 2, 3):
            old.append("r", event(seq, "old"))
        assert await old.flush(5.0)
        await new.fence("r")  # the takeover: fence, then read the log, then continue it
        assert (await new.ainfo("r")).last_seq == 3
        new.adopt("r", 3)
        old.append("r", event(4, "old"))  # the old owner goes on, unaware
        old.append("r", event(5, "old"))
        assert await old.flush(5.0)
        assert told == ["r"] and old.fenced == 1
        old.append("r", event(6, "old"))  # dropped here: nothing more is sent
        old.finish("r")
        assert await old.flush(5.0)
        for seq in (4, 5, 6):
            new.append("r", event(seq, "new"))
        new.finish("r")
        assert await new.flush(5.0)
        entries = (await new.read("r", 0)).entries
        assert [(e.seq, e.data) for e in entries] == [
            (1, '{"seq":1,"by":"old"}'),
            (2, '{"seq":2,"by":"old"}'),
            (3, '{"seq":3,"by":"old"}'),
            (4, '{"seq":4,"by":"new"}'),
            (5, '{"seq":5,"by":"new"}'),
            (6, '{"seq":6,"by":"new"}'),
        ]
        assert (await new.ainfo("r")).finished
        # a create the old writer sent late (queued while it was cut off) claims nothing back
        await new.fence("q")
        new.adopt("q", 0)
        new.append("q", event(1, "new"))
        old.create("q")
        old.append("q", event(1, "old"))
        old.append("q", event(2, "old"))
        assert await old.flush(5.0) and await new.flush(5.0)
        assert told == ["r", "q"] and old.fenced == 2
        entries = (await new.read("q", 0)).entries
        assert [(e.seq, e.data) for e in entries] == [(1, '{"seq":1,"by":"new"}')]
        assert (old.write_errors, new.write_errors, new.fenced) == (0, 0, 0)
    finally:
        await new.redis.delete(*(f"test:fence:run:{r}{w}" for r in "rq" for w in ("", ":w")))
        await old.aclose()
        await new.aclose()


async def test_finished_runs_expire_after_the_ttl() -> None:
    now = [100.0]
    log = filled(2, ttl=10.0)
    log.clock = lambda: now[0]
    log.create("other")
    log.finish("r")
    now[0] = 109.9
    assert log.expire() == []
    now[0] = 110.0
    assert log.expire() == ["r"]  # "other" is not finished: kept
    with pytest.raises(UnknownRun):
        log.info("r")
    assert log.info("other").finished is False


# -- encoded frames: the hot path (follow_frames), compressed blocks --------------------------


def frames_of(seqs: range, kind: str = "token") -> bytes:
    return b"".join(encode_frame(entry(seq, kind)) for seq in seqs)


async def test_frames_are_the_encoded_events_as_one_write() -> None:
    log = filled(5)
    batch = log.frames("r", 2)
    assert batch == FrameBatch(frames_of(range(3, 6)), 3, 5)
    assert log.frames("r", 5) == FrameBatch(b"", 0, 5)
    assert log.codec is SSE_CODEC


@pytest.mark.parametrize("block_bytes", [1, 64, 100, 16 * 1024])
async def test_sealed_blocks_read_back_identical(block_bytes: int) -> None:
    log = filled(50, block_bytes=block_bytes)
    run = log._runs["r"]
    if block_bytes < 100:  # under a block, plus the newest frame (sealing comes before appending)
        assert run.blocks and len(run.tail) < block_bytes + 40
    # the newest frame is always uncompressed: a viewer that keeps up never inflates a block
    assert run.tail.endswith(encode_frame(entry(50)))
    assert log.entries("r") == [entry(seq) for seq in range(1, 51)]
    for after in (0, 1, 17, 49):
        assert [e.seq for e in (await log.read("r", after, limit=7)).entries] == list(
            range(after + 1, min(after + 7, 50) + 1)
        )
    log.append("r", entry(51, "run-end"))
    log.finish("r")
    assert not run.tail and run.blocks  # a finished run is all compressed
    if block_bytes > 1000:
        assert log.stored_bytes() < len(frames_of(range(1, 52))) / 2
    got = b""
    async for batch in log.follow_frames("r", 0):
        got += batch.body
        assert batch.events > 0
    assert got == frames_of(range(1, 51)) + encode_frame(entry(51, "run-end"))


async def test_replay_is_chunked_by_bytes() -> None:
    log = filled(200, block_bytes=1 << 20)
    first = log.frames("r", 0, max_bytes=100)
    assert first.events >= 1 and first.body == frames_of(range(1, first.last_seq + 1))
    assert log.frames("r", 0, max_bytes=1).events == 1  # at least one event


@pytest.mark.parametrize("block_bytes", [64, 16 * 1024])
async def test_cap_with_blocks_keeps_the_window(block_bytes: int) -> None:
    log = filled(400, max_events=16, block_bytes=block_bytes)
    info = log.info("r")
    assert info.last_seq == 400 and 400 - info.first_seq + 1 in (16, 17)
    kept = log.entries("r", info.first_seq - 1)
    assert kept == [entry(seq) for seq in range(info.first_seq, 401)]
    assert log.stored_bytes() < 4 * len(frames_of(range(1, 18))) + block_bytes
    with pytest.raises(EventsExpired):
        log.frames("r", 0)


async def test_follow_frames_batches_what_arrived_pings_when_idle_and_ends() -> None:
    log = filled(3)
    batches: list[tuple[bytes, int, int]] = []

    async def reader() -> None:
        async for batch in log.follow_frames("r", 1, heartbeat=0.05):
            batches.append(tuple(batch))  # type: ignore[arg-type]

    with anyio.fail_after(3):
        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            for seq in (4, 5, 6):  # appended in one go: one write
                log.append("r", entry(seq))
            await anyio.wait_all_tasks_blocked()
            assert len(log._runs["r"].waiters) == 1
            await anyio.sleep(0.12)  # idle: pings
            log.append("r", entry(7, "run-end"))
            log.finish("r")
    assert batches[0] == (frames_of(range(2, 4)), 2, 3)
    assert batches[1] == (frames_of(range(4, 7)), 3, 6)
    pings = batches[2:-1]
    assert 1 <= len(pings) <= 3 and all(p == (b"", 0, 6) for p in pings)
    assert batches[-1] == (encode_frame(entry(7, "run-end")), 1, 7)
    assert not log._runs["r"].waiters


async def test_follow_frames_closed_early_leaves_no_waiter_and_a_discarded_run_ends_it() -> None:
    log = filled(1)
    stream: Any = log.follow_frames("r", 1, heartbeat=10)
    with anyio.move_on_after(0.02):
        await stream.__anext__()  # waits: nothing after 1
    await stream.aclose()
    assert not log._runs["r"].waiters

    errors: list[Exception] = []

    async def drain() -> None:
        try:
            async for _ in log.follow_frames("r", 1):
                pass
        except UnknownRun as exc:
            errors.append(exc)

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(drain)
            await anyio.wait_all_tasks_blocked()
            log.discard("r")
    assert len(errors) == 1


async def test_base_follow_frames_encodes_entries() -> None:
    log = filled(4)
    log.finish("r")
    got = [tuple(b) async for b in EventLog.follow_frames(log, "r", 1)]
    assert got == [(frames_of(range(2, 5)), 3, 4)]


async def test_lone_surrogates_become_json_escapes_on_the_wire() -> None:
    frame = encode_frame(LogEntry(1, "token", '{"text":"smile \ud83d"}'))
    assert frame == b'event: token\ndata: {"text":"smile \\ud83d"}\nid: 1\n\n'


async def test_interleaved_runs_and_long_bursts_read_back_whole(make_log: Logs) -> None:
    # one writer round trip carries several runs' events and bursts over a script call's size
    log = make_log(0)
    log.create("r2")
    other = 0
    for seq in range(1, 2501):
        log.append("r", entry(seq))
        if seq % 7 == 0:
            other += 1
            log.append("r2", entry(other))
    for run_id, last in (("r", 2500), ("r2", other)):
        log.finish(run_id)
        got = [e async for batch in log.follow(run_id, 0) for e in batch]
        assert got == [entry(seq) for seq in range(1, last + 1)]
        assert await log.ainfo(run_id) == LogInfo(1, last, True)


# -- the Redis log's shared reader: one XREAD for every viewer of the process -------------


async def _blocked(log: RedisEventLog) -> int:
    """Clients of this log blocked in Redis (XREAD BLOCK), by CLIENT LIST's ``b`` flag."""
    return sum("b" in c["flags"] for c in await log.redis.client_list())


async def test_redis_viewers_of_many_runs_share_one_reader_connection(redis_url: str) -> None:
    log = RedisEventLog(redis_url, prefix="test:shared:")
    runs = [f"r{i}" for i in range(40)]
    for run_id in runs:
        log.create(run_id)
    await log.flush(5)
    got: dict[tuple[str, int], list[int]] = {}

    async def view(run_id: str, viewer: int) -> None:
        seqs = got.setdefault((run_id, viewer), [])
        async for batch in log.follow(run_id, 0):
            seqs.extend(e.seq for e in batch)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for run_id in runs:
                for viewer in range(3):  # 120 live viewers
                    tg.start_soon(view, run_id, viewer)
            while sum(len(fs) for fs in log._follows.values()) < 120:  # all at the top, waiting
                await anyio.sleep(0.01)  # bounded by fail_after
            blocked = await _blocked(log)
            clients = await log.redis.client_list()
            for seq in range(1, 31):
                for run_id in runs:
                    log.append(run_id, entry(seq))
                await anyio.sleep(0.001)
            for run_id in runs:
                log.finish(run_id)
    assert got == {(r, v): list(range(1, 31)) for r in runs for v in range(3)}
    # 120 viewers following live: no XREAD blocked in Redis for them (their runs' channels
    # bring the frames on one subscription connection), and the pool never opened more than
    # its bound while 120 replays started at once
    assert blocked == 0
    assert [c["sub"] for c in clients if c["flags"] == "P"] == ["40"]  # one subscription
    assert len(clients) <= POOL_CONNECTIONS + 1
    assert log._follows == {}
    await log.aclose()


async def test_redis_frames_reach_another_process_on_their_runs_channel_alone(
    redis_url: str,
) -> None:
    # the write script PUBLISHes each run's frames on the run's key: a viewer in another
    # process gets them with no read of the stream at all, and only the viewers of that run
    writer = RedisEventLog(redis_url, prefix="test:targeted:")  # another process's writes
    log = RedisEventLog(redis_url, prefix="test:targeted:", sweep_seconds=60)
    runs = [f"r{i}" for i in range(20)]
    for run_id in runs:
        writer.create(run_id)
    await writer.flush(5)
    seen: dict[str, list[int]] = {run_id: [] for run_id in runs}

    async def view(run_id: str) -> None:
        async for batch in log.follow(run_id, 0):
            seen[run_id].extend(e.seq for e in batch)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for run_id in runs:
                tg.start_soon(view, run_id)
            while len(log._confirmed) < len(runs) or log._dirty or log.reading:
                await anyio.sleep(0.01)
            reads = log.shared_reads
            for seq in range(1, 6):  # only r3 is written to
                writer.append("r3", entry(seq))
                await writer.flush(5)
                while seen["r3"] != list(range(1, seq + 1)):
                    await anyio.sleep(0.005)
            assert log.shared_reads == reads  # the channel brought them: no XREAD
            for run_id in runs:
                writer.finish(run_id)
    assert seen == {run_id: list(range(1, 6)) if run_id == "r3" else [] for run_id in runs}
    assert log._viewers == {} and log._confirmed == set()  # the channels are unsubscribed
    await writer.aclose()
    await log.aclose()


async def test_redis_a_channel_message_past_a_gap_is_not_trusted(redis_url: str) -> None:
    # a message that does not continue what a viewer has (one lost with a connection, or a
    # stray one) hands it nothing: the shared read fills the gap from the stream, once
    log = RedisEventLog(redis_url, prefix="test:gap:", sweep_seconds=60)
    log.create("r")
    log.append("r", entry(1))
    seen: list[int] = []

    async def view() -> None:
        async for batch in log.follow("r", 0):
            seen.extend(e.seq for e in batch)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(view)
            while b"test:gap:run:r" not in log._confirmed or log._dirty or log.reading:
                await anyio.sleep(0.005)
            assert seen == [1]
            reads = log.shared_reads
            stray = SSE_CODEC.encode(entry(9))
            await log.redis.publish(log.key("r"), b"9 %d\n" % len(stray) + stray)
            while log.shared_reads == reads:  # the gap asks for a read
                await anyio.sleep(0.005)
            assert seen == [1]
            for seq in (2, 3):
                log.append("r", entry(seq))
            log.finish("r")
    assert seen == [1, 2, 3]
    await log.aclose()


async def test_redis_a_lost_subscription_is_reopened_and_loses_nothing(redis_url: str) -> None:
    # Redis drops the subscription connection (CLIENT KILL) while viewers follow: what was
    # published while it was away is read from the streams once the new connection's
    # subscriptions are confirmed, and the channels bring the rest; no gap, no duplicate
    writer = RedisEventLog(redis_url, prefix="test:lost:")
    log = RedisEventLog(redis_url, prefix="test:lost:", sweep_seconds=60)
    runs = ["a", "b", "c"]
    for run_id in runs:
        writer.create(run_id)
    await writer.flush(5)
    seen: dict[str, list[int]] = {run_id: [] for run_id in runs}

    async def view(run_id: str) -> None:
        async for batch in log.follow(run_id, 0):
            seen[run_id].extend(e.seq for e in batch)

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            for run_id in runs:
                tg.start_soon(view, run_id)
            while len(log._confirmed) < len(runs) or log._dirty or log.reading:
                await anyio.sleep(0.005)
            first = log._sub
            assert first is not None
            killed = await writer.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            assert killed == 1
            for run_id in runs:  # published while no subscription listens
                for seq in (1, 2):
                    writer.append(run_id, entry(seq))
            await writer.flush(5)
            while log._sub is first or len(log._confirmed) < len(runs):
                await anyio.sleep(0.005)
            for run_id in runs:
                writer.append(run_id, entry(3))
                writer.finish(run_id)
    assert seen == {run_id: [1, 2, 3] for run_id in runs}
    assert log._sub is not None and log._sub is not first and log._sub.open
    await writer.aclose()
    await log.aclose()


async def test_redis_a_viewer_joining_as_the_run_ends_is_not_left_waiting(
    redis_url: str,
) -> None:
    # the write (and its message on the channel) may land between the viewer's own replay read
    # and its joining the shared reader: the read after a join covers it
    writer = RedisEventLog(redis_url, prefix="test:race:")
    log = RedisEventLog(redis_url, prefix="test:race:")
    with anyio.fail_after(20):
        for round_ in range(30):
            run_id = f"r{round_}"
            writer.create(run_id)
            await writer.flush(5)
            got: list[int] = []

            async def view(run_id: str = run_id, got: list[int] = got) -> None:
                async for batch in log.follow(run_id, 0):
                    got.extend(e.seq for e in batch)

            async with anyio.create_task_group() as tg:
                tg.start_soon(view)
                for _ in range(round_ % 4):  # the write lands at a different point each round
                    await anyio.sleep(0)
                writer.append(run_id, entry(1))
                writer.finish(run_id)
                await writer.flush(5)
            assert got == [1]
    await writer.aclose()
    await log.aclose()


async def test_redis_a_viewer_that_falls_behind_catches_up_by_itself(redis_url: str) -> None:
    from stagecast.api.redislog import LAG_FRAMES

    log = RedisEventLog(redis_url, prefix="test:lag:")
    log.create("r")
    log.append("r", entry(1))
    seen: list[int] = []
    total = LAG_FRAMES * 3
    with anyio.fail_after(30):
        stream = log.follow("r", 0)
        seen.extend(e.seq for e in await stream.__anext__())  # joined the shared reader
        for seq in range(2, total + 1):  # the viewer does not read while these arrive
            log.append("r", entry(seq))
        await log.flush(5)
        for _ in range(50):  # the shared reader hands out until the viewer is LAG_FRAMES over
            await anyio.sleep(0.02)
            if not log._follows:
                break
        assert log._follows == {}  # it left the shared read instead of buffering it all
        log.finish("r")
        async for batch in stream:
            seen.extend(e.seq for e in batch)
    assert seen == list(range(1, total + 1))
    await log.aclose()


async def test_redis_a_lagging_viewer_whose_events_were_capped_gets_expired(
    redis_url: str,
) -> None:
    from stagecast.api.redislog import LAG_FRAMES

    log = RedisEventLog(redis_url, prefix="test:lagcap:", max_events=LAG_FRAMES)
    log.create("r")
    log.append("r", entry(1))
    with anyio.fail_after(30):
        stream = log.follow("r", 0)
        assert [e.seq for e in await stream.__anext__()] == [1]
        for seq in range(2, LAG_FRAMES * 4):
            log.append("r", entry(seq))
        await log.flush(5)
        seen: list[int] = []
        with pytest.raises(EventsExpired, match=r"at most 4000 events are kept per run"):
            async for batch in stream:
                seen.extend(e.seq for e in batch)
    assert seen == list(range(2, len(seen) + 2))  # what it got had no gap
    await log.aclose()


async def test_redis_cut_connections_lose_no_event_of_a_shared_viewer(redis_url: str) -> None:
    # every connection cut (the subscription too: a message may be lost while redis-py
    # reconnects it): the viewers go on and get every event once
    log = RedisEventLog(redis_url, prefix="test:cut:", retry_seconds=0.05)
    runs = ["a", "b", "c"]
    for run_id in runs:
        log.create(run_id)
    got: dict[str, list[int]] = {run_id: [] for run_id in runs}

    async def view(run_id: str) -> None:
        async for batch in log.follow(run_id, 0):
            got[run_id].extend(e.seq for e in batch)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for run_id in runs:
                tg.start_soon(view, run_id)
            while len(log._follows) < len(runs):
                await anyio.sleep(0.01)
            for run_id in runs:
                log.append(run_id, entry(1))
            await log.flush(5)
            while any(seqs != [1] for seqs in got.values()):
                await anyio.sleep(0.01)
            for kind in ("normal", "pubsub"):
                await log.redis.client_kill_filter(skipme=True, _type=kind)
            for run_id in runs:  # written at once, while the subscription may still be away
                log.append(run_id, entry(2))
                log.finish(run_id)
    assert got == {run_id: [1, 2] for run_id in runs}
    await log.aclose()


async def test_redis_away_ends_every_shared_viewer_with_unavailable(
    redis_url: str, redis_server: Any
) -> None:
    from stagecast.api.eventlog import EventLogUnavailable

    log = RedisEventLog(redis_url, prefix="test:away:", retry_seconds=0.05)
    for run_id in ("a", "b"):
        log.create(run_id)
    await log.flush(5)
    errors: list[str] = []

    async def view(run_id: str) -> None:
        try:
            async for _ in log.follow(run_id, 0):
                pass
        except EventLogUnavailable as exc:
            errors.append(str(exc))

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(view, "a")
                tg.start_soon(view, "b")
                while len(log._follows) < 2:
                    await anyio.sleep(0.01)
                redis_server.stop()  # Redis is gone (the next test's redis_url starts it again)
        assert len(errors) == 2
        assert all(e.startswith("the event log (Redis) is unavailable: ") for e in errors)
        assert log._follows == {}
    finally:
        for task in (log._writer, log._reader, log._reopening):  # nothing to send to it
            if task is not None:
                task.cancel()
        if log._sub is not None:
            await log._sub.aclose()
        await log.redis.aclose()


async def test_redis_a_viewer_behind_a_shared_read_catches_up_instead_of_a_false_410(
    redis_url: str,
) -> None:
    # a viewer whose replay answer was handled after a shared read that went past it (two
    # connections, either order): the entries it lacks come before those read; it reads them
    # by itself and gets every event once, with no EventsExpired (nothing was capped)
    from stagecast.api.redislog import _Follow

    log = RedisEventLog(redis_url, prefix="test:behind:")
    log.create("r")
    for seq in range(1, 11):
        log.append("r", entry(seq))
    await log.flush(5)
    key = log.key("r").encode()
    behind = _Follow(key, "r", 7)
    raw = await log._raw.xread({key: b"1-8"}, count=10)  # what a read with cursor 8 returns
    entries = raw[key] if isinstance(raw, dict) else raw[0][1]
    frames = [fields[1] for _, fields in entries]
    log._deliver(key, {behind}, 9, frames, False, lag=True)
    assert behind.lagging and behind.error is None and behind.frames == []
    log.finish("r")
    got = [e.seq async for batch in log.follow("r", 7) for e in batch]
    assert got == [8, 9, 10]
    await log.aclose()
