"""InMemoryEventLog: cursors, follow, the per-run cap and the TTL; encoded frames and blocks."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from stagecast.api.eventlog import (
    CursorError,
    EventLog,
    EventsExpired,
    FrameBatch,
    LogEntry,
    UnknownRun,
)
from stagecast.api.memlog import InMemoryEventLog
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


async def test_read_after_a_cursor_and_the_errors() -> None:
    log = filled(5)
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


async def test_follow_replays_then_follows_live_in_batches_and_ends() -> None:
    log = filled(3)
    batches: list[list[int]] = []

    async def reader() -> None:
        async for batch in log.follow("r", 1):
            batches.append([e.seq for e in batch])

    with anyio.fail_after(2):
        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            for seq in (4, 5, 6):  # appended in one go: one batch
                log.append("r", entry(seq))
            await anyio.wait_all_tasks_blocked()
            log.append("r", entry(7, "run-end"))
            log.finish("r")
    assert batches == [[2, 3], [4, 5, 6], [7]]


async def test_follow_heartbeat_yields_an_empty_batch_when_idle() -> None:
    log = filled(1)
    seen: list[list[int]] = []
    with anyio.fail_after(2):
        async for batch in log.follow("r", 0, heartbeat=0.01):
            seen.append([e.seq for e in batch])
            if len(seen) == 3:
                break
    assert seen == [[1], [], []]


async def test_cap_drops_the_oldest_and_old_cursors_get_expired() -> None:
    log = filled(40, max_events=16)  # slack 1: trimmed back to 16 when over 17
    info = log.info("r")
    assert info.last_seq == 40 and 40 - info.first_seq + 1 in (16, 17)
    assert log.stored_events() <= 17
    with pytest.raises(EventsExpired, match=r"were dropped \(at most 16 events are kept per run\)"):
        await log.read("r", 0)
    kept = (await log.read("r", info.first_seq - 1)).entries
    assert [e.seq for e in kept] == list(range(info.first_seq, 41))


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
