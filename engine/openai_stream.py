"""The streaming fast path for ``provider: openai`` entries: chat completions read off the wire.

``ChatOpenAI.astream()`` costs ~25-30 µs of CPU per token here: the SDK builds a pydantic
``ChatCompletionChunk`` per SSE event, langchain-openai dumps it back to a dict, builds an
``AIMessageChunk`` and a ``ChatGenerationChunk``, and langchain-core runs its callback manager
and merges the chunks. A stage needs only the text deltas, the finish reason and the usage, so
for a model the registry built (``StagecastChatOpenAI`` with ``fast_stream``), this module:

* builds the request exactly as ``ChatOpenAI._astream`` does (``_get_request_payload``, so
  ``max_tokens``, ``response_format`` bound by ``prepare_json_model`` and
  ``stream_options.include_usage`` come out the same);
* sends it through the SDK client the model already holds
  (``async_client.with_streaming_response``): same connection pool, headers, timeouts, and the
  SDK's own mapping of HTTP statuses and connect failures to ``openai`` exceptions;
* reads the body bytes itself: splits the SSE lines, parses each ``data:`` payload with orjson
  and yields ``Piece`` objects (the offline model's) straight to the stage.

Errors are the ones the ``astream()`` path gives, message for message: failures while reading the
body become ``APITimeoutError``/``APIConnectionError`` as the SDK's ``AsyncStream`` does, an error
object inside the stream is an ``APIError``, a payload that is not JSON is re-parsed by the
stdlib so the ``JSONDecodeError`` reads the same, and ``classify_error`` turns them all into
``StageError``; a stream that ends without a ``finish_reason`` is cut (``stream_cut_error``).
Usage is ``langchain_openai``'s own ``_create_usage_metadata`` of the usage object, so whatever
the orchestrator does with ``usage_metadata`` applies to both paths.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import orjson
from langchain_core.messages import BaseMessage

from stagecast.engine.errors import StageError
from stagecast.engine.faults import classify_error
from stagecast.engine.offline import Piece

__all__ = ["fast_stream", "stream_pieces"]


def fast_stream(
    runnable: Any, messages: Sequence[BaseMessage], kwargs: dict[str, Any]
) -> AsyncGenerator[Piece, None] | None:
    """The fast stream for ``runnable``, or None when it must go through ``astream()``.

    ``runnable`` is what the orchestrator would call ``astream()`` on: a registry-built OpenAI
    model, or that model bound to a ``response_format`` (a JSON stage). Anything else (a
    ``BaseChatModel`` passed from Python, an entry with ``fast_stream: false``) gets None.
    """
    from stagecast.engine.openai_model import openai_model_class

    model, bound = runnable, {}
    inner = getattr(runnable, "bound", None)
    if inner is not None:  # a RunnableBinding made by .bind(response_format=...)
        model, bound = inner, dict(getattr(runnable, "kwargs", {}) or {})
        if set(bound) - {"response_format"}:
            return None
    if getattr(model, "fast_stream", False) is not True or type(model) is not openai_model_class():
        return None
    return stream_pieces(model, messages, {**bound, **kwargs})


async def stream_pieces(
    model: Any, messages: Sequence[BaseMessage], kwargs: dict[str, Any]
) -> AsyncGenerator[Piece, None]:
    """Stream one chat completion of ``model`` (a ``StagecastChatOpenAI``) as pieces."""
    from stagecast.engine.openai_model import stream_cut_error

    kwargs = {**kwargs, "stream": True}
    if model._should_stream_usage(None, **kwargs):
        kwargs["stream_options"] = {"include_usage": True}
    try:
        payload = model._get_request_payload(list(messages), stop=None, **kwargs)
        finished = False
        async with model.async_client.with_streaming_response.create(**payload) as raw:
            response = raw.http_response
            async for piece in _read(response):
                if piece is None:
                    finished = True
                else:
                    yield piece
    except StageError:
        raise
    except Exception as exc:
        raise classify_error(
            exc,
            model.entry_name,
            model=model.model_name,
            secrets=model._secrets(),
            models_file=model.models_file,
        ) from exc
    if not finished:
        raise stream_cut_error(model.entry_name)


async def _read(response: Any) -> AsyncGenerator[Piece | None, None]:
    """The pieces of an SSE body of ``chat.completion.chunk`` objects; None: a finish reason."""
    parser = _EventParser()
    body = response.aiter_bytes()
    try:
        async for raw in body:
            for payload in parser.feed(raw):
                if payload[:6] == b"[DONE]":
                    async for _ in body:  # HTTP/1.1: read the rest so the connection is reused
                        pass
                    return
                for piece in _pieces(payload, response):
                    yield piece
        for payload in parser.finish():
            if payload[:6] == b"[DONE]":
                return
            for piece in _pieces(payload, response):
                yield piece
    except Exception as exc:
        mapped = _transport_error(response, exc)
        if mapped is exc:
            raise
        raise mapped from exc


def _pieces(payload: bytes, response: Any) -> tuple[Piece | None, ...]:
    """What one ``data:`` payload says: as ``ChatOpenAI`` reads a chunk (the first choice's
    ``delta.content``, its ``finish_reason``, the ``usage`` object)."""
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        chunk = json.loads(payload.decode())  # raises the stdlib's error, as the SDK does
    if type(chunk) is not dict:
        return ()
    if chunk.get("error"):
        raise _stream_error(response, chunk["error"])
    choices = chunk.get("choices")
    usage = chunk.get("usage")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta is None:
            return ()
        content = delta.get("content")
        piece = Piece(content or "", _usage(chunk) if usage else None)
        if choice.get("finish_reason"):
            return (None, piece) if content or usage else (None,)
        return (piece,) if content or usage else ()
    if usage:
        return (Piece("", _usage(chunk)),)
    return ()


class _EventParser:
    """Bytes in, the ``data`` of each complete server-sent event out (the SSE spec's rules;
    ``event:``, ``id:``, ``retry:`` and comments are of no use to a chat completion)."""

    __slots__ = ("data", "pending")

    def __init__(self) -> None:
        self.pending = b""
        self.data: list[bytes] = []

    def feed(self, raw: bytes) -> list[bytes]:
        if self.pending:
            raw = self.pending + raw
        held = b""
        if b"\r" in raw:
            if raw[-1:] == b"\r":  # its LF may come with the next read
                raw, held = raw[:-1], b"\r"
            raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = raw.split(b"\n")
        self.pending = lines.pop() + held
        out: list[bytes] = []
        data = self.data
        for line in lines:
            if line:
                if line[:5] == b"data:":
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif data:
                out.append(data[0] if len(data) == 1 else b"\n".join(data))
                data = self.data = []
        return out

    def finish(self) -> list[bytes]:
        """At the end of the body: a last line end held back completes its event; an event
        without its blank line is dropped (as the spec and the SDK do)."""
        pending, self.pending = self.pending, b""
        if pending.endswith(b"\r"):
            return self.feed(pending[:-1] + b"\n")
        return []


def _usage(chunk: dict[str, Any]) -> Any:
    from langchain_openai.chat_models.base import _create_usage_metadata

    return _create_usage_metadata(chunk["usage"], chunk.get("service_tier"))


def _stream_error(response: Any, error: Any) -> Exception:
    """An error object inside the stream, as the SDK's ``AsyncStream`` raises it."""
    import openai

    message = error.get("message") if isinstance(error, dict) else None
    if not message or not isinstance(message, str):
        message = "An error occurred during streaming"
    return openai.APIError(message=message, request=response.request, body=error)


def _transport_error(response: Any, exc: Exception) -> Exception:
    """A failure while reading the body, mapped as the SDK's ``AsyncStream`` maps it."""
    import openai
    from openai._httpx2 import request_exceptions, timeout_exceptions  # AsyncStream's

    if isinstance(exc, timeout_exceptions()):
        return openai.APITimeoutError(request=response.request)
    if isinstance(exc, request_exceptions()):
        return openai.APIConnectionError(request=response.request)
    return exc
