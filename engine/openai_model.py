"""The OpenAI chat model Stagecast builds (``ChatOpenAI`` with its own fault handling) and the
set-up of ``output: json`` calls (JSON mode, schemas, wrapping non-object schemas).

Deliberate divergences from a stock ``ChatOpenAI``:

* a stream that ends without a ``finish_reason`` (a proxy or the server cut it cleanly) is an
  error, not a short answer;
* ``stream_chunk_timeout`` is off: it wraps every chunk in ``asyncio.wait_for`` (a task per
  token on the hot path); the entry's ``read_timeout`` (httpx's, per read) catches a stalled
  stream, the stage's ``timeout`` bounds the whole attempt.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk
from pydantic import SecretStr

from stagecast.engine.errors import StageError, TransientError
from stagecast.engine.faults import classify_error
from stagecast.engine.model_config import JsonMode
from stagecast.engine.offline import OfflineChatModel

__all__ = ["is_openai_model", "openai_model_class", "prepare_json_model", "stream_cut_error"]


@functools.cache
def openai_model_class() -> type[BaseChatModel]:
    """``ChatOpenAI`` with Stagecast's error handling; built on first use (the import is slow)."""
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
    from langchain_openai import ChatOpenAI

    class StagecastChatOpenAI(ChatOpenAI):
        """ChatOpenAI whose stream raises StageError naming the entry, and never ends short."""

        entry_name: str = ""
        """The configs/models.yaml entry this model was built from."""
        models_file: str = "configs/models.yaml"
        """The models file that entry is in (named in error messages)."""
        json_mode: JsonMode | None = None
        """How output: json stages ask for JSON (see ModelEntry.json_mode)."""
        fast_stream: bool = False
        """Stagecast streams this model's chat completions itself (engine/openai_stream.py)
        instead of through ``astream()``; the registry sets it from the entry."""
        plain_max_tokens: bool = False
        """Send ``max_tokens``, not ``max_completion_tokens`` (other OpenAI-compatible servers
        may ignore the newer name, so the limit would silently not apply)."""

        def _get_request_payload(
            self, input_: Any, *, stop: list[str] | None = None, **kwargs: Any
        ) -> dict[str, Any]:
            payload: dict[str, Any] = super()._get_request_payload(input_, stop=stop, **kwargs)
            if self.plain_max_tokens and "max_completion_tokens" in payload:
                payload["max_tokens"] = payload.pop("max_completion_tokens")
            return payload

        async def _astream(
            self,
            messages: list[BaseMessage],
            stop: list[str] | None = None,
            run_manager: AsyncCallbackManagerForLLMRun | None = None,
            **kwargs: Any,
        ) -> AsyncIterator[ChatGenerationChunk]:
            finished = False
            inner = cast(
                AsyncGenerator[ChatGenerationChunk, None],
                super()._astream(messages, stop=stop, run_manager=run_manager, **kwargs),
            )
            try:
                async for chunk in inner:
                    if not finished and _finish_reason(chunk):
                        finished = True
                    yield chunk
            except StageError:
                raise
            except Exception as exc:
                raise classify_error(
                    exc,
                    self.entry_name,
                    model=self.model_name,
                    secrets=self._secrets(),
                    models_file=self.models_file,
                ) from exc
            finally:
                await inner.aclose()  # closes the HTTP response if we stop early
            if not finished:
                raise stream_cut_error(self.entry_name)

        def _secrets(self) -> list[str]:
            key = self.openai_api_key
            value = key.get_secret_value() if isinstance(key, SecretStr) else ""
            return [value] if value else []

    return StagecastChatOpenAI


def stream_cut_error(entry_name: str) -> TransientError:
    """A stream that ended cleanly without a ``finish_reason``: cut, worth a retry."""
    return TransientError(
        f"model {entry_name!r}: the answer stream ended before the answer "
        "did (no finish_reason); the server or a proxy cut it",
        type="stream_cut",
    )


def _finish_reason(chunk: ChatGenerationChunk) -> Any:
    info = chunk.generation_info
    if info and info.get("finish_reason"):
        return info["finish_reason"]
    return chunk.message.response_metadata.get("finish_reason")


def is_openai_model(model: Any) -> bool:
    return any(c.__name__ == "BaseChatOpenAI" for c in type(model).__mro__)  # no slow import


# -- JSON stages -------------------------------------------------------------------------------


def prepare_json_model(
    model: Any, messages: list[BaseMessage], schema: dict[str, Any] | None
) -> tuple[Any, list[BaseMessage], Callable[[Any], Any]]:
    """Set up a call for an ``output: json`` stage: (runnable, messages, unwrap).

    The offline model is told the schema. Other models get the schema in a system message;
    ChatOpenAI also gets ``response_format``: a ``json_schema`` (not strict, so any JSON Schema
    is accepted; the answer is still validated) when the stage has a schema, else JSON mode
    (``json_object``), as the entry's ``json_mode`` allows. Both need an object at the top, so a
    non-object schema is wrapped as ``{"value": ...}`` and ``unwrap`` takes it out again.
    """
    if isinstance(model, OfflineChatModel):
        return model.model_copy(update={"json_schema": schema, "json_mode": True}), messages, _same
    wrap = schema is not None and not _is_object_schema(schema)
    target: dict[str, Any] | None = schema
    if wrap and schema is not None:
        target = {
            "type": "object",
            "properties": {"value": schema},
            "required": ["value"],
            "additionalProperties": False,
        }
    instruction = "Answer with JSON only, no prose and no code fences."
    if target is not None:
        instruction += " The JSON must match this JSON Schema:\n" + json.dumps(target)
    messages = [SystemMessage(instruction), *messages]
    runnable: Any = model
    if is_openai_model(model):
        mode = getattr(model, "json_mode", None)
        if mode is None:
            mode = "json_schema" if target is not None else "json_object"
        if mode == "json_schema" and target is not None:
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": target, "strict": False},
            }
            runnable = model.bind(response_format=response_format)
        elif mode != "off":
            runnable = model.bind(response_format={"type": "json_object"})
    unwrap: Callable[[Any], Any] = _unwrap_value if wrap else _same
    return runnable, messages, unwrap


def _is_object_schema(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if kind is None:
        return "properties" in schema or not schema
    return bool(kind == "object")


def _same(value: Any) -> Any:
    return value


def _unwrap_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"value"}:
        return value["value"]
    return value
