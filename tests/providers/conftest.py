"""Fixtures for the provider tests: a live OpenAI-wire test server and registries pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.providers.openai_server import OpenAIServer

KEY = "sk-test-0123456789abcdefSECRET"
"""The API key the tests configure; no event or message may ever contain it."""

STREAM: dict[str, Any] = {"fast_stream": True, "stream_transport": "wire"}
"""What ``entry_fields`` sets ``fast_stream`` and ``stream_transport`` to: the ``stream_path``
fixture switches them."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def server() -> AsyncIterator[OpenAIServer]:
    async with OpenAIServer(api_key=KEY, models={"test-model"}) as srv:
        yield srv


@pytest.fixture(params=["wire", "sdk", "astream"])
def stream_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test on every path: Stagecast's own stream (engine/openai_stream.py) read by
    its own HTTP client (engine/openai_wire.py, ``wire``) or by the SDK's (``sdk``), and
    ``ChatOpenAI.astream()`` (an entry with ``fast_stream: false``)."""
    STREAM["fast_stream"] = request.param != "astream"
    STREAM["stream_transport"] = "sdk" if request.param == "sdk" else "wire"
    try:
        yield request.param
    finally:
        STREAM["fast_stream"] = True
        STREAM["stream_transport"] = "wire"


def entry_fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "fast_stream": STREAM["fast_stream"],
        "stream_transport": STREAM["stream_transport"],
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
