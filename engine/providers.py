"""Model names -> LangChain chat models, built from configs/models.yaml.

This is the only module of the engine that reads the environment, and only for what the config
names (``api_key_env``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``). Secrets never appear in a
message: error texts a server sends back are scrubbed of the key (OpenAI's own 401 echoes part of
it) and of anything shaped like one.

Retries are owned in one place. The OpenAI client is built with ``max_retries=0`` and
langchain-openai's per-chunk timer is off, so a fault surfaces at once as an exception;
``classify_error`` turns it into ``TransientError`` (the orchestrator retries it with backoff and
jitter, waiting ``retry_after`` when the server sent ``Retry-After``) or into a plain
``StageError`` that fails the stage at once, with a message that names the model entry and what
to fix. The number of retries comes from the stage, then the chain's defaults, then the entry's
``max_retries``.

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
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit, urlunsplit

import yaml
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from langchain_core.outputs import ChatGenerationChunk
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from engine.errors import ModelConfigError, StageError, TransientError
from engine.offline import OfflineChatModel

__all__ = [
    "DEFAULT_MODELS_FILE",
    "DEFAULT_OPENAI_RETRIES",
    "MODELS_FILE_ENV",
    "ModelEntry",
    "ModelRegistry",
    "ModelsConfig",
    "ResolvedModel",
    "classify_error",
    "describe_models",
    "load_models_config",
    "prepare_json_model",
]

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "configs" / "models.yaml"
DEFAULT_OPENAI_RETRIES = 2
"""Stagecast-level retries of an ``openai`` entry that sets no ``max_retries``."""

JsonMode = Literal["json_schema", "json_object", "off"]


class ModelEntry(BaseModel):
    """One named model of configs/models.yaml."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["auto", "offline", "openai"] = Field(description="Who serves the model.")
    description: str | None = Field(None, description="What the entry is for.")
    model: str | None = Field(None, description="The provider's model name, e.g. gpt-4o-mini.")
    base_url: str | None = Field(
        None,
        description="An OpenAI-compatible server's /v1 URL; unset: $OPENAI_BASE_URL, else OpenAI.",
    )
    api_key_env: str = Field("OPENAI_API_KEY", description="The variable holding the API key.")
    key_required: bool = Field(
        True,
        description="false for a local server that needs no key: the key is sent when the "
        "variable is set, else a placeholder.",
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    timeout: float | None = Field(
        None, gt=0, description="Seconds for each phase of a request (connect, read, write)."
    )
    connect_timeout: float | None = Field(
        None, gt=0, description="Seconds to open the connection (overrides timeout)."
    )
    read_timeout: float | None = Field(
        None,
        gt=0,
        description="Most seconds between two reads, a stalled stream too (overrides timeout).",
    )
    max_retries: int | None = Field(
        None,
        ge=0,
        description="Stagecast-level retries when the stage and the chain set none "
        f"(openai entries: {DEFAULT_OPENAI_RETRIES}). The HTTP client itself never retries.",
    )
    json_mode: JsonMode | None = Field(
        None,
        description="How output: json stages ask for JSON. Unset: json_schema when the stage "
        "has a schema, else json_object. Use json_object or off for servers without support.",
    )
    delay_ms: float = Field(0.0, ge=0, description="offline: wait before each token.")
    price_input_per_million: float | None = Field(None, ge=0, description="USD.")
    price_output_per_million: float | None = Field(None, ge=0, description="USD.")
    openai_model: str | None = Field(
        None, description="auto: the entry to use when the API key is set."
    )


class ModelsConfig(BaseModel):
    """configs/models.yaml."""

    model_config = ConfigDict(extra="forbid")

    default: str = Field("auto", description="The model used when a chain names none.")
    models: dict[str, ModelEntry] = Field(default_factory=dict)


BUILTIN_MODELS = ModelsConfig(
    models={
        "auto": ModelEntry(provider="auto", openai_model="gpt-4o-mini"),
        "offline": ModelEntry(provider="offline"),
        "demo": ModelEntry(provider="offline", delay_ms=25),
        "gpt-4o-mini": ModelEntry(provider="openai", model="gpt-4o-mini"),
    }
)


MODELS_FILE_ENV = "STAGECAST_MODELS"
"""A variable naming another models.yaml to use instead of configs/models.yaml."""


def load_models_config(path: Path | None = None) -> ModelsConfig:
    """Read ``path``, else $STAGECAST_MODELS, else configs/models.yaml (else built-in entries)."""
    if path is None and os.environ.get(MODELS_FILE_ENV):
        path = Path(os.environ[MODELS_FILE_ENV])
    file = path or DEFAULT_MODELS_FILE
    if not file.exists():
        if path is not None:
            raise ModelConfigError(f"{file}: no such file")
        return BUILTIN_MODELS
    stat = file.stat()
    return _parse_models_file(file.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _parse_models_file(file: Path, mtime_ns: int, size: int) -> ModelsConfig:
    """Parsed once per version of the file (a registry is built per run); treat as read-only."""
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        return ModelsConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{file}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelConfigError(f"{file}: {problems}") from None


@dataclass
class ResolvedModel:
    """A model ready to call, with the name it came from and a label for events."""

    name: str
    label: str
    chat_model: BaseChatModel
    entry: ModelEntry | None = None

    @property
    def retries(self) -> int | None:
        """The entry's Stagecast-level retries (None: the entry does not say)."""
        return self.entry.max_retries if self.entry is not None else None

    def cost(self, input_tokens: int, output_tokens: int) -> float | None:
        """USD for this usage, or None when the entry has no prices."""
        entry = self.entry
        if entry is None:
            return None
        price_in, price_out = entry.price_input_per_million, entry.price_output_per_million
        if price_in is None and price_out is None:
            return None
        return (input_tokens * (price_in or 0.0) + output_tokens * (price_out or 0.0)) / 1e6


class ModelRegistry:
    """Resolves model names; ``overrides`` plugs in any LangChain chat model by name."""

    def __init__(
        self,
        config: ModelsConfig | None = None,
        *,
        overrides: Mapping[str, BaseChatModel] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config or load_models_config()
        self.overrides = dict(overrides or {})
        self.environ = os.environ if environ is None else environ
        self._cache: dict[str, ResolvedModel] = {}

    @property
    def default(self) -> str:
        return self.config.default

    def names(self) -> list[str]:
        return sorted({*self.config.models, *self.overrides})

    def known_names(self) -> list[str]:
        """Every name a chain may use: the entries, plus ``default`` (the configured default)."""
        return sorted({*self.names(), "default"})

    def resolve(self, name: str | None = None) -> ResolvedModel:
        if not name or (name == "default" and name not in self.config.models):
            name = self.default
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self._build(name)
        return cached

    async def aclose(self) -> None:
        """Close the HTTP connections of the models built so far (call on shutdown)."""
        built, self._cache = list(self._cache.values()), {}
        for resolved in built:
            client = getattr(resolved.chat_model, "root_async_client", None)
            if client is not None:
                await client.close()
            sync_client = getattr(resolved.chat_model, "root_client", None)
            if sync_client is not None:
                sync_client.close()

    def _key(self, entry: ModelEntry) -> str | None:
        return self.environ.get(entry.api_key_env) or None

    def _auto_target(self, entry: ModelEntry) -> str | None:
        """The entry ``auto`` stands for right now: the OpenAI one when its key is set."""
        if self._key(entry):
            return entry.openai_model or "gpt-4o-mini"
        return None

    def _build(self, name: str) -> ResolvedModel:
        if name in self.overrides:
            model = self.overrides[name]
            return ResolvedModel(name, name, model)
        entry = self.config.models.get(name)
        if entry is None:
            raise ModelConfigError(
                f"unknown model {name!r}; models are: {', '.join(self.names())} "
                "(configs/models.yaml)"
            )
        if entry.provider == "auto":
            target = self._auto_target(entry)
            if target is not None:
                target_entry = self.config.models.get(target)
                if target_entry is not None and target != name:
                    resolved = self.resolve(target)
                else:
                    fallback = ModelEntry(
                        provider="openai", model=target, api_key_env=entry.api_key_env
                    )
                    resolved = self._openai(name, fallback)
                return ResolvedModel(name, resolved.label, resolved.chat_model, resolved.entry)
            return ResolvedModel(name, "offline", OfflineChatModel(), entry)
        if entry.provider == "offline":
            label = "offline" if not entry.delay_ms else f"offline (delay {entry.delay_ms:g} ms)"
            return ResolvedModel(name, label, OfflineChatModel(delay_ms=entry.delay_ms), entry)
        return self._openai(name, entry)

    def _openai(self, name: str, entry: ModelEntry) -> ResolvedModel:
        if entry.max_retries is None:
            entry = entry.model_copy(update={"max_retries": DEFAULT_OPENAI_RETRIES})
        key = self._key(entry)
        if key is None:
            if entry.key_required:
                raise ModelConfigError(
                    f"model {name!r} needs an API key: set {entry.api_key_env} "
                    f"(api_key_env of {name!r} in configs/models.yaml; key_required: false "
                    "for a local server that needs none)"
                )
            key = "not-needed"  # the client insists on a key; a keyless server ignores it
        kwargs: dict[str, Any] = {
            "model": entry.model or "gpt-4o-mini",
            "api_key": key,
            "streaming": True,
            "stream_usage": True,
            # Stagecast owns retries (orchestrator + classify_error), so the client makes none.
            "max_retries": 0,
            "stream_chunk_timeout": None,
            "entry_name": name,
            "json_mode": entry.json_mode,
        }
        base_url = entry.base_url or self.environ.get("OPENAI_BASE_URL")
        if base_url:
            kwargs["base_url"] = base_url
            kwargs["plain_max_tokens"] = urlsplit(base_url).hostname != "api.openai.com"
        if entry.temperature is not None:
            kwargs["temperature"] = entry.temperature
        if entry.max_tokens is not None:
            kwargs["max_tokens"] = entry.max_tokens
        kwargs["timeout"] = _timeout(entry)
        model = _openai_model_class()(**kwargs)
        return ResolvedModel(name, f"openai:{kwargs['model']}", model, entry)


def _timeout(entry: ModelEntry) -> Any:
    # Always a Timeout object: it is unhashable, so langchain-openai gives each model its own
    # HTTP client (not one cached per URL), which ModelRegistry.aclose() may close safely.
    import openai

    default = entry.timeout if entry.timeout is not None else 600.0
    return openai.Timeout(
        default,
        connect=entry.connect_timeout if entry.connect_timeout is not None else default,
        read=entry.read_timeout if entry.read_timeout is not None else default,
    )


def describe_models(registry: ModelRegistry) -> list[dict[str, Any]]:
    """One row per configured model for ``stagecast models``; never holds a secret.

    Each row: ``name``, ``provider``, ``model`` (what the provider is asked for; for ``auto``,
    what it resolves to now), ``base_url`` (credentials stripped), ``usable``, ``why_not``
    (what to fix when not usable, else None), ``default`` (is it the config's default),
    ``description``, ``price_input_per_million``, ``price_output_per_million``.
    """
    rows: list[dict[str, Any]] = []
    environ = registry.environ
    for name in registry.names():
        entry = registry.config.models.get(name)
        row: dict[str, Any] = {
            "name": name,
            "provider": "custom",
            "model": None,
            "base_url": None,
            "usable": True,
            "why_not": None,
            "default": name == registry.default,
            "description": None,
            "price_input_per_million": None,
            "price_output_per_million": None,
        }
        if name in registry.overrides or entry is None:
            rows.append(row)
            continue
        row["provider"] = entry.provider
        row["description"] = entry.description
        row["price_input_per_million"] = entry.price_input_per_million
        row["price_output_per_million"] = entry.price_output_per_million
        shown = entry
        if entry.provider == "auto":
            target = registry._auto_target(entry)
            if target is None:
                row["model"] = "offline"
                shown = entry
            else:
                shown = registry.config.models.get(target) or ModelEntry(
                    provider="openai", model=target, api_key_env=entry.api_key_env
                )
                row["model"] = shown.model or target
        elif entry.provider == "offline":
            row["model"] = "offline"
        else:
            row["model"] = entry.model or "gpt-4o-mini"
        if shown.provider == "openai":
            base_url = shown.base_url or environ.get("OPENAI_BASE_URL")
            row["base_url"] = _safe_url(base_url) if base_url else "(OpenAI)"
            if shown.key_required and not environ.get(shown.api_key_env):
                row["usable"] = False
                row["why_not"] = f"set {shown.api_key_env}"
            if entry.provider == "auto":
                row["price_input_per_million"] = shown.price_input_per_million
                row["price_output_per_million"] = shown.price_output_per_million
        rows.append(row)
    return rows


def _safe_url(url: str) -> str:
    """``url`` without userinfo, query or fragment (where credentials hide)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(invalid URL)"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# -- the OpenAI chat model ---------------------------------------------------------------------


@functools.cache
def _openai_model_class() -> type[BaseChatModel]:
    """``ChatOpenAI`` with Stagecast's error handling; built on first use (the import is slow)."""
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
    from langchain_openai import ChatOpenAI

    class StagecastChatOpenAI(ChatOpenAI):
        """ChatOpenAI whose stream raises StageError naming the entry, and never ends short."""

        entry_name: str = ""
        """The configs/models.yaml entry this model was built from."""
        json_mode: JsonMode | None = None
        """How output: json stages ask for JSON (see ModelEntry.json_mode)."""
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
                    exc, self.entry_name, model=self.model_name, secrets=self._secrets()
                ) from exc
            finally:
                await inner.aclose()  # closes the HTTP response if we stop early
            if not finished:
                raise TransientError(
                    f"model {self.entry_name!r}: the answer stream ended before the answer "
                    "did (no finish_reason); the server or a proxy cut it",
                    type="stream_cut",
                )

        def _secrets(self) -> list[str]:
            key = self.openai_api_key
            value = key.get_secret_value() if isinstance(key, SecretStr) else ""
            return [value] if value else []

    return StagecastChatOpenAI


def _finish_reason(chunk: ChatGenerationChunk) -> Any:
    info = chunk.generation_info
    if info and info.get("finish_reason"):
        return info["finish_reason"]
    return chunk.message.response_metadata.get("finish_reason")


def _is_openai_model(model: Any) -> bool:
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
    if _is_openai_model(model):
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


# -- errors ------------------------------------------------------------------------------------

_KEYLIKE = re.compile(r"\b(?:sk|rk|pk|key)-[A-Za-z0-9_\-*]{6,}")


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


def _causes(exc: BaseException) -> list[str]:
    names: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return names


def classify_error(
    exc: BaseException,
    model_name: str = "",
    *,
    model: str | None = None,
    secrets: Iterable[str] = (),
) -> StageError:
    """A provider exception as a StageError: TransientError when worth retrying.

    Args:
        exc: what the model call raised.
        model_name: the configs/models.yaml entry, named in the message.
        model: the provider's model name (``model:`` of the entry), named for a 404.
        secrets: strings scrubbed from any text the server sent back (the API key).
    """
    if isinstance(exc, StageError):
        return exc
    secrets = list(secrets)
    entry = f"model {model_name!r}" if model_name else "the model"
    where = f"{entry}: "
    fix_in = f" of {model_name!r} in configs/models.yaml" if model_name else ""
    causes = _causes(exc)
    try:
        import openai
    except ImportError:  # pragma: no cover - langchain-openai depends on it
        openai = None  # type: ignore[assignment]
    if openai is not None and isinstance(exc, openai.OpenAIError):
        if isinstance(exc, openai.APITimeoutError):
            if "ConnectTimeout" in causes:
                return TransientError(
                    f"{where}timed out connecting to {_request_host(exc)} "
                    f"(connect_timeout{fix_in})",
                    type="timeout",
                )
            return TransientError(
                f"{where}the server sent nothing for too long (read_timeout{fix_in})",
                type="timeout",
            )
        if isinstance(exc, openai.APIConnectionError):
            if "ConnectError" in causes:
                return TransientError(
                    f"{where}cannot connect to {_request_host(exc)}: is the server running? "
                    f"(base_url{fix_in})",
                    type="connection_error",
                )
            return TransientError(
                f"{where}the connection to {_request_host(exc)} dropped mid-answer",
                type="connection_error",
            )
        if isinstance(exc, openai.APIStatusError):
            return _status_error(exc, where, fix_in, model, secrets)
        if isinstance(exc, openai.LengthFinishReasonError):
            return StageError(
                f"{where}the answer hit max_tokens before the JSON was complete: raise "
                f"max_tokens (of the stage, the chain's defaults, or{fix_in or ' the entry'})",
                type="max_tokens",
            )
        if isinstance(exc, openai.APIError):  # an error event inside the stream
            detail = _scrub(str(exc.message), secrets)
            return TransientError(
                f"{where}the server reported an error: {detail}", type="server_error"
            )
    if isinstance(exc, json.JSONDecodeError):
        return TransientError(
            f"{where}the server sent a malformed stream chunk ({exc.msg})", type="malformed_chunk"
        )
    if isinstance(exc, TimeoutError):
        return TransientError(f"{where}timed out waiting for the next chunk", type="timeout")
    if isinstance(exc, ConnectionError):
        return TransientError(f"{where}{type(exc).__name__}", type="connection_error")
    detail = _scrub(str(exc), secrets)
    return StageError(f"{where}{type(exc).__name__}: {detail}", type="model_error")


def _status_error(
    exc: Any, where: str, fix_in: str, model: str | None, secrets: list[str]
) -> StageError:
    status = int(exc.status_code)
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    message = (
        _scrub(str(error.get("message") or exc.message), secrets)
        if isinstance(error, dict)
        else _scrub(str(exc.message), secrets)
    )
    if status == 401:
        return StageError(
            f"{where}the server refused the API key (401): check the key in the variable "
            f"named by api_key_env{fix_in}",
            type="auth_error",
        )
    if status == 403:
        return StageError(
            f"{where}the API key may not use this model (403): check the key's project "
            f"and permissions, or pick another model{fix_in}",
            type="auth_error",
        )
    if status == 429 and code == "insufficient_quota":
        return StageError(
            f"{where}the account's quota is used up (429 insufficient_quota): check billing",
            type="quota_exceeded",
        )
    if status == 429:
        return TransientError(
            f"{where}rate limited (429)", type="rate_limited", retry_after=_retry_after(exc)
        )
    if status in (408, 409) or status >= 500:
        return TransientError(
            f"{where}server error ({status}): {message}",
            type="server_error",
            retry_after=_retry_after(exc),
        )
    if status == 404:
        if "model" in message.lower() or code == "model_not_found":
            name = f" {model!r}" if model else ""
            return StageError(
                f"{where}the server has no model{name} (404): fix model{fix_in}, or load "
                "it into the server (e.g. ollama pull)",
                type="model_not_found",
            )
        return StageError(
            f"{where}no chat completions endpoint at {_request_host(exc)} (404): check "
            f"base_url{fix_in} (it usually ends in /v1)",
            type="model_error",
        )
    hint = ""
    lowered = message.lower()
    if "response_format" in lowered or "json_schema" in lowered:
        hint = f"; if the server lacks JSON mode, set json_mode: json_object or off{fix_in}"
    elif "context" in lowered and ("length" in lowered or "window" in lowered):
        hint = "; shorten the input or use a model with a larger context"
    return StageError(f"{where}request refused ({status}): {message}{hint}", type="model_error")


def _request_host(exc: Any) -> str:
    try:
        url = exc.request.url
        return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")
    except AttributeError:
        return "the server"


def _retry_after(exc: Any) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, then ``Retry-After``."""
    try:
        headers = exc.response.headers
    except AttributeError:
        return None
    try:
        millis = headers.get("retry-after-ms")
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    except (TypeError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None
