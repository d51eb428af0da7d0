"""The shipped chains (chains/*.yaml) and the authoring docs, end to end on the offline model.

Every shipped chain must start with the `$schema` comment, validate with no problem, and run to
`run-end succeeded` offline on each of its sample inputs
(chains/examples/<chain id>[.variant].json).
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

from stagecast.engine.chain import Chain
from stagecast.engine.events import event_to_dict
from stagecast.engine.loading import load_chain, load_chain_text
from stagecast.engine.model_config import load_models_config
from stagecast.engine.orchestrator import run_chain
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
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.json"))


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


async def run_offline(chain: Chain, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    with anyio.fail_after(10):
        return [event_to_dict(e) async for e in run_chain(chain, inputs, model="offline")]


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
            assert stage.stage.label, f"the nested stage of {stage.id} has no label"


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


async def test_mock_interview_outputs_with_a_resume() -> None:
    chain = load(CHAINS_DIR / "mock_interview.yaml")
    inputs = read_inputs(EXAMPLES_DIR / "mock_interview.json")
    assert inputs["resume"].strip()
    events = await run_offline(chain, inputs)
    outputs = check_protocol(chain, events)["outputs"]

    assert set(outputs) == {"role_analysis", "gap_analysis", "questions", "answer_guides", "brief"}
    assert stage_end(events, "gaps")["status"] == "succeeded"
    assert isinstance(outputs["gap_analysis"], str) and outputs["gap_analysis"]
    questions = outputs["questions"]
    assert isinstance(questions, list) and 1 <= len(questions) <= inputs["num_questions"]
    for question in questions:
        assert set(question) == {"question", "topic", "why_asked"}
        assert all(isinstance(v, str) and v for v in question.values())
    guides = outputs["answer_guides"]
    assert len(guides) == len(questions)
    for guide in guides:
        assert set(guide) == {"key_points", "rubric", "pitfalls"}
        assert len(guide["key_points"]) >= 2 and all(
            isinstance(p, str) for p in guide["key_points"]
        )
        assert set(guide["rubric"]) == {"excellent", "adequate", "weak"}
        assert guide["pitfalls"] and all(isinstance(p, str) for p in guide["pitfalls"])
    item_starts = [
        e for e in events if e["type"] == "stage-start" and e["stage"] == "answer_guides"
    ]
    assert [(e["index"], e["total"]) for e in item_starts[1:]] == [
        (i, len(questions)) for i in range(len(questions))
    ]
    assert isinstance(outputs["brief"], str) and outputs["brief"]


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
    assert 1 <= len(outputs["questions"]) <= inputs["num_questions"]
    assert len(outputs["answer_guides"]) == len(outputs["questions"])


async def test_mock_interview_caps_questions_at_num_questions() -> None:
    chain = load(CHAINS_DIR / "mock_interview.yaml")
    inputs = {**read_inputs(EXAMPLES_DIR / "mock_interview.json"), "num_questions": 1}
    events = await run_offline(chain, inputs)
    outputs = check_protocol(chain, events)["outputs"]
    assert len(stage_end(events, "questions")["output"]) > 1  # offline returns 3 …
    assert len(outputs["questions"]) == len(outputs["answer_guides"]) == 1  # … one is kept


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
