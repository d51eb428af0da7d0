"""configs/models.yaml: the named model entries, read and checked once per file version."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from stagecast.engine.errors import ModelConfigError
from stagecast.engine.resources import config_file

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_OPENAI_RETRIES",
    "MODELS_FILE_ENV",
    "JsonMode",
    "ModelEntry",
    "ModelNames",
    "ModelsConfig",
    "load_models_config",
]

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
    fast_stream: bool = Field(
        True,
        description="openai: Stagecast reads the chat completion stream itself (the same "
        "tokens, usage and errors, a fraction of the CPU); false: through ChatOpenAI.astream().",
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
    _source: str | None = PrivateAttr(None)

    @property
    def source(self) -> str:
        """Where these entries come from, for messages: the file's path as read, the built-ins,
        or ``configs/models.yaml`` for a config built in Python."""
        return self._source or "configs/models.yaml"


class ModelNames(frozenset[str]):
    """The model names a chain may use, and the models file they come from (``source``), so
    an unknown-model problem can say which file it looked in."""

    source: str | None

    def __new__(cls, names: Iterable[str], source: str | None = None) -> ModelNames:
        made = super().__new__(cls, names)
        made.source = source
        return made


BUILTIN_MODELS = ModelsConfig(
    models={
        "auto": ModelEntry(provider="auto", openai_model="gpt-4o-mini"),
        "offline": ModelEntry(provider="offline"),
        "demo": ModelEntry(provider="offline", delay_ms=25),
        "gpt-4o-mini": ModelEntry(provider="openai", model="gpt-4o-mini"),
    }
)
BUILTIN_MODELS._source = "the built-in models (no configs/models.yaml found)"


MODELS_FILE_ENV = "STAGECAST_MODELS"
"""A variable naming another models.yaml to use instead of configs/models.yaml."""


def load_models_config(path: Path | None = None) -> ModelsConfig:
    """Read ``path``, else $STAGECAST_MODELS, else configs/models.yaml (else built-in entries)."""
    if path is None and os.environ.get(MODELS_FILE_ENV):
        path = Path(os.environ[MODELS_FILE_ENV])
    file = path or config_file("models.yaml")
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
        config = ModelsConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{file}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ModelConfigError(f"{file}: {problems}") from None
    config._source = str(file)
    return config
