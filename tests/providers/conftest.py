"""Fixtures for the provider tests: a live OpenAI-wire test server and registries pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.providers.openai_server import OpenAIServer

KEY = "sk-test-0123456789abcdefSECRET"
"""The API key the tests configure; no event or message may ever contain it."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(api_key=KEY, models={"test-model"}) as srv:
        yield srv


def entry_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "provider": "openai",
        "model": "test-model",
        "api_key_env": "STAGECAST_TEST_KEY",
        "read_timeout": 5,
        "connect_timeout": 2,
        "max_retries": 0,
        "price_input_per_million": 2.0,
        "price_output_per_million": 8.0,
    }
    fields.update(overrides)
    return fields
