"""Re-runs that reuse an earlier run's outputs: which stages call the model, what events say."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import pytest

from stagecast.engine.chain import Chain
from stagecast.engine.errors import TransientError
from stagecast.engine.events import RunEvent, StageEnded, event_to_json
from stagecast.engine.loading import load_chain
from stagecast.engine.orchestrator import ChainRun, run_chain
from stagecast.engine.resources import SHIPPED_CHAINS
from stagecast.engine.reuse import Recording, RecordingError, Reuse, ReuseError
from tests.fakes import CountingOfflineModel, ScriptedChatModel, fmt

pytestmark = pytest.mark.anyio

SUMMARY = SHIPPED_CHAINS / "advanced_summary.yaml"
DOCUMENT = (SHIPPED_CHAINS / "examples" / "quarterly_report.md").read_text(encoding="utf-8")


def who(prompt: str) -> str:
    """Which advanced_summary stage sent this prompt."""
    if prompt.startswith("You are a meticulous analyst"):
        section = prompt.split("Section ", 1)[1].split(" ", 1)[0]
        return f"section_summaries[{int(section) - 1}]"
    if prompt.startswith("You are an editor"):
        return "merge"
    if prompt.startswith("You are a senior editor"):
        return "polish"
    raise AssertionError(f"a prompt of no known stage: {prompt[:60]!r}")


async def run(chain: Chain, inputs: dict[str, Any], reuse: Reuse | None = None) -> tuple:
    log: list[str] = []
    model = CountingOfflineModel(log=log)
    with anyio.fail_after(10):
        events = [e async for e in run_chain(chain, inputs, model=model, reuse=reuse)]
    return events, [who(p) for p in log]


def recording(events: list[RunEvent]) -> Recording:
    return Recording.from_lines([event_to_json(e) for e in events], "first.ndjson")


def edited(tmp_path: Path, old: str, new: str, source: Path = SUMMARY) -> Chain:
    text = source.read_text(encoding="utf-8")
    assert text.count(old) == 1, old
    path = tmp_path / source.name
    path.write_text(text.replace(old, new), encoding="utf-8")
    return load_chain(path)


def ends(events: list[RunEvent]) -> dict[str, bool]:
    return {fmt(e).split()[1]: e.reused for e in events if isinstance(e, StageEnded)}


ALL_ITEMS = [f"section_summaries[{i}]" for i in range(4)]


async def test_an_unchanged_rerun_calls_no_model_and_gives_the_same_outputs() -> None:
    chain = load_chain(SUMMARY)
    first, calls = await run(chain, {"document": DOCUMENT})
    assert sorted(calls) == sorted([*ALL_ITEMS, "merge", "polish"])
    assert first[0].inputs == {"document": DOCUMENT, "language": "en", "bullets": 5}
    again, calls = await run(chain, {}, Reuse(recording(first), chain))  # recorded inputs
    assert calls == []
    assert all(ends(again).values())
    assert again[-1].status == "succeeded"
    assert again[-1].outputs == first[-1].outputs
    assert again[-1].usage.input_tokens == again[-1].usage.output_tokens == 0
    # a reused stage: stage-start, its sources again, stage-end with the earlier output; no token
    assert [fmt(e) for e in again[:7]] == [
        "run-start",
        "stage-start sections",
        "source sections sections-0",
        "source sections sections-1",
        "source sections sections-2",
        "source sections sections-3",
        "stage-end sections succeeded",
    ]
    assert not [e for e in again if e.type == "token"]
    first_merge = next(e for e in first if isinstance(e, StageEnded) and e.stage == "merge")
    merge = next(e for e in again if isinstance(e, StageEnded) and e.stage == "merge")
    assert (merge.output, merge.fingerprint) == (first_merge.output, first_merge.fingerprint)
    assert merge.usage.output_tokens == 0 and first_merge.usage.output_tokens > 0
    assert again[-2].progress == 1.0


async def test_an_edited_prompt_reruns_exactly_that_stage_and_its_dependents(
    tmp_path: Path,
) -> None:
    """The done-when of issue 12: edit one prompt of advanced_summary, re-run with reuse."""
    first, _ = await run(load_chain(SUMMARY), {"document": DOCUMENT})
    chain = edited(tmp_path, "Write the merged draft now.", "Write the merged draft now, briefly.")
    again, calls = await run(chain, {}, Reuse(recording(first), chain))
    assert calls == ["merge", "polish"]
    assert ends(again) == {
        "sections": True,
        **dict.fromkeys(ALL_ITEMS, True),
        "section_summaries": True,
        "merge": False,
        "polish": False,
    }


async def test_an_edited_map_prompt_reruns_every_item_and_what_reads_the_map(
    tmp_path: Path,
) -> None:
    first, _ = await run(load_chain(SUMMARY), {"document": DOCUMENT})
    chain = edited(tmp_path, "Answer with 3 to 6 short", "Answer with 3 to 5 short")
    again, calls = await run(chain, {}, Reuse(recording(first), chain))
    assert sorted(calls) == sorted([*ALL_ITEMS, "merge", "polish"])
    assert ends(again)["sections"] is True


async def test_a_label_or_weight_change_reruns_nothing(tmp_path: Path) -> None:
    first, _ = await run(load_chain(SUMMARY), {"document": DOCUMENT})
    chain = edited(tmp_path, "label: Merging the section summaries", "label: Merging")
    chain = edited(tmp_path, "weight: 2\n", "weight: 3\n", tmp_path / "advanced_summary.yaml")
    again, calls = await run(chain, {}, Reuse(recording(first), chain))
    assert calls == []


async def test_a_changed_input_reruns_what_reads_it() -> None:
    chain = load_chain(SUMMARY)
    first, _ = await run(chain, {"document": DOCUMENT})
    # only polish reads `bullets`
    again, calls = await run(chain, {"bullets": 3}, Reuse(recording(first), chain))
    assert calls == ["polish"]
    assert again[0].inputs["bullets"] == 3 and again[0].inputs["document"] == DOCUMENT
    # every llm stage reads `language`; the split does not
    again, calls = await run(chain, {"language": "ko"}, Reuse(recording(first), chain))
    assert sorted(calls) == sorted([*ALL_ITEMS, "merge", "polish"])
    assert ends(again)["sections"] is True


async def test_a_changed_document_reuses_the_map_items_whose_section_is_unchanged() -> None:
    chain = load_chain(SUMMARY)
    first, _ = await run(chain, {"document": DOCUMENT})
    sections = next(e for e in first if e.type == "stage-end" and e.stage == "sections").output
    at = (sections[-2]["end"] + sections[-1]["end"]) // 2  # only in the last section
    assert DOCUMENT[at] != "X"
    changed = DOCUMENT[:at] + "X" + DOCUMENT[at + 1 :]
    again, calls = await run(chain, {"document": changed}, Reuse(recording(first), chain))
    assert calls == ["section_summaries[3]", "merge", "polish"]
    assert ends(again)["sections"] is False  # a split is no model call: it ran, then items


async def test_from_reruns_the_stage_and_its_dependents_even_when_unchanged() -> None:
    chain = load_chain(SUMMARY)
    first, _ = await run(chain, {"document": DOCUMENT})
    _, calls = await run(chain, {}, Reuse(recording(first), chain, "merge"))
    assert calls == ["merge", "polish"]
    _, calls = await run(chain, {}, Reuse(recording(first), chain, "section_summaries"))
    assert sorted(calls) == sorted([*ALL_ITEMS, "merge", "polish"])


FAILING = """
id: flaky
version: 1
defaults: {model: fake, retries: 0}
stages:
  - {id: a, kind: template, text: "hello"}
  - id: each
    kind: map
    over: "{{ [1, 2, 3] }}"
    concurrency: 1
    stage: {kind: llm, prompt: "item {{ item }} after {{ stages.a.output }}"}
  - {id: b, kind: llm, prompt: "sum up {{ stages.each.output }}"}
"""


async def test_a_failed_stage_is_never_reused_and_succeeded_items_are(tmp_path: Path) -> None:
    path = tmp_path / "flaky.yaml"
    path.write_text(FAILING, encoding="utf-8")
    chain = load_chain(path)
    broken = ScriptedChatModel(scripts=[["one"], [ValueError("boom")]])
    with anyio.fail_after(5):
        first = [e async for e in run_chain(chain, {}, models={"fake": broken})]
    assert first[-1].status == "failed"
    assert [fmt(e) for e in first if e.type == "stage-end"] == [
        "stage-end a succeeded",
        "stage-end each[0] succeeded",
        "stage-end each[1] failed",
        "stage-end each failed",
    ]
    model = ScriptedChatModel(scripts=[["two"], ["three"], ["all"]])
    with anyio.fail_after(5):
        again = [
            e
            async for e in run_chain(
                chain, {}, models={"fake": model}, reuse=Reuse(recording(first), chain)
            )
        ]
    assert [m[-1].content for m in model.calls] == [
        "item 2 after hello",
        "item 3 after hello",
        ("sum up ['one', 'two', 'three']"),
    ]
    assert ends(again) == {
        "a": True,
        "each[0]": True,
        "each[1]": False,
        "each[2]": False,
        "each": False,
        "b": False,
    }
    assert again[-1].status == "succeeded"


async def test_a_transiently_failed_attempt_is_not_what_gets_reused(tmp_path: Path) -> None:
    path = tmp_path / "flaky.yaml"
    path.write_text(FAILING.replace("retries: 0", "retries: 1"), encoding="utf-8")
    chain = load_chain(path)
    model = ScriptedChatModel(
        scripts=[["one"], [TransientError("slow")], ["two"], ["three"], ["all"]]
    )
    with anyio.fail_after(5):
        first = [e async for e in run_chain(chain, {}, models={"fake": model}, retry_backoff=0.0)]
    assert first[-1].status == "succeeded"
    replay = ScriptedChatModel(scripts=[])
    with anyio.fail_after(5):
        again = [
            e
            async for e in run_chain(
                chain, {}, models={"fake": replay}, reuse=Reuse(recording(first), chain)
            )
        ]
    assert replay.calls == []
    assert again[-1].outputs == first[-1].outputs == {"output": "all"}


async def test_a_recording_of_another_version_or_chain_is_refused(tmp_path: Path) -> None:
    first, _ = await run(load_chain(SUMMARY), {"document": DOCUMENT})
    newer = edited(tmp_path, "version: 1\n", "version: 2\n")
    with pytest.raises(ReuseError) as caught:
        Reuse(recording(first), newer)
    assert str(caught.value) == (
        "first.ndjson: recorded with 'advanced_summary' version 1, but the chain is now "
        "version 2; outputs of another version are not reused (run without reuse, or reuse a "
        "recording of this version)"
    )
    other = edited(tmp_path, "id: advanced_summary\n", "id: other_summary\n")
    with pytest.raises(ReuseError, match=r"a recording of chain 'advanced_summary', not "):
        Reuse(recording(first), other)
    with pytest.raises(ReuseError) as caught:
        Reuse(recording(first), load_chain(SUMMARY), "marge")
    assert str(caught.value) == (
        "from: no stage 'marge' in 'advanced_summary'; stages are: sections, "
        "section_summaries, merge, polish"
    )


def test_a_broken_recording_names_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match=r"^r\.ndjson: empty: no events"):
        Recording.from_lines(["", "  "], "r.ndjson")
    start = (
        '{"v":1,"type":"run-start","run_id":"r","seq":1,"ts":1,"stage":null,"path":null,'
        '"attempt":null,"chain":{"id":"c","title":null,"version":1},"plan":[],"model":"m",'
        '"inputs":{}}'
    )
    assert Recording.from_lines([start], "r.ndjson").start.chain.id == "c"
    with pytest.raises(RecordingError, match=r"^r\.ndjson:2: not a Stagecast event: "):
        Recording.from_lines([start, '{"type": "token"}'], "r.ndjson")
    with pytest.raises(RecordingError, match=r"^r\.ndjson:1: a recording starts with run-start"):
        Recording.from_lines(
            [
                '{"v":1,"type":"token","run_id":"r","seq":1,"ts":1,"stage":"a",'
                '"path":["a"],"attempt":1,"text":"x"}'
            ],
            "r.ndjson",
        )
    missing = tmp_path / "nope.ndjson"
    with pytest.raises(RecordingError, match=r"nope\.ndjson: no such file$"):
        Recording.read(missing)


INTERVIEW = """
id: interview
version: 1
defaults: {model: fake}
stages:
  - {id: name, kind: input, prompt: "Your name?"}
  - id: rounds
    kind: map
    over: "{{ [1, 2] }}"
    stages:
      - {id: question, kind: llm, prompt: "question {{ item }} for {{ stages.name.output }}"}
      - {id: answer, kind: input, prompt: "{{ stages.question.output }}"}
  - {id: verdict, kind: llm, prompt: "judge {{ stages.rounds.output }}"}
"""


async def interview(chain: Chain, answers: dict[str, Any], reuse: Reuse | None) -> tuple:
    """Runs ``chain`` answering each input by its path; returns (events, prompts, asked)."""
    model = ScriptedChatModel(scripts=[["q"]], cycle=True)
    events: list[RunEvent] = []
    asked: list[str] = []
    holder: list[ChainRun] = []

    def on_input(pending: Any) -> None:
        key = "/".join(map(str, pending.path))
        asked.append(key)
        asyncio.get_running_loop().call_soon(
            holder[0].answer, pending.stage, pending.path, answers[key]
        )

    run = ChainRun(
        chain, {}, models={"fake": model}, sink=events.append, on_input=on_input, reuse=reuse
    )
    holder.append(run)
    with anyio.fail_after(5):
        await run.execute()
    return events, [m[-1].content for m in model.calls], asked


async def test_answers_are_reused_like_outputs_and_sequence_items_one_by_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "interview.yaml"
    path.write_text(INTERVIEW, encoding="utf-8")
    chain = load_chain(path)
    answers = {"name": "Ada", "rounds/0/answer": "yes", "rounds/1/answer": "no"}
    first, prompts, asked = await interview(chain, answers, None)
    assert first[-1].status == "succeeded", first[-1].error
    assert asked == ["name", "rounds/0/answer", "rounds/1/answer"]
    assert len(prompts) == 3
    again, prompts, asked = await interview(chain, {}, Reuse(recording(first), chain))
    assert (prompts, asked) == ([], [])  # no model call, nobody asked
    assert not [e for e in again if e.type == "input-required"]
    assert all(ends(again).values())
    assert again[-1].outputs == first[-1].outputs
    # an edited final prompt: only it runs; the answers before it are reused
    edited = tmp_path / "edited.yaml"
    edited.write_text(INTERVIEW.replace("judge {{", "judge fairly {{"), encoding="utf-8")
    chain = load_chain(edited)
    again, prompts, asked = await interview(chain, {}, Reuse(recording(first), chain))
    assert (len(prompts), asked) == (1, [])
    assert prompts[0].startswith("judge fairly ")
