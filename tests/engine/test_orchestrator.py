"""The orchestrator: exact event sequences, retries, timeouts, cancel, JSON, coalescing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import pytest
import yaml

from stagecast.engine.chain import Chain
from stagecast.engine.errors import InputError, ModelConfigError, TransientError
from stagecast.engine.events import RunEvent, event_from_json, event_to_json
from stagecast.engine.orchestrator import ChainRun, run_chain
from stagecast.engine.spec import ChainSpec
from tests.fakes import ScriptedChatModel, fmt

pytestmark = pytest.mark.anyio


def chain_of(text: str) -> Chain:
    return Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(text)), id="test")


async def collect(chain: Chain, inputs: dict[str, Any] | None = None, **options: Any) -> list[Any]:
    options.setdefault("retry_backoff", 0.0)
    with anyio.fail_after(5):
        return [e async for e in run_chain(chain, inputs or {}, **options)]


TWO_STAGES = """
inputs:
  topic: {type: string}
defaults: {model: fake}
stages:
  - id: outline
    kind: llm
    label: Outlining
    prompt: "Outline {{ inputs.topic }}"
  - id: draft
    kind: llm
    prompt:
      system: You write drafts.
      user: "Draft from: {{ stages.outline.output }}"
  - id: shout
    kind: template
    text: "{{ stages.draft.output | upper }}"
outputs:
  text: "{{ stages.shout.output }}"
  outline: "{{ stages.outline.output }}"
"""


async def test_two_llm_stages_and_a_template_emit_the_exact_sequence() -> None:
    model = ScriptedChatModel(scripts=[["an", " outline"], ["the", " draft"]], usage=(7, 2))
    events = await collect(chain_of(TWO_STAGES), {"topic": "cats"}, models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start outline",
        "token outline 'an'",
        "token outline ' outline'",
        "stage-end outline succeeded",
        "stage-start draft",
        "token draft 'the'",
        "token draft ' draft'",
        "stage-end draft succeeded",
        "stage-start shout",
        "stage-end shout succeeded",
        "run-end succeeded",
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    start, end = events[0], events[-1]
    assert start.model == "fake"
    assert [(p.stage, p.label, p.kind, p.needs, p.weight, p.fan_out) for p in start.plan] == [
        ("outline", "Outlining", "llm", [], 1.0, False),
        ("draft", "draft", "llm", ["outline"], 1.0, False),
        ("shout", "shout", "template", ["draft"], 1.0, False),
    ]
    assert end.outputs == {"text": "THE DRAFT", "outline": "an outline"}
    assert (end.usage.input_tokens, end.usage.output_tokens) == (14, 4)
    ends = [e for e in events if e.type == "stage-end"]
    assert [round(e.progress, 4) for e in ends] == [0.3333, 0.6667, 1.0]
    assert ends[0].output == "an outline" and ends[0].usage.input_tokens == 7
    # the prompt reached the model as rendered, roles included
    assert [m.content for m in model.calls[0]] == ["Outline cats"]
    assert [(m.type, m.content) for m in model.calls[1]] == [
        ("system", "You write drafts."),
        ("human", "Draft from: an outline"),
    ]
    # every event round-trips through the wire JSON and the schema-checked reader
    for event in events:
        assert event_from_json(event_to_json(event)) == event


MAP_CHAIN = """
defaults: {model: fake}
inputs:
  items: {type: array}
stages:
  - id: each
    kind: map
    label: Each item
    over: "{{ inputs['items'] }}"
    as: thing
    concurrency: 3
    weight: 3
    stage:
      kind: llm
      prompt: "{{ index }}:{{ thing }}"
  - id: joined
    kind: template
    text: "{{ stages.each.output | join(',') }}"
"""


async def test_map_runs_items_in_parallel_and_keeps_item_order() -> None:
    # item 0 is the slowest, so items finish out of order; results still come in item order
    model = ScriptedChatModel(scripts=[[0.05, "A"], [0.01, "B"], ["C"], ["D"]])
    events = await collect(
        chain_of(MAP_CHAIN), {"items": ["a", "b", "c", "d"]}, models={"fake": model}
    )
    assert events[-1].status == "succeeded"
    assert events[-1].outputs == {"output": "A,B,C,D"}
    assert {m[0].content for m in model.calls} == {"0:a", "1:b", "2:c", "3:d"}
    item_starts = [e for e in events if e.type == "stage-start" and len(e.path) == 2]
    assert [(e.index, e.total) for e in item_starts] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    progress = [(e.completed, e.total) for e in events if e.type == "stage-progress"]
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    item_ends = [e for e in events if e.type == "stage-end" and len(e.path) == 2]
    assert [e.path[1] for e in item_ends][0] != 0  # item 0 really finished later
    # progress has a real denominator through the fan-out: 3/4 of the weight is the map
    assert [round(e.progress, 4) for e in item_ends] == [0.1875, 0.375, 0.5625, 0.75]
    map_end = next(e for e in events if e.type == "stage-end" and e.path == ["each"])
    assert map_end.output == ["A", "B", "C", "D"] and map_end.progress == 0.75
    assert events[-2].type == "stage-end" and events[-2].progress == 1.0


async def test_empty_map_succeeds_with_an_empty_list() -> None:
    model = ScriptedChatModel(scripts=[])
    events = await collect(chain_of(MAP_CHAIN), {"items": []}, models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start each",
        "stage-end each succeeded",
        "stage-start joined",
        "stage-end joined succeeded",
        "run-end succeeded",
    ]


async def test_independent_stages_run_concurrently() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
stages:
  - {id: a, kind: llm, prompt: "a"}
  - {id: b, kind: llm, prompt: "b"}
  - {id: c, kind: template, text: "{{ stages.a.output }}+{{ stages.b.output }}"}
"""
    )
    model = ScriptedChatModel(scripts=[["a1", 0.02, "a2"], ["b1", 0.02, "b2"]])
    events = await collect(chain, models={"fake": model})
    lines = [fmt(e) for e in events]
    # b starts before a ends: they overlap
    assert lines.index("stage-start b") < lines.index("stage-end a succeeded")
    assert events[-1].outputs == {"output": "a1a2+b1b2"}


async def test_max_concurrency_one_gives_yaml_order() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
stages:
  - {id: a, kind: llm, prompt: "a"}
  - {id: b, kind: llm, prompt: "b"}
"""
    )
    model = ScriptedChatModel(scripts=[["a1", 0.01, "a2"], ["b1"]])
    events = await collect(chain, models={"fake": model}, max_concurrency=1)
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start a",
        "token a 'a1'",
        "token a 'a2'",
        "stage-end a succeeded",
        "stage-start b",
        "token b 'b1'",
        "stage-end b succeeded",
        "run-end succeeded",
    ]


RETRY_CHAIN = """
defaults: {model: fake}
stages:
  - id: ask
    kind: llm
    retries: 2
    prompt: "q"
"""


async def test_transient_error_is_retried_and_the_next_attempt_is_tagged() -> None:
    model = ScriptedChatModel(
        scripts=[["par", TransientError("connection reset", type="connection_error")], ["ok"]]
    )
    events = await collect(chain_of(RETRY_CHAIN), models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start ask",
        "token ask 'par'",
        "stage-retry ask connection_error",
        "token ask#2 'ok'",
        "stage-end ask#2 succeeded",
        "run-end succeeded",
    ]
    retry = events[3]
    assert retry.attempt == 1 and retry.error.message == "connection reset"
    assert events[-1].outputs == {"output": "ok"}
    assert model.closed == [0]


async def test_permanent_error_fails_at_once_with_a_structured_error() -> None:
    model = ScriptedChatModel(scripts=[[ValueError("bad request body")]])
    events = await collect(chain_of(RETRY_CHAIN), models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start ask",
        "stage-end ask failed",
        "run-end failed",
    ]
    assert events[2].error.type == "model_error"
    assert events[2].error.message == "model 'fake': ValueError: bad request body"
    end = events[-1]
    assert (end.error.type, end.error.stage) == ("model_error", "ask")
    assert end.outputs is None


async def test_stage_timeout_is_retried_then_fails_naming_the_attempts() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
stages:
  - {id: slow, kind: llm, prompt: "q", timeout: 0.05, retries: 1}
"""
    )
    model = ScriptedChatModel(scripts=[["t", 5.0, "never"]], cycle=True)
    events = await collect(chain, models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start slow",
        "token slow 't'",
        "stage-retry slow timeout",
        "token slow#2 't'",
        "stage-end slow#2 failed",
        "run-end failed",
    ]
    assert events[-2].error.message == "timed out after 0.05 s (after 2 attempts)"
    assert model.closed == [0, 1]


JSON_CHAIN = """
defaults: {model: fake}
stages:
  - id: facts
    kind: llm
    output: json
    retries: 1
    schema:
      type: array
      minItems: 1
      items: {type: object, required: [name], properties: {name: {type: string}}}
    prompt: "list"
"""


async def test_json_output_is_parsed_and_validated() -> None:
    model = ScriptedChatModel(scripts=[["```json\n", '[{"name": ', '"x"}]', "\n```"]])
    events = await collect(chain_of(JSON_CHAIN), models={"fake": model})
    assert events[-1].status == "succeeded"
    assert events[-2].output == [{"name": "x"}]
    # the model was told to answer with JSON matching the schema
    assert model.calls[0][0].type == "system" and '"minItems": 1' in model.calls[0][0].content


async def test_json_parse_failure_is_retried_then_fails_clearly() -> None:
    model = ScriptedChatModel(scripts=[["not json"], ['[{"nome": "x"}]']])
    events = await collect(chain_of(JSON_CHAIN), models={"fake": model})
    assert [fmt(e) for e in events][-4:] == [
        "stage-retry facts invalid_json",
        'token facts#2 \'[{"nome": "x"}]\'',
        "stage-end facts#2 failed",
        "run-end failed",
    ]
    assert events[3].error.message == (
        "the answer is not valid JSON: Expecting value: line 1 column 1 (char 0); "
        "the answer (8 chars): 'not json'"
    )
    assert events[-2].error.message == (
        "the JSON answer does not match the schema at 0: 'name' is a required property"
        " (after 2 attempts)"
    )


async def test_when_false_skips_the_stage_and_downstream_sees_null() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
inputs:
  polish: {type: boolean, default: false}
stages:
  - {id: draft, kind: llm, prompt: "d"}
  - id: polished
    kind: llm
    when: "{{ inputs.polish }}"
    prompt: "polish {{ stages.draft.output }}"
  - id: final
    kind: template
    text: "{{ stages.polished.output or stages.draft.output }}"
"""
    )
    model = ScriptedChatModel(scripts=[["rough"]])
    events = await collect(chain, models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start draft",
        "token draft 'rough'",
        "stage-end draft succeeded",
        "stage-end polished skipped",
        "stage-start final",
        "stage-end final succeeded",
        "run-end succeeded",
    ]
    assert events[-1].outputs == {"output": "rough"}
    assert events[4].progress == pytest.approx(2 / 3, abs=1e-6)
    assert len(model.calls) == 1


async def test_a_failed_stage_cancels_what_is_still_running() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
stages:
  - {id: slow, kind: llm, prompt: "slow"}
  - {id: broken, kind: llm, prompt: "broken"}
  - {id: after, kind: template, text: "{{ stages.slow.output }}{{ stages.broken.output }}"}
"""
    )

    model = ScriptedChatModel(scripts=[["s", 5.0, "never"], [0.01, PermissionError("denied")]])
    events = await collect(chain, models={"fake": model})
    lines = [fmt(e) for e in events]
    assert lines == [
        "run-start",
        "stage-start slow",
        "token slow 's'",
        "stage-start broken",
        "stage-end broken failed",
        "stage-end slow cancelled",
        "run-end failed",
    ]
    assert events[-1].error.stage == "broken"
    assert sorted(model.closed) == [0, 1]


async def test_cancel_mid_token_closes_the_model_stream() -> None:
    chain = chain_of(MAP_CHAIN)
    model = ScriptedChatModel(scripts=[["x", 0.01]], cycle=True)
    model.scripts[0] = ["t1", "t2", 0.01] + ["t", 0.01] * 200
    got: list[RunEvent] = []
    tokens = asyncio.Event()

    def sink(event: RunEvent) -> None:
        got.append(event)
        if sum(e.type == "token" for e in got) >= 3:
            tokens.set()

    run = ChainRun(chain, {"items": ["a", "b"]}, models={"fake": model}, sink=sink)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        await tokens.wait()
        run.cancel()
        run.cancel()  # idempotent
        end = await task
    assert end.status == "cancelled" and run.status == "cancelled"
    assert got[-1] is end
    lines = [fmt(e) for e in got]
    assert lines[-4:] == [
        "stage-end each[0] cancelled",
        "stage-end each[1] cancelled",
        "stage-end each cancelled",
        "run-end cancelled",
    ]
    assert sorted(model.closed) == [0, 1] and model.completed == []
    assert sum(e.type == "run-end" for e in got) == 1


async def test_closing_the_iterator_cancels_the_run() -> None:
    model = ScriptedChatModel(scripts=[["a", 0.01] * 100])
    chain = chain_of(RETRY_CHAIN)
    with anyio.fail_after(5):
        stream = run_chain(chain, {}, models={"fake": model})
        async for event in stream:
            if event.type == "token":
                break
        await stream.aclose()  # type: ignore[attr-defined]
    assert model.closed == [0]


async def test_token_coalescing_merges_tokens_within_the_window() -> None:
    model = ScriptedChatModel(scripts=[["a", "b", "c", 0.08, "d", "e"]])
    events = await collect(chain_of(RETRY_CHAIN), models={"fake": model}, coalesce_ms=40)
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start ask",
        "token ask 'abc'",
        "token ask 'de'",
        "stage-end ask succeeded",
        "run-end succeeded",
    ]


async def test_input_values_are_data_never_templates() -> None:
    chain = chain_of(TWO_STAGES)
    model = ScriptedChatModel(scripts=[["o"], ["d"]])
    await collect(chain, {"topic": "{{ 7*7 }} {% raw %}"}, models={"fake": model})
    assert model.calls[0][0].content == "Outline {{ 7*7 }} {% raw %}"


@pytest.mark.parametrize(
    "expression",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ inputs.__class__ }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
async def test_sandbox_escapes_fail_with_a_clear_error(expression: str) -> None:
    chain = chain_of(
        f"""
defaults: {{model: fake}}
stages:
  - id: evil
    kind: template
    text: "{expression}"
"""
    )
    events = await collect(chain, models={"fake": ScriptedChatModel(scripts=[])})
    end = events[-2]
    assert (end.type, end.status, end.error.type) == ("stage-end", "failed", "template_unsafe")
    assert end.error.message.startswith("unsafe template: ")
    assert "is unsafe" in end.error.message or "not safely callable" in end.error.message


async def test_undefined_value_at_run_time_names_it() -> None:
    chain = chain_of(
        """
stages:
  - {id: t, kind: template, text: "{{ inputs.missing.deeper }}"}
"""
    )
    events = await collect(chain)
    assert events[-2].error.type == "template_error"
    assert events[-2].error.message == "template error: 'dict object' has no attribute 'missing'"


def test_bad_inputs_are_rejected_before_the_run_naming_each_field() -> None:
    chain = chain_of(
        """
inputs:
  text: {type: string, max_length: 3}
  n: {type: integer, minimum: 1}
stages:
  - {id: t, kind: template, text: "{{ inputs.text }}"}
"""
    )
    with pytest.raises(InputError) as caught:
        ChainRun(chain, {"text": "toolong", "n": "0", "tetx": 1})
    assert caught.value.errors == {
        "tetx": "unknown input (did you mean 'text'?)",
        "text": "must have at most 3 characters (has 7)",
        "n": "must be >= 1",
    }
    with pytest.raises(InputError, match=r"inputs\.text: required"):
        ChainRun(chain, {"n": 2})


def test_unknown_model_fails_before_the_run_starts() -> None:
    chain = chain_of("stages: [{id: a, kind: llm, prompt: x, model: nope}]")
    with pytest.raises(ModelConfigError, match=r"unknown model 'nope'; models are: auto, "):
        ChainRun(chain, {})


async def test_offline_model_runs_json_stages_against_their_schema() -> None:
    chain = chain_of(
        """
defaults: {model: offline}
stages:
  - id: q
    kind: llm
    output: json
    schema:
      type: object
      required: [questions, level]
      properties:
        questions: {type: array, minItems: 2, maxItems: 4, items: {type: string}}
        level: {type: string, enum: [junior, senior]}
        score: {type: integer, minimum: 1, maximum: 5}
    prompt: "Ask about Kubernetes operators"
"""
    )
    events = await collect(chain)
    output = events[-1].outputs["output"]
    assert output["level"] == "junior" and 2 <= len(output["questions"]) <= 4
    assert 1 <= output["score"] <= 5
    assert events[0].model == "offline"
    tokens = "".join(e.text for e in events if e.type == "token")
    assert json.loads(tokens) == output


async def test_offline_text_differs_per_input_and_reads_as_placeholder() -> None:
    chain = chain_of('stages: [{id: a, kind: llm, prompt: "{{ inputs.t }}"}]\ninputs: {t: {}}')
    one = (await collect(chain, {"t": "quarterly revenue grew"}))[-1].outputs["output"]
    two = (await collect(chain, {"t": "the database migration failed"}))[-1].outputs["output"]
    assert one != two
    assert one.startswith("[offline ") and "revenue" in one


async def test_map_retries_and_timeout_apply_to_each_item() -> None:
    chain = chain_of(
        """
defaults: {model: fake}
stages:
  - id: each
    kind: map
    over: "{{ [1, 2] }}"
    concurrency: 1
    retries: 1
    timeout: 0.05
    stage: {kind: llm, prompt: "{{ item }}"}
"""
    )
    model = ScriptedChatModel(scripts=[[5.0], ["one"], ["two"]])
    events = await collect(chain, models={"fake": model})
    assert "stage-retry each[0] timeout" in [fmt(e) for e in events]
    assert events[-1].outputs == {"output": ["one", "two"]}


async def test_data_keys_win_over_dict_methods_and_nested_outputs_render() -> None:
    chain = chain_of(
        """
inputs:
  items: {type: array}
  keys: {type: string, default: k}
stages:
  - {id: n, kind: template, text: "{{ inputs.items | length }} {{ inputs.keys }}"}
outputs:
  summary: {count: "{{ stages.n.output }}", list: ["{{ inputs.items }}", 3]}
"""
    )
    events = await collect(chain, {"items": ["a", "b"]})
    assert events[-1].outputs == {"summary": {"count": "2 k", "list": [["a", "b"], 3]}}


async def test_stream_false_sends_no_tokens_and_the_output_on_stage_end() -> None:
    chain = chain_of(
        "defaults: {model: fake}\nstages: [{id: a, kind: llm, prompt: x, stream: false}]"
    )
    model = ScriptedChatModel(scripts=[["x", "y"]])
    events = await collect(chain, models={"fake": model})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start a",
        "stage-end a succeeded",
        "run-end succeeded",
    ]
    assert events[2].output == "xy"


async def test_a_model_raising_timeouterror_without_a_stage_timeout_is_a_retried_timeout() -> None:
    model = ScriptedChatModel(scripts=[[TimeoutError()], ["ok"]])
    events = await collect(chain_of(RETRY_CHAIN), models={"fake": model})
    assert [fmt(e) for e in events][2:4] == ["stage-retry ask timeout", "token ask#2 'ok'"]
    assert events[2].error.message == "timed out"


def test_default_names_the_configured_default_model() -> None:
    chain = chain_of("defaults: {model: default}\nstages: [{id: a, kind: llm, prompt: x}]")
    run = ChainRun(chain, {})
    assert run.default_model.label == "offline" and run.default_model.name == "auto"


async def test_a_second_cancel_still_ends_every_stage_before_run_end() -> None:
    chain = chain_of(MAP_CHAIN)

    class SlowToClose(ScriptedChatModel):
        async def _astream(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            try:
                async for chunk in super()._astream(*args, **kwargs):
                    yield chunk
            finally:
                await asyncio.sleep(0.05)  # like closing an HTTP connection

    model = SlowToClose(scripts=[["t", 1.0]], cycle=True)
    got: list[RunEvent] = []
    run = ChainRun(chain, {"items": ["a", "b"]}, models={"fake": model}, sink=got.append)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        while sum(e.type == "token" for e in got) < 2:
            await asyncio.sleep(0.005)
        run.cancel()
        await asyncio.sleep(0.01)
        run.cancel()
        await task
    assert [fmt(e) for e in got][-4:] == [
        "stage-end each[0] cancelled",
        "stage-end each[1] cancelled",
        "stage-end each cancelled",
        "run-end cancelled",
    ]
    assert [e.seq for e in got] == list(range(1, len(got) + 1))


async def test_cancel_during_backoff_ends_the_next_attempt() -> None:
    model = ScriptedChatModel(scripts=[["x", TransientError("flaky")]])
    got: list[RunEvent] = []
    run = ChainRun(chain_of(RETRY_CHAIN), {}, models={"fake": model}, sink=got.append)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        while not any(e.type == "stage-retry" for e in got):
            await asyncio.sleep(0.005)
        assert run.stages["ask"].attempt == 2
        run.cancel()
        await task
    assert [fmt(e) for e in got][-3:] == [
        "stage-retry ask transient",
        "stage-end ask#2 cancelled",
        "run-end cancelled",
    ]


async def test_lazy_template_values_become_lists() -> None:
    chain = chain_of(
        """
stages:
  - {id: s, kind: split, text: "aaa bbb. ccc ddd.", chunk_size: 50}
  - id: t
    kind: template
    when: "{{ stages.s.output | map(attribute='index') | select('gt', 5) }}"
    text: x
outputs:
  texts: "{{ stages.s.output | map(attribute='text') }}"
  keys: "{{ {'a': 1}.keys() }}"
"""
    )
    events = await collect(chain)
    assert [fmt(e) for e in events][-2:] == ["stage-end t skipped", "run-end succeeded"]
    assert events[-1].outputs == {"texts": ["aaa bbb. ccc ddd."], "keys": ["a"]}
    assert json.loads(event_to_json(events[-1]))["outputs"]["keys"] == ["a"]


async def test_map_over_a_skipped_stage_runs_no_items_and_when_errors_start_first() -> None:
    chain = chain_of(
        """
stages:
  - {id: s, kind: split, text: "x", when: "{{ false }}"}
  - id: m
    kind: map
    over: "{{ stages.s.output }}"
    stage: {kind: template, text: "{{ item }}"}
  - {id: bad, kind: template, text: "y", when: "{{ nothing.here }}", needs: [m]}
"""
    )
    events = await collect(chain)
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-end s skipped",
        "stage-start m",
        "stage-end m succeeded",
        "stage-start bad",
        "stage-end bad failed",
        "run-end failed",
    ]
    assert events[-2].error.message == "when: template error: 'nothing' is undefined"


async def test_usage_so_far_is_visible_while_the_run_goes_on() -> None:
    chain = chain_of(TWO_STAGES)
    model = ScriptedChatModel(scripts=[["o"], [5.0]], usage=(4, 1))
    got: list[RunEvent] = []
    run = ChainRun(chain, {"topic": "t"}, models={"fake": model}, sink=got.append)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        while not any(e.type == "stage-start" and e.stage == "draft" for e in got):
            await asyncio.sleep(0.005)
        assert (run.usage.input_tokens, run.usage.output_tokens) == (4, 1)
        run.cancel()
        end = await task
    assert (end.usage.input_tokens, end.usage.output_tokens) == (4, 1)


def test_array_and_object_inputs_accept_json_text() -> None:
    chain = chain_of(
        """
inputs:
  xs: {type: array}
  o: {type: object}
stages: [{id: t, kind: template, text: "{{ inputs.xs | length }}"}]
"""
    )
    run = ChainRun(chain, {"xs": "[1, 2]", "o": '{"a": 1}'})
    assert run.inputs == {"xs": [1, 2], "o": {"a": 1}}
    with pytest.raises(InputError, match=r"inputs\.xs: expected array, got string"):
        ChainRun(chain, {"xs": "[1,", "o": {}})


async def test_a_chat_model_object_as_the_run_model_leaves_a_shared_registry_alone() -> None:
    from stagecast.engine.providers import ModelRegistry

    shared = ModelRegistry()
    model = ScriptedChatModel(scripts=[["mine"]])
    chain = chain_of("stages: [{id: a, kind: llm, prompt: x}]")
    events = await collect(chain, models=shared, model=model)
    assert events[-1].outputs == {"output": "mine"}
    assert "__run__" not in shared.overrides


# -- usage: unknown is not zero ---------------------------------------------------------------


def _usage(event: Any) -> tuple[int, int, float | None, bool]:
    usage = event.usage
    return (usage.input_tokens, usage.output_tokens, usage.cost, usage.reported)


async def test_a_model_that_reports_no_usage_has_unknown_usage_and_so_has_the_run() -> None:
    text = TWO_STAGES.replace(
        "id: draft\n    kind: llm\n", "id: draft\n    kind: llm\n    model: x\n"
    )
    text = text.replace("model: x", "model: silent")
    counted = ScriptedChatModel(scripts=[["an", " outline"]], usage=(7, 2))
    silent = ScriptedChatModel(scripts=[["the", " draft"]])  # streams no usage at all
    events = await collect(
        chain_of(text), {"topic": "cats"}, models={"fake": counted, "silent": silent}
    )
    ends = {e.stage: e for e in events if e.type == "stage-end"}
    assert _usage(ends["outline"]) == (7, 2, None, True)
    assert _usage(ends["draft"]) == (0, 0, None, False)
    assert _usage(ends["shout"]) == (0, 0, None, True)  # no model call: known to be zero
    assert events[-1].status == "succeeded"
    # one stage unreported: so is the total (its counts are what was reported)
    assert _usage(events[-1]) == (7, 2, None, False)
    wire = json.loads(event_to_json(ends["draft"]))
    assert wire["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost": None, "reported": False}
    assert event_from_json(event_to_json(events[-1])).usage.reported is False


async def test_an_attempt_refused_before_answering_counts_zero_one_cut_mid_answer_unknown() -> None:
    refused = ScriptedChatModel(
        scripts=[[TransientError("refused", type="server_error")], ["ok"]], usage=(5, 1)
    )
    events = await collect(chain_of(ONE_LLM_RETRIED), {}, models={"fake": refused})
    assert [fmt(e) for e in events if e.type in ("stage-retry", "stage-end")] == [
        "stage-retry a server_error",
        "stage-end a#2 succeeded",
    ]
    assert _usage(events[-1]) == (5, 1, None, True)  # the refused call used nothing
    cut = ScriptedChatModel(
        scripts=[["par", TransientError("reset", type="connection_error")], ["ok"]], usage=(5, 1)
    )
    events = await collect(chain_of(ONE_LLM_RETRIED), {}, models={"fake": cut})
    assert events[-1].status == "succeeded"
    # the first call was answering when it broke and never said what it used
    assert _usage(events[-2]) == (5, 1, None, False)
    assert _usage(events[-1]) == (5, 1, None, False)


ONE_LLM_RETRIED = """
defaults: {model: fake}
stages:
  - id: a
    kind: llm
    retries: 1
    prompt: Say ok.
"""


def test_an_invalid_json_answer_is_quoted_at_its_start_and_where_it_broke() -> None:
    from stagecast.engine.orchestrator import parse_json_output

    items = ", ".join(f'"item {i}"' for i in range(60))
    answer = '{"items": [' + items + ", oops]}\n" + "tail " * 100
    with pytest.raises(TransientError) as caught:
        parse_json_output(answer, None)
    message = str(caught.value)
    assert caught.value.type == "invalid_json"
    assert message.startswith(
        "the answer is not valid JSON: Expecting value: line 1 column 662 (char 661); "
        'the answer (1,168 chars) starts \'{"items": ["item 0", "item 1"'
    )
    assert message.endswith(
        '; it breaks at char 661: …\'54", "item 55", "item 56", "item 57", "item 58", '
        "\"item 59\", ' ⟵ here 'oops]}\\ntail tail tail tail tai'…"
    )
    assert len(message) < 400
    with pytest.raises(TransientError, match=r"\(char 3\); the answer is empty$"):
        parse_json_output("  \n", None)
    huge = "x" * 100_000
    with pytest.raises(TransientError) as caught:
        parse_json_output(huge, None)
    assert len(str(caught.value)) < 300  # never the whole answer


def test_a_schema_mismatch_quotes_at_most_an_excerpt_of_the_value() -> None:
    from stagecast.engine.orchestrator import parse_json_output

    with pytest.raises(TransientError) as caught:
        parse_json_output(json.dumps("y" * 10_000), {"type": "integer"})
    message = str(caught.value)
    assert message.startswith("the JSON answer does not match the schema at (top): 'yyy")
    assert message.endswith("y…") and len(message) < 400


async def test_a_skipped_stage_and_a_null_value_render_as_empty_text() -> None:
    chain = chain_of(
        """
inputs:
  person: {type: object}
stages:
  - id: bonus
    kind: template
    when: "{{ false }}"
    text: never
  - id: joined
    kind: template
    text: "note=[{{ inputs.person.note }}] bonus=[{{ stages.bonus.output }}]"
"""
    )
    events = await collect(chain, {"person": {"note": None}})
    assert events[-1].status == "succeeded"
    assert events[-1].outputs == {"output": "note=[] bonus=[]"}
