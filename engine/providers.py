"""Model names -> LangChain chat models, built from configs/models.yaml.

This is the only module of the engine that reads the environment, and only for what the config
names (``api_key_env``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``). Secrets never appear in a
message. ``classify_error`` owns the retry policy's view of provider errors: transient ones become
``TransientError`` (the orchestrator retries them), the rest fail the stage at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, SystemMessage
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import ModelConfigError, StageError, TransientError
from engine.offline import OfflineChatModel

__all__ = [
    "DEFAULT_MODELS_FILE",
    "ModelEntry",
    "ModelRegistry",
    "ModelsConfig",
    "ResolvedModel",
    "classify_error",
    "load_models_config",
    "prepare_json_model",
]

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "configs" / "models.yaml"


class ModelEntry(BaseModel):
    """One named model of configs/models.yaml."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["auto", "offline", "openai"] = Field(description="Who serves the model.")
    description: str | None = Field(None, description="What the entry is for.")
    model: str | None = Field(None, description="The provider's model name, e.g. gpt-4o-mini.")
    base_url: str | None = Field(None, description="An OpenAI-compatible server's /v1 URL.")
    api_key_env: str = Field("OPENAI_API_KEY", description="The variable holding the API key.")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    timeout: float | None = Field(None, gt=0, description="Seconds per request.")
    max_retries: int | None = Field(None, ge=0, description="Stagecast-level retries.")
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


def load_models_config(path: Path | None = None) -> ModelsConfig:
    """Read configs/models.yaml (or ``path``); the built-in entries when the file is absent."""
    file = path or DEFAULT_MODELS_FILE
    if not file.exists():
        if path is not None:
            raise ModelConfigError(f"{file}: no such file")
        return BUILTIN_MODELS
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

    def cost(self, input_tokens: int, output_tokens: int) -> float | None:
        entry = self.entry
        if entry is None or entry.price_input_per_million is None:
            return None
        out_price = entry.price_output_per_million or 0.0
        return (input_tokens * entry.price_input_per_million + output_tokens * out_price) / 1e6


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

    def resolve(self, name: str | None = None) -> ResolvedModel:
        name = name or self.default
        cached = self._cache.get(name)
        if cached is None:
            cached = self._cache[name] = self._build(name)
        return cached

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
            target = entry.openai_model or "gpt-4o-mini"
            if self.environ.get(entry.api_key_env):
                resolved = self._build(target) if target in self.config.models else None
                if resolved is None:
                    resolved = self._openai(name, ModelEntry(provider="openai", model=target))
                return ResolvedModel(name, resolved.label, resolved.chat_model, resolved.entry)
            return ResolvedModel(name, "offline", OfflineChatModel(), entry)
        if entry.provider == "offline":
            label = "offline" if not entry.delay_ms else f"offline (delay {entry.delay_ms:g} ms)"
            return ResolvedModel(name, label, OfflineChatModel(delay_ms=entry.delay_ms), entry)
        return self._openai(name, entry)

    def _openai(self, name: str, entry: ModelEntry) -> ResolvedModel:
        from langchain_openai import ChatOpenAI

        key = self.environ.get(entry.api_key_env)
        if not key:
            raise ModelConfigError(
                f"model {name!r} needs an API key: set {entry.api_key_env} "
                "(configs/models.yaml names the variable in api_key_env)"
            )
        kwargs: dict[str, Any] = {
            "model": entry.model or "gpt-4o-mini",
            "api_key": key,
            "streaming": True,
            "stream_usage": True,
            # Stagecast owns retries (orchestrator + classify_error), so the client makes none.
            "max_retries": 0,
        }
        base_url = entry.base_url or self.environ.get("OPENAI_BASE_URL")
        if base_url:
            kwargs["base_url"] = base_url
        if entry.temperature is not None:
            kwargs["temperature"] = entry.temperature
        if entry.max_tokens is not None:
            kwargs["max_tokens"] = entry.max_tokens
        if entry.timeout is not None:
            kwargs["timeout"] = entry.timeout
        return ResolvedModel(name, f"openai:{kwargs['model']}", ChatOpenAI(**kwargs), entry)


def prepare_json_model(
    model: Any, messages: list[BaseMessage], schema: dict[str, Any] | None
) -> tuple[Any, list[BaseMessage], Callable[[Any], Any]]:
    """Set up a call for an ``output: json`` stage: (runnable, messages, unwrap).

    The offline model is told the schema. Other models get the schema in a system message and,
    for ChatOpenAI, JSON mode; JSON mode needs an object at the top, so a non-object schema is
    wrapped as ``{"value": ...}`` and ``unwrap`` takes it out again.
    """
    if isinstance(model, OfflineChatModel):
        return model.model_copy(update={"json_schema": schema, "json_mode": True}), messages, _same
    wrap = schema is not None and schema.get("type", "object") != "object"
    target = {"type": "object", "properties": {"value": schema}, "required": ["value"]} if (
        wrap and schema is not None
    ) else schema
    instruction = "Answer with JSON only, no prose and no code fences."
    if target is not None:
        instruction += " The JSON must match this JSON Schema:\n" + json.dumps(target)
    messages = [SystemMessage(instruction), *messages]
    runnable: Any = model
    if type(model).__name__ == "ChatOpenAI":
        runnable = model.bind(response_format={"type": "json_object"})
    unwrap: Callable[[Any], Any] = _unwrap_value if wrap else _same
    return runnable, messages, unwrap


def _same(value: Any) -> Any:
    return value


def _unwrap_value(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"value"}:
        return value["value"]
    return value


def classify_error(exc: BaseException, model_name: str = "") -> StageError:
    """A provider exception as a StageError: TransientError when worth retrying."""
    if isinstance(exc, StageError):
        return exc
    where = f"model {model_name!r}: " if model_name else ""
    try:
        import openai
    except ImportError:  # pragma: no cover - langchain-openai depends on it
        openai = None  # type: ignore[assignment]
    if openai is not None:
        if isinstance(exc, openai.APITimeoutError):
            return TransientError(f"{where}request timed out", type="timeout")
        if isinstance(exc, openai.APIConnectionError):
            return TransientError(f"{where}connection failed: {exc}", type="connection_error")
        if isinstance(exc, openai.RateLimitError):
            retry_after = _retry_after(exc)
            return TransientError(
                f"{where}rate limited (429)", type="rate_limited", retry_after=retry_after
            )
        if isinstance(exc, openai.InternalServerError):
            return TransientError(f"{where}server error ({exc.status_code})", type="server_error")
        if isinstance(exc, openai.AuthenticationError):
            return StageError(
                f"{where}the API key was refused (401): check the variable named by api_key_env",
                type="auth_error",
            )
        if isinstance(exc, openai.APIStatusError):
            return StageError(f"{where}request refused ({exc.status_code}): {exc.message}",
                              type="model_error")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return TransientError(f"{where}{type(exc).__name__}: {exc}", type="connection_error")
    return StageError(f"{where}{type(exc).__name__}: {exc}", type="model_error")


def _retry_after(exc: Any) -> float | None:
    try:
        value = exc.response.headers.get("retry-after")
        return float(value) if value is not None else None
    except (AttributeError, TypeError, ValueError):
        return None
