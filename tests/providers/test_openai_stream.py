"""engine/openai_stream.py: the SSE reading of the fast path, wire detail by wire detail, and
which models take it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import openai
import pytest
from langchain_core.language_models import BaseChatModel

from stagecast.engine.faults import classify_error
from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.offline import OfflineChatModel, Piece
from stagecast.engine.openai_stream import _read, fast_stream
from stagecast.engine.providers import ModelRegistry
from tests.providers.conftest import KEY, entry_fields

pytestmark = pytest.mark.anyio


class Body:
    """A response whose body arrives in exactly the given reads."""

    def __init__(self, *reads: bytes, fail: Exception | None = None) -> None:
        self.reads = reads
        self.fail = fail
        self.request = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")
        self.consumed = 0

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            self.consumed += 1
            yield read
        if self.fail is not None:
            raise self.fail


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice], **extra}).encode() + b"\n\n"


USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n'


def show(pieces: list[Piece | None]) -> list[Any]:
    out: list[Any] = []
    for p in pieces:
        if p is None:
            out.append("finish")
        elif p.usage_metadata:
            out.append(
                (p.content, p.usage_metadata["input_tokens"], p.usage_metadata["output_tokens"])
            )
        else:
            out.append(p.content)
    return out


async def read(body: Body) -> list[Piece | None]:
    with anyio.fail_after(2):
        return [p async for p in _read(body)]


async def test_tokens_finish_and_usage_in_order() -> None:
    body = Body(
        chunk("", role="assistant") + chunk("Hi") + chunk(" you"),
        chunk(finish="stop"),
        USAGE,
        b"data: [DONE]\n\n",
    )
    assert show(await read(body)) == ["Hi", " you", "finish", ("", 3, 2)]


async def test_events_split_anywhere_across_reads() -> None:
    wire = chunk("Hé") + chunk("llo") + chunk(finish="stop") + b"data: [DONE]\n\n"
    for size in (1, 2, 7, 50):
        reads = [wire[i : i + size] for i in range(0, len(wire), size)]
        assert show(await read(Body(*reads))) == ["Hé", "llo", "finish"]


async def test_crlf_and_cr_line_ends_comments_and_other_fields() -> None:
    wire = (chunk("a") + chunk("b")).replace(b"\n", b"\r\n") + b": keep-alive\r\r"
    wire += b"event: message\nid: 7\nretry: 10\n" + chunk("c", "stop").replace(b"\n", b"\r")
    reads = [wire[i : i + 3] for i in range(0, len(wire), 3)]
    assert show(await read(Body(*reads))) == ["a", "b", "finish", "c"]


async def test_data_lines_of_one_event_are_joined_and_the_space_is_optional() -> None:
    wire = b'data:{"choices": [{"delta":\ndata: {"content": "x"}, "finish_reason": null}]}\n\n'
    assert show(await read(Body(wire))) == ["x"]


async def test_usage_on_a_chunk_with_choices_and_a_null_delta() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 1}
    wire = chunk("z", "stop", usage=usage)
    wire += b'data: {"choices": [{"delta": null, "finish_reason": "stop"}]}\n\n'
    assert show(await read(Body(wire))) == ["finish", ("z", 5, 1)]


async def test_done_ends_the_reading_and_the_rest_of_the_body_is_drained() -> None:
    body = Body(chunk("a") + b"data: [DONE]\n\n" + chunk("never"), b"tail", b"more")
    assert show(await read(body)) == ["a"]
    assert body.consumed == 3


async def test_an_error_object_in_the_stream_is_the_sdks_api_error() -> None:
    wire = (
        chunk("a")
        + b'data: {"error": {"message": "overloaded for sk-abcdefgh123", "type": "x"}}\n\n'
    )
    with pytest.raises(openai.APIError) as caught:
        await read(Body(wire))
    assert type(caught.value) is openai.APIError
    error = classify_error(caught.value, "local")
    assert (error.type, str(error)) == (
        "server_error",
        "model 'local': the server reported an error: overloaded for ***",
    )


async def test_an_error_without_a_message_gets_the_sdks_wording() -> None:
    with pytest.raises(openai.APIError, match="^An error occurred during streaming$"):
        await read(Body(b'data: {"error": {"code": 5}}\n\n'))


async def test_a_payload_that_is_not_json_raises_the_stdlibs_error() -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        await read(Body(b'data: {"choices": [{"delta": {"content": "x\n\n'))
    assert caught.value.msg == "Unterminated string starting at"


@pytest.mark.parametrize(
    ("fail", "kind"),
    [
        (httpx2.ReadTimeout("slow"), openai.APITimeoutError),
        (httpx2.RemoteProtocolError("peer closed"), openai.APIConnectionError),
    ],
)
async def test_transport_failures_map_as_the_sdk_maps_them(fail: Exception, kind: type) -> None:
    with pytest.raises(kind) as caught:
        await read(Body(chunk("a"), fail=fail))
    assert caught.value.__cause__ is fail


async def test_other_failures_pass_through() -> None:
    with pytest.raises(RuntimeError, match="^boom$"):
        await read(Body(chunk("a"), fail=RuntimeError("boom")))


# -- which models take the fast path ------------------------------------------------------------


def openai_model(**fields: Any) -> BaseChatModel:
    entry = ModelEntry.model_validate(entry_fields(base_url="http://127.0.0.1:9/v1", **fields))
    models = ModelRegistry(
        ModelsConfig(models={"local": entry}), environ={"STAGECAST_TEST_KEY": KEY}
    )
    return models.resolve("local").chat_model


async def test_registry_models_and_their_json_bindings_take_the_fast_path() -> None:
    model = openai_model()
    for runnable in (model, model.bind(response_format={"type": "json_object"})):
        stream = fast_stream(runnable, [], {})
        assert stream is not None
        await stream.aclose()


def test_other_models_and_bindings_go_through_astream() -> None:
    assert fast_stream(openai_model(fast_stream=False), [], {}) is None
    assert fast_stream(openai_model().bind(tools=[]), [], {}) is None
    assert fast_stream(OfflineChatModel(), [], {}) is None
    from langchain_openai import ChatOpenAI

    assert fast_stream(ChatOpenAI(api_key="x", base_url="http://127.0.0.1:9/v1"), [], {}) is None
