"""InMemoryEventLog: cursors, follow, the per-run cap and the TTL."""

from __future__ import annotations

import anyio
import pytest

from api.eventlog import CursorError, EventsExpired, InMemoryEventLog, LogEntry, UnknownRun

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
