"""The offline model: deterministic, per-word streaming, the same through LangChain and directly."""

from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage, SystemMessage

from stagecast.engine.offline import OfflineChatModel, fake_json
from stagecast.engine.splitting import split_text

pytestmark = pytest.mark.anyio

MESSAGES = [SystemMessage("Be brief."), HumanMessage("Quarterly revenue grew in Seoul offices")]


async def test_direct_stream_and_langchain_astream_agree() -> None:
    model = OfflineChatModel()
    direct = [(p.content, p.usage_metadata) async for p in model.stream_pieces(MESSAGES)]
    chunks = [c async for c in model.astream(MESSAGES)]
    via_langchain = [(c.content, c.usage_metadata) for c in chunks if c.content]
    assert [t for t, _ in direct if t] == [t for t, _ in via_langchain]
    assert "".join(t for t, _ in direct).startswith("[offline ")
    assert direct[-1] == ("", {"input_tokens": 8, "output_tokens": 7, "total_tokens": 15})
    assert model.invoke(MESSAGES).content == "".join(t for t, _ in direct)


def test_fake_json_respects_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 4},
            "n": {"type": "integer", "minimum": 3, "maximum": 9},
            "kind": {"enum": ["a", "b"]},
            "maybe": {"type": ["null", "boolean"]},
        },
    }
    value = fake_json(schema, ["alpha", "beta"])
    assert len(value["tags"]) == 4 and all(len(t) <= 12 for t in value["tags"])
    assert value["n"] == 3 and value["kind"] == "a" and value["maybe"] is True


def test_split_prefers_paragraphs_then_sentences_and_keeps_offsets() -> None:
    text = "First para sentence one. Sentence two.\n\nSecond para is here. " * 20
    chunks = split_text(text, 200, 30)
    assert all(len(c["text"]) <= 200 for c in chunks)
    assert all(text[c["start"] : c["end"]] == c["text"] for c in chunks)
    assert chunks[0]["text"].endswith("\n\n") or chunks[0]["text"].endswith(". ")
    assert chunks[-1]["end"] == len(text)
    with pytest.raises(ValueError, match="overlap must be smaller than chunk_size"):
        split_text(text, 100, 100)
