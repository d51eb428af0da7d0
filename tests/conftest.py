"""Shared fixtures: anyio on asyncio, and no real model calls unless a test sets them up."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_real_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    # `auto` must mean the offline model in every test, whatever the developer's shell holds.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("STAGECAST_MODELS", raising=False)
