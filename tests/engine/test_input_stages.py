"""Input stages: a run pauses for a person's answer, checks it, and goes on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import yaml

from stagecast.engine.asking import AnswerRefused, NotWaiting, PendingInput
from stagecast.engine.chain import Chain
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.spec import ChainSpec
from tests.fakes import ScriptedChatModel, fmt

pytestmark = pytest.mark.anyio


def chain_of(text: str) -> Chain:
    return Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(text)), id="test")


class Driver:
    """Runs a chain; ``on_ask`` sees each pending input (and may answer it, now or later)."""

    def __init__(self, chain: Chain, inputs: dict[str, Any] | None = None, **options: Any):
        self.events: list[Any] = []
        self.asked: list[PendingInput] = []
        self.changed = asyncio.Event()
        options.setdefault("retry_backoff", 0.0)
        self.run = ChainRun(
            chain, inputs or {}, sink=self._sink, on_input=self.asked.append, **options
        )

    def _sink(self, event: Any) -> None:
        self.events.append(event)
        self.changed.set()

    async def wait_for(self, test: Callable[[], bool]) -> None:
        with anyio.fail_after(5):
            while not test():
                self.changed.clear()
                await self.changed.wait()

    async def waiting(self, count: int = 1) -> PendingInput:
        """Wait until the run has asked ``count`` questions; the last one."""
        await self.wait_for(lambda: len(self.asked) >= count)
        await asyncio.sleep(0)
        return self.asked[count - 1]

    def lines(self) -> list[str]:
        return [fmt(e) for e in self.events]


ONE_QUESTION = """
defaults: {model: fake}
stages:
  - id: ask
    kind: input
    label: Your name
    prompt: "What is your name, {{ inputs.title }}?"
  - id: greet
    kind: llm
    prompt: "Greet {{ stages.ask.output }}"
inputs:
  title: {type: string, default: friend}
"""


async def test_an_input_stage_pauses_the_run_until_the_answer_and_the_answer_is_its_output() -> (
    None
):
    model = ScriptedChatModel(scripts=[["Hello", " Ada"]])
    driver = Driver(chain_of(ONE_QUESTION), models={"fake": model})
    task = asyncio.create_task(driver.run.execute())
    asked = await driver.waiting()
    assert driver.run.status == "waiting_input"
    assert (asked.stage, asked.path, asked.prompt) == ("ask", ["ask"], "What is your name, friend?")
    assert asked.schema == {"type": "string"}
    assert driver.run.pending_inputs == [asked]
    assert model.calls == []  # nothing after the input runs before the answer
    required = driver.events[-1]
    assert required.type == "input-required"
    assert (required.stage, required.path, required.attempt) == ("ask", ["ask"], 1)
    assert required.schema == {"type": "string"} and required.expires_at is None
    driver.run.answer("ask", ["ask"], "Ada")
    assert driver.run.status == "running" and driver.run.pending_inputs == []
    end = await task
    assert driver.lines() == [
        "run-start",
        "stage-start ask",
        "input-required ask 'What is your name, friend?'",
        "stage-end ask succeeded",
        "stage-start greet",
        "token greet 'Hello'",
        "token greet ' Ada'",
        "stage-end greet succeeded",
        "run-end succeeded",
    ]
    assert driver.events[3].output == "Ada"
    assert [m.content for m in model.calls[0]] == ["Greet Ada"]
    assert end.status == "succeeded"
    assert [e.seq for e in driver.events] == list(range(1, len(driver.events) + 1))


POINTS = """
stages:
  - id: ask
    kind: input
    prompt: How many points?
    schema:
      type: object
      required: [count]
      properties:
        count: {type: integer, minimum: 1, maximum: 10}
        note: {type: string}
"""


async def test_a_wrong_answer_is_refused_with_field_paths_and_the_run_still_waits() -> None:
    driver = Driver(chain_of(POINTS))
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting()
    seen = len(driver.events)
    with pytest.raises(AnswerRefused) as refused:
        driver.run.answer("ask", ["ask"], {"note": 3})
    assert refused.value.problems == {"value.count": "required", "value.note": "expected text"}
    assert str(refused.value) == (
        "the answer to ask was refused: value.count: required; value.note: expected text"
    )
    with pytest.raises(AnswerRefused) as refused:
        driver.run.answer("ask", ["ask"], {"count": 11})
    assert refused.value.problems == {"value.count": "at most 10"}
    with pytest.raises(AnswerRefused) as refused:
        driver.run.answer("ask", ["ask"], "three")
    assert refused.value.problems == {"value": "expected an object"}
    await asyncio.sleep(0.05)
    assert len(driver.events) == seen  # a refused answer emits nothing
    assert driver.run.status == "waiting_input" and not task.done()
    driver.run.answer("ask", ["ask"], {"count": 3})
    end = await task
    assert end.status == "succeeded" and end.outputs == {"output": {"count": 3}}


async def test_two_answers_race_for_one_input_the_first_wins_the_second_is_not_waiting() -> None:
    driver = Driver(chain_of(POINTS))
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting()
    driver.run.answer("ask", ["ask"], {"count": 1})
    with pytest.raises(NotWaiting) as late:
        driver.run.answer("ask", ["ask"], {"count": 2})
    assert str(late.value) == "ask is not waiting for input; the run is not waiting for any"
    assert late.value.waiting == []
    end = await task
    assert end.outputs == {"output": {"count": 1}}


async def test_an_answer_to_a_stage_that_is_not_waiting_names_what_is() -> None:
    driver = Driver(chain_of(POINTS))
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting()
    with pytest.raises(NotWaiting) as wrong:
        driver.run.answer("other", ["other"], 1)
    assert str(wrong.value) == "other is not waiting for input; waiting: ask"
    assert wrong.value.waiting == [{"stage": "ask", "path": ["ask"]}]
    driver.run.answer("ask", None, {"count": 4})  # no path: the stage's one pending input
    assert (await task).status == "succeeded"


async def test_cancel_while_paused_ends_the_input_stage_and_the_run_cancelled() -> None:
    driver = Driver(chain_of(POINTS))
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting()
    driver.run.cancel()
    end = await task
    assert driver.lines() == [
        "run-start",
        "stage-start ask",
        "input-required ask 'How many points?'",
        "stage-end ask cancelled",
        "run-end cancelled",
    ]
    assert end.status == "cancelled" and driver.run.pending_inputs == []
    with pytest.raises(NotWaiting):
        driver.run.answer("ask", ["ask"], {"count": 1})


TIMED = """
stages:
  - id: ask
    kind: input
    prompt: Quick!
    timeout: 0.2
{default}
"""


async def test_no_answer_before_the_timeout_fails_the_stage_and_the_run() -> None:
    driver = Driver(chain_of(TIMED.format(default="")))
    end = await asyncio.wait_for(driver.run.execute(), 5)
    assert driver.lines()[-2:] == ["stage-end ask failed", "run-end failed"]
    assert driver.events[2].expires_at is not None
    assert abs(driver.events[2].expires_at - driver.events[2].ts - 200) <= 5
    assert (end.error.type, end.error.stage) == ("input_timeout", "ask")
    assert end.error.message == "no answer within 0.2 s (the stage's timeout)"


async def test_no_answer_before_the_timeout_takes_the_default_when_there_is_one() -> None:
    driver = Driver(chain_of(TIMED.format(default="    default: pass")))
    end = await asyncio.wait_for(driver.run.execute(), 5)
    assert driver.lines()[-2:] == ["stage-end ask succeeded", "run-end succeeded"]
    assert end.outputs == {"output": "pass"}


async def test_the_run_wide_wait_limit_ends_the_run_failed_with_a_clear_error() -> None:
    driver = Driver(chain_of(POINTS), max_input_wait=0.2)
    end = await asyncio.wait_for(driver.run.execute(), 5)
    assert end.status == "failed"
    assert end.error.message == (
        "no answer within 0.2 s (the limit on waiting for input, max_input_wait)"
    )


MAP_OF_INPUTS = """
stages:
  - id: names
    kind: map
    over: "{{ ['a', 'b', 'c'] }}"
    concurrency: 3
    stage:
      kind: input
      prompt: "Name for {{ item }} (#{{ index }})"
"""


async def test_a_map_of_inputs_asks_one_item_at_a_time_in_order_whatever_its_concurrency() -> None:
    driver = Driver(chain_of(MAP_OF_INPUTS))
    task = asyncio.create_task(driver.run.execute())
    for n, item in enumerate("abc"):
        asked = await driver.waiting(n + 1)
        await asyncio.sleep(0.02)  # the later items would have asked by now if they could
        assert [p.path for p in driver.run.pending_inputs] == [["names", n]]
        assert asked.prompt == f"Name for {item} (#{n})"
        driver.run.answer("names", ["names", n], item.upper())
    end = await task
    assert [line for line in driver.lines() if "input-required" in line] == [
        "input-required names[0] 'Name for a (#0)'",
        "input-required names[1] 'Name for b (#1)'",
        "input-required names[2] 'Name for c (#2)'",
    ]
    assert end.outputs == {"output": ["A", "B", "C"]}


INTERVIEW = """
defaults: {model: fake}
stages:
  - id: rounds
    kind: map
    over: "{{ [1, 2] }}"
    concurrency: 2
    stages:
      - id: question
        kind: llm
        prompt: "Ask #{{ index }}; so far: {% for turn in earlier %}{{ turn.answer }};{% endfor %}"
      - id: answer
        kind: input
        prompt: "{{ stages.question.output }}"
      - id: verdict
        kind: llm
        prompt: "Judge {{ stages.answer.output }} to {{ stages.question.output }}"
  - id: report
    kind: template
    text: "{% for r in stages.rounds.output %}{{ r.answer }}={{ r.verdict }} {% endfor %}"
"""


async def test_a_map_of_stage_sequences_runs_each_item_in_turn_and_reads_earlier_items() -> None:
    model = ScriptedChatModel(scripts=[["Q0"], ["Q1"], ["V0"], ["V1"]])
    driver = Driver(chain_of(INTERVIEW), models={"fake": model}, max_concurrency=1)
    task = asyncio.create_task(driver.run.execute())
    first = await driver.waiting(1)
    assert (first.stage, first.path, first.prompt) == ("rounds", ["rounds", 0, "answer"], "Q0")
    driver.run.answer("rounds", ["rounds", 0, "answer"], "yes")
    second = await driver.waiting(2)
    assert second.path == ["rounds", 1, "answer"]
    driver.run.answer("rounds", ["rounds", 1, "answer"], "no")
    end = await task
    # item 1 started while item 0 was running (concurrency 2), so it saw no earlier item, and
    # its question was written while item 0 waited; it asked only once item 0 had ended
    assert [m[0].content for m in model.calls] == [
        "Ask #0; so far: ",
        "Ask #1; so far: ",
        "Judge yes to Q0",
        "Judge no to Q1",
    ]
    lines = driver.lines()
    assert lines.index("stage-end rounds[0].verdict succeeded") < lines.index(
        "input-required rounds[1].answer 'Q1'"
    )
    assert end.outputs == {"output": "yes=V0 no=V1 "}
    rounds_end = next(e for e in driver.events if e.type == "stage-end" and e.path == ["rounds"])
    assert rounds_end.output == [
        {"question": "Q0", "answer": "yes", "verdict": "V0"},
        {"question": "Q1", "answer": "no", "verdict": "V1"},
    ]
    starts = [e for e in driver.events if e.type == "stage-start" and len(e.path) == 3]
    assert [(e.path, e.kind, e.index, e.total) for e in starts[:3]] == [
        (["rounds", 0, "question"], "llm", 0, 2),
        (["rounds", 0, "answer"], "input", 0, 2),
        (["rounds", 1, "question"], "llm", 1, 2),
    ]


async def test_a_sequential_map_adapts_to_earlier_answers() -> None:
    model = ScriptedChatModel(scripts=[["Q0"], ["V0"], ["Q1"], ["V1"]])
    chain = chain_of(INTERVIEW.replace("concurrency: 2", "concurrency: 1"))
    driver = Driver(chain, models={"fake": model})
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting(1)
    driver.run.answer("rounds", ["rounds", 0, "answer"], "yes")
    await driver.waiting(2)
    driver.run.answer("rounds", ["rounds", 1, "answer"], "no")
    await task
    assert model.calls[2][0].content == "Ask #1; so far: yes;"
    progress = [e.progress for e in driver.events if e.type == "stage-end"]
    assert progress == sorted(progress) and progress[-1] == 1.0


PARALLEL = """
defaults: {model: fake}
stages:
  - id: ask
    kind: input
    prompt: Wait for me
  - id: side
    kind: llm
    prompt: independent work
"""


async def test_a_waiting_input_holds_no_slot_of_the_concurrency_limit() -> None:
    model = ScriptedChatModel(scripts=[["done"]])
    driver = Driver(chain_of(PARALLEL), models={"fake": model}, max_concurrency=1)
    task = asyncio.create_task(driver.run.execute())
    await driver.waiting()
    await driver.wait_for(lambda: "stage-end side succeeded" in driver.lines())
    assert driver.run.status == "waiting_input"
    driver.run.answer("ask", ["ask"], "ok")
    assert (await task).status == "succeeded"
