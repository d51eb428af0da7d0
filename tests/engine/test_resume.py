"""Continuing an interrupted run from its own log (``engine.reuse.Resume``): cut a finished
run's events after every event, continue from each cut, and check what the whole stream says."""

from __future__ import annotations

import asyncio

import anyio
import pytest
import yaml

from stagecast.engine.asking import PendingInput
from stagecast.engine.chain import Chain
from stagecast.engine.events import (
    ErrorInfo,
    RunEvent,
    StageEnded,
    StageRetried,
    StageStarted,
    Token,
    event_from_json,
    event_to_json,
)
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.reuse import Resume, ResumeError
from stagecast.engine.spec import ChainSpec
from tests.fakes import CountingOfflineModel, fmt

pytestmark = pytest.mark.anyio

LOST = ErrorInfo(type="worker_lost", message="the worker w1 stopped: no heartbeat for 1 s")

CHAIN = """
version: 3
inputs:
  topic: {type: string}
defaults: {model: fake}
stages:
  - id: outline
    kind: llm
    prompt: "Outline {{ inputs.topic }}"
  - id: never
    kind: template
    when: "{{ false }}"
    text: "not run"
  - id: parts
    kind: map
    over: "{{ ['a', 'b', 'c'] }}"
    as: part
    concurrency: 2
    stage:
      kind: llm
      prompt: "Write part {{ part }} of {{ stages.outline.output }}"
  - id: interview
    kind: map
    over: "{{ [1, 2] }}"
    as: turn
    concurrency: 1
    stages:
      - id: question
        kind: llm
        prompt: "Question {{ turn }} on {{ stages.parts.output | length }} parts"
      - id: answer
        kind: input
        prompt: "Answer {{ stages.question.output }}"
        schema: {type: integer}
  - id: final
    kind: llm
    prompt: "Sum up {{ stages.interview.output }}"
outputs:
  parts: "{{ stages.parts.output }}"
  answers: "{{ stages.interview.output | map(attribute='answer') | list }}"
  final: "{{ stages.final.output }}"
"""


def chain_of(text: str) -> Chain:
    return Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(text)), id="resumed")


def where(event: RunEvent) -> tuple[str | int, ...]:
    assert event.path is not None
    return tuple(event.path)


async def drive(
    chain: Chain, log: list[str], resume: Resume | None = None, run_id: str | None = None
) -> list[RunEvent]:
    """Run (or continue) the chain; every input is answered with its path's turn number."""
    events: list[RunEvent] = []
    holder: list[ChainRun] = []

    def answer(pending: PendingInput) -> None:
        value = int(pending.path[1]) + 1
        asyncio.get_running_loop().call_soon(holder[0].answer, pending.stage, pending.path, value)

    run = ChainRun(
        chain,
        {"topic": "tides"},
        model=CountingOfflineModel(log=log),
        sink=events.append,
        on_input=answer,
        run_id=run_id,
        resume=resume,
        retry_backoff=0.0,
    )
    holder.append(run)
    with anyio.fail_after(10):
        await run.execute()
    return events


def wire(events: list[RunEvent]) -> list[RunEvent]:
    """The events as a log gives them back (through their JSON)."""
    return [event_from_json(event_to_json(e)) for e in events]


async def test_a_run_continued_after_any_event_streams_once_and_ends_as_if_never_cut() -> None:
    chain = chain_of(CHAIN)
    calls: list[str] = []
    whole = await drive(chain, calls)
    assert whole[-1].status == "succeeded", whole[-1]
    assert whole[-1].outputs["answers"] == [1, 2]
    run_id = whole[0].run_id
    cuts = 0
    for cut in range(1, len(whole) - 1):
        head = wire(whole[:cut])
        try:
            resume = Resume(head, LOST)
        except ResumeError as exc:  # only a cut after a failed stage-end: none here
            raise AssertionError(f"cut {cut}: {exc}") from None
        again: list[str] = []
        rest = await drive(chain, again, resume, run_id)
        cuts += 1
        events = head + rest
        lines = [fmt(e) for e in events]
        # one stream: seq 1..n, one run-start (the log's), one run-end, last
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), lines
        assert [e.type for e in events].count("run-start") == 1
        assert [e.type for e in events].count("run-end") == 1 and events[-1].type == "run-end"
        assert events[-1].status == "succeeded", lines
        assert events[-1].outputs == whole[-1].outputs, cut
        # a unit that had ended is not emitted again; one that was running retries once
        ended = {where(e) for e in head if isinstance(e, StageEnded)}
        running = {where(e) for e in head if isinstance(e, StageStarted)} - ended
        ends = [where(e) for e in events if isinstance(e, StageEnded)]
        assert len(ends) == len(set(ends)), lines
        assert {where(e) for e in rest if isinstance(e, StageEnded)}.isdisjoint(ended)
        retried = [e for e in rest if isinstance(e, StageRetried)]
        maps = {("parts",), ("interview",)}
        assert {where(e) for e in retried} == running - maps, (cut, lines)
        for retry in retried:
            assert retry.error.type == "worker_lost" and retry.attempt == 1
            assert retry.error.message == LOST.message
            after = rest[rest.index(retry) + 1]  # then it starts again, attempt 2
            assert isinstance(after, StageStarted) and where(after) == where(retry)
            assert after.attempt == 2
            tokens = [t for t in rest if isinstance(t, Token) and where(t) == where(retry)]
            assert all(t.attempt == 2 for t in tokens)
        # a map that was running goes on: no second stage-start of the map itself
        starts = [where(e) for e in events if isinstance(e, StageStarted)]
        assert starts.count(("parts",)) == starts.count(("interview",)) == 1, lines
        # progress counts are not sent twice: each completed count once, in order
        for name in ("parts", "interview"):
            counts = [e.completed for e in events if e.type == "stage-progress" and e.stage == name]
            assert counts == list(range(1, len(counts) + 1)), (cut, counts)
        # the model is called again only for what had not ended
        done = sum(1 for e in head if isinstance(e, StageEnded) and chain_kind(e) == "llm")
        assert len(again) == len(calls) - done, (cut, lines)
        # usage: the run's total counts each succeeded stage once (lost attempts report none)
        assert events[-1].usage.output_tokens == whole[-1].usage.output_tokens, cut
    assert cuts == len(whole) - 2


def chain_kind(event: StageEnded) -> str:
    """The kind of the unit a stage-end is of, in CHAIN."""
    path = event.path or []
    if path[0] == "parts":
        return "llm" if len(path) == 2 else "map"
    if path[0] == "interview":
        return "map" if len(path) == 1 else ("llm" if path[-1] == "question" else "input")
    return {"outline": "llm", "never": "template", "final": "llm"}[str(path[0])]


async def test_a_waiting_input_asks_again_after_the_retry() -> None:
    chain = chain_of(CHAIN)
    whole = await drive(chain, [])
    asked = next(i for i, e in enumerate(whole) if e.type == "input-required")
    head = wire(whole[: asked + 1])  # cut while the first answer was awaited
    rest = await drive(chain, [], Resume(head, LOST), whole[0].run_id)
    assert [fmt(e) for e in rest[:3]] == [
        "stage-retry interview[0].answer worker_lost",
        "stage-start interview[0].answer#2",
        "input-required interview[0].answer#2 'Answer " + whole[asked].prompt[7:] + "'",
    ]
    assert rest[-1].status == "succeeded"


async def test_what_cannot_be_continued_is_refused_with_the_reason() -> None:
    chain = chain_of(CHAIN)
    whole = wire(await drive(chain, []))
    with pytest.raises(ResumeError, match=r"starts at seq 5 \(.*\), not at its run-start"):
        Resume(whole[4:9], LOST)
    with pytest.raises(ResumeError, match="starts at nothing"):
        Resume([], LOST)
    with pytest.raises(ResumeError, match="a gap: seq 4 where 3 was expected"):
        Resume(whole[:2] + whole[3:6], LOST)
    with pytest.raises(ResumeError, match="had already ended"):
        Resume(whole, LOST)
    failed = [*whole[:3]]
    end = next(e for e in whole if isinstance(e, StageEnded))
    bad = event_from_json(event_to_json(end).replace('"succeeded"', '"failed"'))
    bad.seq = 4
    with pytest.raises(ResumeError, match="stage outline had already ended failed"):
        Resume([*failed, bad], LOST)
    head = whole[:5]
    other = chain_of(CHAIN.replace("version: 3", "version: 4"))
    with pytest.raises(ResumeError, match="version 3; here 'resumed' is version 4"):
        ChainRun(other, {"topic": "t"}, model=CountingOfflineModel(), resume=Resume(head, LOST))
    edited = chain_of(CHAIN.replace("id: final", "id: last").replace("stages.final", "stages.last"))
    with pytest.raises(ResumeError, match="differ from the run's plan"):
        ChainRun(edited, {"topic": "t"}, model=CountingOfflineModel(), resume=Resume(head, LOST))


async def test_a_continued_run_cancelled_at_once_ends_every_stage_that_was_running() -> None:
    chain = chain_of(CHAIN)
    whole = await drive(chain, [])
    for cut in range(2, len(whole) - 1):
        head = wire(whole[:cut])
        events: list[RunEvent] = []
        run = ChainRun(
            chain,
            {"topic": "tides"},
            model=CountingOfflineModel(),
            sink=events.append,
            run_id=whole[0].run_id,
            resume=Resume(head, LOST),
        )
        task = asyncio.ensure_future(run.execute())
        await asyncio.sleep(0)
        run.cancel()
        with anyio.fail_after(5):
            ended = await task
        assert ended.status == "cancelled"
        stream = head + events
        assert [e.seq for e in stream] == list(range(1, len(stream) + 1))
        started = [where(e) for e in stream if isinstance(e, StageStarted)]
        ends = [where(e) for e in stream if isinstance(e, StageEnded)]
        assert set(started) <= set(ends), (cut, [fmt(e) for e in events])  # every one ends
        for key in set(ends):  # an item's stage-end before its map's; each unit ends once
            assert ends.count(key) == 1
            inner = [i for i, k in enumerate(ends) if k[: len(key)] == key and k != key]
            assert all(i < ends.index(key) for i in inner), (cut, [fmt(e) for e in events])
