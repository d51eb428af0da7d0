"""Fixtures for the provider tests: a live OpenAI-wire test server and registries pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.providers.openai_server import OpenAIServer

KEY = "sk-test-0123456789abcdefSECRET"
"""The API key the tests configure; no event or message may ever contain it."""

STREAM = {"fast_stream": True}
"""What ``entry_fields`` sets ``fast_stream`` to: the ``stream_path`` fixture switches it."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(api_key=KEY, models={"test-model"}) as srv:
        yield srv


@pytest.fixture(params=["fast", "astream"])
def stream_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on both paths: Stagecast's own stream (engine/openai_stream.py) and
    ``ChatOpenAI.astream()`` (an entry with ``fast_stream: false``)."""
    STREAM["fast_stream"] = request.param == "fast"
    try:
        yield request.param
    finally:
        STREAM["fast_stream"] = True


def entry_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "fast_stream": STREAM["fast_stream"],
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
