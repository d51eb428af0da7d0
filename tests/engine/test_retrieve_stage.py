"""The retrieve stage in a run: source events (order, fields, stable ids), maps, citations on the
answer's stage-end, LangChain retrievers plugged in, and docs_qa end to end on the offline model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import InMemoryVectorStore

from stagecast.engine.chain import Chain
from stagecast.engine.collections import CollectionEntry, CollectionsConfig
from stagecast.engine.events import Citation, Source, event_to_json
from stagecast.engine.loading import load_chain
from stagecast.engine.orchestrator import run_chain
from stagecast.engine.spec import ChainSpec
from tests.fakes import ScriptedChatModel, fmt

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "chains" / "collections" / "docs_qa"


def chain_of(text: str, path: Path | None = None) -> Chain:
    spec = ChainSpec.model_validate(yaml.safe_load(textwrap.dedent(text)))
    return Chain.from_spec(spec, id="test", path=path)


async def collect(chain: Chain, inputs: dict[str, Any], **options: Any) -> list[Any]:
    options.setdefault("retry_backoff", 0.0)
    with anyio.fail_after(30):
        return [e async for e in run_chain(chain, inputs, **options)]


QA = f"""
inputs:
  question: {{type: string}}
defaults: {{model: fake}}
stages:
  - id: search
    kind: retrieve
    query: "{{{{ inputs.question }}}}"
    collection: {SAMPLE}
    top_k: 2
  - id: answer
    kind: llm
    prompt: |
      {{% for s in stages.search.output %}}[{{{{ loop.index }}}}] {{{{ s.text }}}}
      {{% endfor %}}{{{{ inputs.question }}}}
  - id: plain
    kind: llm
    needs: [answer]
    prompt: "No sources here [1]"
"""


async def test_sources_come_before_the_answer_and_citations_name_them() -> None:
    model = ScriptedChatModel(
        scripts=[["Two years", " [2], see [1] and [9]."], ["plain [1]"]], usage=(3, 2)
    )
    events = await collect(
        chain_of(QA),
        {"question": "Is water damage covered by the warranty?"},
        models={"fake": model},
        max_concurrency=1,
    )
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start search",
        "source search warranty.docx#2",
        "source search warranty.docx#1",
        "stage-end search succeeded",
        "stage-start answer",
        "token answer 'Two years'",
        "token answer ' [2], see [1] and [9].'",
        "stage-end answer succeeded",
        "stage-start plain",
        "token plain 'plain [1]'",
        "stage-end plain succeeded",
        "run-end succeeded",
    ]
    source = events[2]
    assert (source.stage, source.path, source.attempt) == ("search", ["search"], 1)
    assert source.source == Source(
        id="warranty.docx#2",
        title="warranty: What the warranty does not cover",
        text=(
            "What the warranty does not cover\n\nThe warranty does not cover water damage, damage "
            "from misuse or a wrong installation, or normal wear of the housing."
        ),
        url="warranty.docx",
        score=source.source.score,
        metadata={"file": "warranty.docx", "heading": "What the warranty does not cover"},
    )
    assert source.source.score is not None and source.source.score > events[3].source.score > 0
    search_end, answer_end, plain_end = events[4], events[8], events[11]
    assert [h["id"] for h in search_end.output] == ["warranty.docx#2", "warranty.docx#1"]
    assert search_end.output[0] == {
        "id": "warranty.docx#2",
        "title": source.source.title,
        "text": source.source.text,
        "score": source.source.score,
        "url": "warranty.docx",
        "metadata": source.source.metadata,
    }
    assert search_end.citations is None
    assert answer_end.citations == [
        Citation(marker=2, source_id="warranty.docx#1", stage="search"),
        Citation(marker=1, source_id="warranty.docx#2", stage="search"),
        Citation(marker=9, source_id=None, stage=None),
    ]
    assert plain_end.citations is None  # given no sources: null, whatever it wrote
    wire = json.loads(event_to_json(answer_end))["citations"]
    assert wire[2] == {"marker": 9, "source_id": None, "stage": None}


async def test_source_ids_are_stable_across_runs() -> None:
    def ids(events: list[Any]) -> list[str]:
        return [e.source.id for e in events if e.type == "source"]

    runs = []
    for _ in range(2):
        model = ScriptedChatModel(scripts=[["ok"], ["ok"]])
        runs.append(
            await collect(
                chain_of(QA), {"question": "주말에도 매장을 여나요?"}, models={"fake": model}
            )
        )
    assert ids(runs[0]) == ids(runs[1]) == ["ko-store.txt#1"]


async def test_an_empty_query_returns_no_hits_and_the_answer_gets_empty_citations() -> None:
    model = ScriptedChatModel(scripts=[["nothing [1]"], ["x"]])
    events = await collect(chain_of(QA), {"question": "   "}, models={"fake": model})
    search_end = next(e for e in events if e.type == "stage-end" and e.stage == "search")
    assert (search_end.status, search_end.output) == ("succeeded", [])
    answer_end = next(e for e in events if e.type == "stage-end" and e.stage == "answer")
    assert answer_end.citations == [Citation(marker=1, source_id=None, stage=None)]


async def test_a_retrieve_inside_a_map_tags_sources_with_the_item_path() -> None:
    chain = chain_of(
        f"""
        inputs:
          questions: {{type: array}}
        stages:
          - id: searches
            kind: map
            over: "{{{{ inputs.questions }}}}"
            as: q
            concurrency: 1
            stage:
              kind: retrieve
              query: "{{{{ q }}}}"
              collection: {SAMPLE}
              top_k: 1
        """
    )
    events = await collect(chain, {"questions": ["C-wire", "카카오톡 상담"]})
    assert [fmt(e) for e in events] == [
        "run-start",
        "stage-start searches",
        "stage-start searches[0]",
        "source searches[0] thermostat-manual.pdf#p1-1",
        "stage-end searches[0] succeeded",
        "stage-progress searches 1/2",
        "stage-start searches[1]",
        "source searches[1] support.xlsx#고객센터!row3",
        "stage-end searches[1] succeeded",
        "stage-progress searches 2/2",
        "stage-end searches succeeded",
        "run-end succeeded",
    ]
    assert [e.path for e in events if e.type == "source"] == [["searches", 0], ["searches", 1]]


async def test_a_missing_collection_fails_the_stage_naming_the_path(tmp_path: Path) -> None:
    chain = chain_of(
        """
        stages:
          - id: search
            kind: retrieve
            query: anything
            collection: gone
        """,
        path=tmp_path / "c.yaml",
    )
    events = await collect(chain, {}, collections=CollectionsConfig())
    end = events[-2]
    assert (end.type, end.status, end.error.type) == ("stage-end", "failed", "collection_error")
    assert end.error.message == (
        f"unknown collection 'gone': not a name in configs/collections.yaml and no folder "
        f"{tmp_path / 'gone'}"
    )


# -- bring your own retriever --------------------------------------------------------------------


class KeywordRetriever(BaseRetriever):
    """A LangChain retriever: the documents that contain a word of the query."""

    documents: list[Document]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = set(query.lower().split())
        return [d for d in self.documents if words & set(d.page_content.lower().split())]


DOCS = [
    Document(
        page_content="cats sleep sixteen hours",
        metadata={"source": "kb/cats.md", "score": 0.9, "title": "Cats"},
        id="cats",
    ),
    Document(page_content="dogs need walks", metadata={"source": "https://kb.example/dogs"}),
]

KB_CHAIN = """
inputs:
  question: {type: string}
defaults: {model: fake}
stages:
  - id: search
    kind: retrieve
    query: "{{ inputs.question }}"
    collection: kb
    min_score: 0.5
  - id: answer
    kind: llm
    prompt: "{% for s in stages.search.output %}[{{ loop.index }}] {{ s.text }} {% endfor %}"
"""


async def test_a_langchain_base_retriever_plugs_in_from_python() -> None:
    model = ScriptedChatModel(scripts=[["They sleep [1] and walk [2]."]])
    events = await collect(
        chain_of(KB_CHAIN),
        {"question": "cats and dogs"},
        models={"fake": model},
        retrievers={"kb": KeywordRetriever(documents=DOCS)},
    )
    sources = [e.source for e in events if e.type == "source"]
    assert sources == [
        Source(
            id="cats",
            title="Cats",
            text="cats sleep sixteen hours",
            url="kb/cats.md",
            score=0.9,
            metadata={"source": "kb/cats.md", "score": 0.9, "title": "Cats"},
        ),
        Source(
            id=sources[1].id,
            title="dogs",
            text="dogs need walks",
            url="https://kb.example/dogs",
            score=None,
            metadata={"source": "https://kb.example/dogs"},
        ),
    ]
    assert sources[1].id.startswith("doc-") and len(sources[1].id) == 16
    end = next(e for e in events if e.type == "stage-end" and e.stage == "answer")
    assert end.citations == [
        Citation(marker=1, source_id="cats", stage="search"),
        Citation(marker=2, source_id=sources[1].id, stage="search"),
    ]


async def test_a_vector_store_plugs_in_through_as_retriever() -> None:
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents(DOCS)
    model = ScriptedChatModel(scripts=[["ok"]])
    events = await collect(
        chain_of(KB_CHAIN.replace("min_score: 0.5", "top_k: 1")),
        {"question": "cats"},
        models={"fake": model},
        retrievers={"kb": store},
    )
    assert len([e for e in events if e.type == "source"]) == 1
    assert events[-1].status == "succeeded"


async def test_a_retriever_named_by_import_path_in_collections_yaml() -> None:
    config = CollectionsConfig(
        collections={"kb": CollectionEntry(retriever="tests.engine.test_retrieve_stage:make_kb")}
    )
    model = ScriptedChatModel(scripts=[["ok"]])
    events = await collect(
        chain_of(KB_CHAIN), {"question": "dogs"}, models={"fake": model}, collections=config
    )
    assert [e.source.text for e in events if e.type == "source"] == ["dogs need walks"]


def make_kb() -> BaseRetriever:
    return KeywordRetriever(documents=DOCS)


# -- docs_qa, the shipped chain, end to end ------------------------------------------------------


def _cli_events(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "stagecast.api.cli", "run", "docs_qa", "--events", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize(
    ("inputs", "first_source", "quoted"),
    [
        (
            ["-i", "question=Is water damage covered by the warranty?"],
            "warranty.docx#2",
            "The warranty does not cover water damage",
        ),
        (
            ["-i", "question=해외 배송 시 관세는 누가 내나요?", "-i", "language=ko"],
            "support.xlsx#고객센터!row4",
            "해외 배송은 40개국으로 가능하며",
        ),
    ],
)
def test_docs_qa_streams_sources_then_an_answer_citing_them(
    inputs: list[str], first_source: str, quoted: str
) -> None:
    events = _cli_events(*inputs)
    types = [e["type"] for e in events]
    sources = [e["source"]["id"] for e in events if e["type"] == "source"]
    assert sources[0] == first_source
    assert max(i for i, t in enumerate(types) if t == "source") < types.index("token")
    answer = next(e for e in events if e["type"] == "stage-end" and e["stage"] == "answer")
    assert answer["citations"][0] == {"marker": 1, "source_id": first_source, "stage": "search"}
    assert all(c["source_id"] in sources for c in answer["citations"])
    assert quoted in answer["output"] and "[1]" in answer["output"]
    assert events[-1]["outputs"]["answer"] == answer["output"]


def test_docs_qa_says_not_in_the_documents_when_nothing_matches() -> None:
    events = _cli_events("-i", "question=What is the capital of France?")
    assert [e["type"] for e in events if e["type"] in ("source", "token")] == []
    assert events[-1]["outputs"] == {"answer": "Not in the documents."}


def test_docs_qa_loads_with_its_collection_checked() -> None:
    chain = load_chain(ROOT / "chains" / "docs_qa.yaml")
    assert [s.kind for s in chain.spec.stages] == ["retrieve", "llm", "template"]
