"""The shipped chains (chains/*.yaml) and the authoring docs, end to end on the offline model.

Every shipped chain must start with the `$schema` comment, validate with no problem, and run to
`run-end succeeded` offline on each of its sample inputs
(chains/examples/<chain id>[.variant].json), its input stages answered from
chains/examples/<chain id>.answers.json.
The docs test runs a chain written only from docs/authoring.md, and checks that the docs'
complete examples validate and that every field of the chain format is documented.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from stagecast.engine.asking import PendingInput
from stagecast.engine.chain import Chain
from stagecast.engine.events import event_to_dict
from stagecast.engine.loading import load_chain, load_chain_text
from stagecast.engine.model_config import load_models_config
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.resources import SHIPPED_CHAINS as CHAINS_DIR
from stagecast.engine.spec import (
    ChainSpec,
    Defaults,
    InputSpec,
    InputStage,
    LlmStage,
    MapStage,
    RetrieveStage,
    SplitStage,
    TemplateStage,
)

pytestmark = pytest.mark.anyio

EXAMPLES_DIR = CHAINS_DIR / "examples"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "authoring.md"
DOCS_CHAINS = Path(__file__).parent / "chains_from_docs"
SCHEMA_COMMENT = "# yaml-language-server: $schema=./chain.schema.json"

SHIPPED = sorted(CHAINS_DIR.glob("*.yaml"))
EXAMPLES = sorted(p for p in EXAMPLES_DIR.glob("*.json") if not p.name.endswith(".answers.json"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def model_names() -> list[str]:
    return sorted(load_models_config().models)


def load(path: Path) -> Chain:
    return load_chain(path, model_names=model_names())


def chain_of_example(example: Path) -> Path:
    """chains/examples/mock_interview.no_resume.json -> chains/mock_interview.yaml"""
    return CHAINS_DIR / f"{example.name.split('.')[0]}.yaml"


def read_inputs(example: Path) -> dict[str, Any]:
    inputs = json.loads(example.read_text(encoding="utf-8"))
    assert isinstance(inputs, dict)
    return inputs


def example_answers(chain: Chain) -> dict[str, Any] | None:
    path = EXAMPLES_DIR / f"{chain.id}.answers.json"
    if not path.is_file():
        return None
    answers = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(answers, dict)
    return answers


async def run_offline(
    chain: Chain,
    inputs: dict[str, Any],
    answers: dict[str, Any] | None = None,
    prompts: list[tuple[list[str | int], str]] | None = None,
) -> list[dict[str, Any]]:
    """The run's events (as wire dicts); input stages answered from ``answers`` (by the input
    stage's id, a list for map items), as ``stagecast run --answers`` does."""
    if answers is None:
        answers = example_answers(chain)
    events: list[dict[str, Any]] = []

    def on_input(pending: PendingInput) -> None:
        assert answers is not None, f"{pending.path} asks, and the test gave no answers"
        key = [p for p in pending.path if isinstance(p, str)][-1]
        items = [p for p in pending.path if isinstance(p, int)]
        value = answers[key][items[-1]] if items else answers[key]
        run.answer(pending.stage, pending.path, value)

    def on_prompt(stage: str, path: list[str | int], messages: list[Any]) -> None:
        if prompts is not None:
            prompts.append((path, "\n".join(str(m.content) for m in messages)))

    run = ChainRun(
        chain,
        inputs,
        model="offline",
        sink=lambda e: events.append(event_to_dict(e)),
        on_input=on_input,
        on_prompt=on_prompt,
    )
    with anyio.fail_after(10):
        await run.execute()
    return events


def check_protocol(chain: Chain, events: list[dict[str, Any]]) -> dict[str, Any]:
    """Protocol invariants every successful run keeps; returns the run-end event."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run-start"
    assert [s["stage"] for s in events[0]["plan"]] == [s.id for s in chain.spec.stages]
    assert events[0]["model"] == "offline"
    assert [e["type"] for e in events].count("run-end") == 1
    run_end = events[-1]
    assert run_end["type"] == "run-end"
    assert run_end["status"] == "succeeded", run_end["error"]
    assert run_end["error"] is None
    starts = Counter(json.dumps(e["path"]) for e in events if e["type"] == "stage-start")
    ends = Counter(json.dumps(e["path"]) for e in events if e["type"] == "stage-end")
    assert starts == ends - Counter(  # skipped stages end without starting
        json.dumps(e["path"])
        for e in events
        if e["type"] == "stage-end" and e["status"] == "skipped"
    )
    top_ends = [e for e in events if e["type"] == "stage-end" and len(e["path"]) == 1]
    assert sorted(e["stage"] for e in top_ends) == sorted(s.id or "" for s in chain.spec.stages)
    assert {e["status"] for e in top_ends} <= {"succeeded", "skipped"}
    assert top_ends[-1]["progress"] == 1
    assert run_end["usage"]["output_tokens"] > 0
    return run_end


def stage_end(events: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    (event,) = [e for e in events if e["type"] == "stage-end" and e["path"] == [stage]]
    return event


# -- every shipped chain -----------------------------------------------------------------------


def test_chains_are_shipped_with_sample_inputs() -> None:
    assert {p.stem for p in SHIPPED} >= {"advanced_summary", "mock_interview"}
    with_examples = {chain_of_example(e) for e in EXAMPLES}
    assert set(SHIPPED) <= with_examples, "every shipped chain needs chains/examples/<id>.json"
    assert with_examples <= set(SHIPPED), "an example names a chain that is not shipped"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_chain_starts_with_the_schema_comment(path: Path) -> None:
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_COMMENT


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_chain_loads_with_its_file_stem_as_id(path: Path) -> None:
    chain = load(path)
    assert chain.id == path.stem
    assert chain.spec.title and chain.spec.description
    for stage in chain.spec.stages:
        assert stage.label, f"stage {stage.id} has no label"
        if isinstance(stage, MapStage):
            for inner in stage.item_stages:
                assert inner.label, f"a nested stage of {stage.id} has no label"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
async def test_shipped_chain_runs_offline_on_its_sample_inputs(example: Path) -> None:
    chain = load(chain_of_example(example))
    events = await run_offline(chain, read_inputs(example))
    check_protocol(chain, events)


# -- advanced_summary --------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["advanced_summary.json", "advanced_summary.ko.json"])
async def test_advanced_summary_outputs_and_sources(example: str) -> None:
    chain = load(CHAINS_DIR / "advanced_summary.yaml")
    inputs = read_inputs(EXAMPLES_DIR / example)
    events = await run_offline(chain, inputs)
    outputs = check_protocol(chain, events)["outputs"]

    assert set(outputs) == {"title", "key_points", "summary", "sections"}
    assert isinstance(outputs["title"], str) and outputs["title"]
    assert isinstance(outputs["summary"], str) and outputs["summary"]
    points = outputs["key_points"]
    assert isinstance(points, list) and 1 <= len(points) <= inputs["bullets"]
    assert all(isinstance(p, str) and p for p in points)

    document = inputs["document"]
    chunks = stage_end(events, "sections")["output"]
    assert outputs["sections"] == len(chunks) > 1  # a whole expression keeps its type: an int
    sources = [e for e in events if e["type"] == "source"]
    assert [s["stage"] for s in sources] == ["sections"] * len(chunks)
    assert [s["source"]["text"] for s in sources] == [c["text"] for c in chunks]
    for chunk in chunks:
        assert len(chunk["text"]) <= 2000
        assert document[chunk["start"] : chunk["end"]] == chunk["text"]
    # every source comes before the first section summary starts
    first_map = next(i for i, e in enumerate(events) if e["stage"] == "section_summaries")
    assert max(i for i, e in enumerate(events) if e["type"] == "source") < first_map

    summaries = stage_end(events, "section_summaries")["output"]
    assert len(summaries) == len(chunks)
    progress = [e for e in events if e["type"] == "stage-progress"]
    assert [p["completed"] for p in progress] == list(range(1, len(chunks) + 1))
    # the map is the heaviest stage: it moves the progress bar the most
    weights = {s["stage"]: s["weight"] for s in events[0]["plan"]}
    assert max(weights, key=lambda k: weights[k]) == "section_summaries"


async def test_advanced_summary_caps_key_points_at_bullets() -> None:
    chain = load(CHAINS_DIR / "advanced_summary.yaml")
    inputs = {**read_inputs(EXAMPLES_DIR / "advanced_summary.json"), "bullets": 2}
    events = await run_offline(chain, inputs)
    polished = stage_end(events, "polish")["output"]["key_points"]
    assert len(polished) > 2  # the offline model returns 3 …
    assert events[-1]["outputs"]["key_points"] == polished[:2]  # … the output keeps 2


async def test_advanced_summary_runs_on_the_plain_text_example() -> None:
    # The .md file is what `-i document=@chains/examples/quarterly_report.md` reads.
    text = (EXAMPLES_DIR / "quarterly_report.md").read_text(encoding="utf-8")
    assert read_inputs(EXAMPLES_DIR / "advanced_summary.json")["document"] == text
    chain = load(CHAINS_DIR / "advanced_summary.yaml")
    events = await run_offline(chain, {"document": text})
    assert check_protocol(chain, events)["outputs"]["sections"] >= 2


# -- mock_interview ----------------------------------------------------------------------------


async def test_mock_interview_asks_each_question_and_adapts_to_the_answers() -> None:
    chain = load(CHAINS_DIR / "mock_interview.yaml")
    inputs = read_inputs(EXAMPLES_DIR / "mock_interview.json")
    answers = example_answers(chain)
    assert answers is not None and inputs["resume"].strip()
    prompts: list[tuple[list[str | int], str]] = []
    events = await run_offline(chain, inputs, prompts=prompts)
    outputs = check_protocol(chain, events)["outputs"]

    assert set(outputs) == {"role_analysis", "gap_analysis", "transcript", "scorecard", "report"}
    assert stage_end(events, "gaps")["status"] == "succeeded"
    transcript = outputs["transcript"]
    assert [turn["answer"] for turn in transcript] == answers["answer"]
    assert len(transcript) == inputs["num_questions"] == 3
    for turn in transcript:
        assert set(turn) == {"question", "answer", "evaluation"}
        assert set(turn["evaluation"]) == {"strong", "missing", "scores", "summary"}
        assert all(1 <= v <= 5 for v in turn["evaluation"]["scores"].values())
    # per question: the question streams, the run asks, then the evaluation streams
    order = [
        (e["type"], e["path"][2] if len(e["path"] or []) == 3 else None, e["path"][1])
        for e in events
        if e["type"] in ("stage-end", "input-required", "stage-start") and len(e["path"] or []) == 3
    ]
    for i in range(3):
        mine = [(t, sub) for t, sub, item in order if item == i]
        assert mine == [
            ("stage-start", "question"),
            ("stage-end", "question"),
            ("stage-start", "answer"),
            ("input-required", "answer"),
            ("stage-end", "answer"),
            ("stage-start", "evaluation"),
            ("stage-end", "evaluation"),
        ]
    asked = [e for e in events if e["type"] == "input-required"]
    assert [e["prompt"] for e in asked] == [turn["question"] for turn in transcript]
    assert asked[0]["schema"] == {
        "type": "string",
        "title": "Your answer",
        "minLength": 1,
        "maxLength": 20000,
    }
    # one question at a time: question 2 is written after answer 1 was evaluated, and reads it
    ends = [e["path"] for e in events if e["type"] == "stage-end"]
    assert ends.index(["interview", 0, "evaluation"]) < ends.index(["interview", 1, "question"])
    second = next(text for path, text in prompts if path == ["interview", 1, "question"])
    assert "The interview so far:" in second and answers["answer"][0] in second
    assert transcript[0]["evaluation"]["summary"] in second
    assert outputs["scorecard"].splitlines()[:3] == [
        "| Competency | Average (1–5) | Per question |",
        "|---|---|---|",
        "| Technical depth | 1.0 | 1, 1, 1 |",
    ]
    assert len(outputs["scorecard"].splitlines()) == 7
    assert isinstance(outputs["report"], str) and outputs["report"]
    report_prompt = next(text for path, text in prompts if path == ["report"])
    assert outputs["scorecard"] in report_prompt and answers["answer"][2] in report_prompt


async def test_mock_interview_with_answers_as_an_input_never_pauses() -> None:
    chain = load(CHAINS_DIR / "mock_interview.yaml")
    inputs = read_inputs(EXAMPLES_DIR / "mock_interview.batch.json")
    events = await run_offline(chain, inputs, answers={})
    outputs = check_protocol(chain, events)["outputs"]
    assert not [e for e in events if e["type"] == "input-required"]
    skipped = [e["path"] for e in events if e["type"] == "stage-end" and e["status"] == "skipped"]
    assert skipped == [["interview", i, "answer"] for i in range(len(inputs["answers"]))]
    assert [turn["answer"] for turn in outputs["transcript"]] == [None] * len(inputs["answers"])


async def test_mock_interview_skips_the_gap_analysis_without_a_resume() -> None:
    chain = load(CHAINS_DIR / "mock_interview.yaml")
    inputs = read_inputs(EXAMPLES_DIR / "mock_interview.no_resume.json")
    assert "resume" not in inputs
    events = await run_offline(chain, inputs)
    outputs = check_protocol(chain, events)["outputs"]
    gaps = stage_end(events, "gaps")
    assert gaps["status"] == "skipped" and gaps["output"] is None
    assert not [e for e in events if e["type"] == "stage-start" and e["stage"] == "gaps"]
    assert outputs["gap_analysis"] is None
    assert len(outputs["transcript"]) == inputs["num_questions"]


async def test_mock_interview_sample_texts_match_the_json() -> None:
    inputs = read_inputs(EXAMPLES_DIR / "mock_interview.json")
    assert inputs["job_posting"] == (EXAMPLES_DIR / "job_posting.md").read_text(encoding="utf-8")
    assert inputs["resume"] == (EXAMPLES_DIR / "resume.md").read_text(encoding="utf-8")


# -- the authoring docs ------------------------------------------------------------------------


async def test_a_chain_written_only_from_the_docs_validates_and_runs() -> None:
    """tests/engine/chains_from_docs/reading_list.yaml was written from docs/authoring.md alone.

    It uses split, map, llm with JSON output, template, when and outputs.
    """
    path = DOCS_CHAINS / "reading_list.yaml"
    chain = load(path)
    kinds = {s.kind for s in chain.spec.stages}
    assert kinds >= {"split", "map", "llm", "template"}
    assert any(isinstance(s, MapStage) and s.stage.kind == "llm" for s in chain.spec.stages)
    notes = (DOCS_CHAINS / "reading_notes.md").read_text(encoding="utf-8")

    events = await run_offline(chain, {"notes": notes, "audience": "new team members"})
    outputs = check_protocol(chain, events)["outputs"]
    entries = outputs["entries"]
    chunks = stage_end(events, "passages")["output"]
    assert isinstance(entries, list) and len(entries) == len(chunks) > 1
    for entry in entries:
        assert set(entry) >= {"title", "takeaway", "level"}
        assert entry["level"] in ("intro", "intermediate", "advanced")
    assert isinstance(outputs["reading_list"], str)
    assert outputs["reading_list"].startswith("# Reading list for new team members")
    assert outputs["count"] == len(entries)
    assert stage_end(events, "foreword")["status"] == "succeeded"
    assert isinstance(outputs["foreword"], str) and outputs["foreword"]

    # `when` false: the foreword is skipped and its output is null
    events = await run_offline(chain, {"notes": notes, "foreword": False})
    outputs = check_protocol(chain, events)["outputs"]
    assert stage_end(events, "foreword")["status"] == "skipped"
    assert outputs["foreword"] is None
    assert outputs["reading_list"].startswith("# Reading list for everyone")


def docs_chain_blocks() -> list[str]:
    """The complete chains in docs/authoring.md: ```yaml blocks that start with the $schema line."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    return [b for b in blocks if b.startswith(SCHEMA_COMMENT)]


async def test_the_docs_complete_examples_validate_and_run() -> None:
    blocks = docs_chain_blocks()
    assert len(blocks) >= 3
    text = (DOCS_CHAINS / "reading_notes.md").read_text(encoding="utf-8")
    for number, block in enumerate(blocks, 1):
        chain = load_chain_text(
            block, filename=f"docs-example-{number}.yaml", model_names=model_names()
        )
        required = {n: text for n, spec in chain.spec.inputs.items() if spec.default is None}
        check_protocol(chain, await run_offline(chain, required))


@pytest.mark.parametrize(
    "model",
    [
        ChainSpec,
        InputSpec,
        Defaults,
        LlmStage,
        MapStage,
        SplitStage,
        TemplateStage,
        RetrieveStage,
        InputStage,
    ],
    ids=lambda m: m.__name__,
)
def test_the_docs_name_every_field_of_the_chain_format(model: type[Any]) -> None:
    text = DOCS.read_text(encoding="utf-8")
    missing = [
        name
        for field, info in model.model_fields.items()
        if f"`{(name := info.alias or field)}`" not in text and f"`{name}:" not in text
    ]
    assert not missing, f"docs/authoring.md does not describe {model.__name__}: {missing}"
