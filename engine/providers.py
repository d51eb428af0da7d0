"""Model names -> LangChain chat models: the registry built from configs/models.yaml.

This is the only module of the engine that reads the environment, and only for what the config
names (``api_key_env``, ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``). Where things live:
``model_config`` (the entries of models.yaml), ``openai_model`` (the ChatOpenAI subclass and
JSON-mode set-up), ``faults`` (provider exceptions -> retry or fail). The number of retries of a
stage comes from the stage, then the chain's defaults, then the entry's ``max_retries``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from langchain_core.language_models import BaseChatModel

from stagecast.engine.errors import ModelConfigError
from stagecast.engine.model_config import (
    DEFAULT_OPENAI_RETRIES,
    ModelEntry,
    ModelNames,
    ModelsConfig,
    load_models_config,
)
from stagecast.engine.offline import OfflineChatModel
from stagecast.engine.openai_model import openai_model_class

__all__ = [
    "ModelRegistry",
    "ResolvedModel",
    "describe_models",
]


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

    def known_names(self) -> ModelNames:
        """Every name a chain may use: the entries, plus ``default`` (the configured default);
        ``source`` names the models file."""
        return ModelNames({*self.names(), "default"}, self.config.source)

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
                f"(in {self.config.source})"
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
                    f"(api_key_env of {name!r} in {self.config.source}; key_required: false "
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
            "models_file": self.config.source,
            "json_mode": entry.json_mode,
            "fast_stream": entry.fast_stream,
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
        model = openai_model_class()(**kwargs)
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
