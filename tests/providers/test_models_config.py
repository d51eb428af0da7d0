"""Model entries, `stagecast models` rows, error classification details, the non-stream path."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest

from stagecast.engine.errors import ModelConfigError, StageError, TransientError
from stagecast.engine.faults import classify_error
from stagecast.engine.model_config import ModelEntry, ModelsConfig, load_models_config
from stagecast.engine.providers import ModelRegistry, describe_models
from stagecast.engine.resources import SHIPPED_CONFIGS
from tests.providers.conftest import KEY
from tests.providers.openai_server import OpenAIServer, Reply

pytestmark = pytest.mark.anyio


def test_shipped_models_file_has_the_builtins_and_local_servers() -> None:
    config = load_models_config(SHIPPED_CONFIGS / "models.yaml")
    assert {"auto", "offline", "demo"} <= set(config.models)
    assert config.default == "auto"
    for name in ("ollama", "vllm", "llamacpp"):
        entry = config.models[name]
        assert entry.provider == "openai" and entry.base_url is not None
        assert entry.base_url.startswith("http://127.0.0.1:") and entry.base_url.endswith("/v1")
        assert entry.key_required is False


def test_stagecast_models_env_names_another_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "models.yaml"
    file.write_text("default: mine\nmodels:\n  mine: {provider: offline}\n")
    monkeypatch.setenv("STAGECAST_MODELS", str(file))
    assert list(load_models_config().models) == ["mine"]


def test_a_missing_key_names_the_entry_and_the_variable_never_a_value() -> None:
    config = ModelsConfig(models={"big": ModelEntry(provider="openai", api_key_env="MY_KEY")})
    with pytest.raises(ModelConfigError, match=r"model 'big' needs an API key: set MY_KEY"):
        ModelRegistry(config, environ={"OTHER": KEY}).resolve("big")


def test_auto_is_openai_with_the_key_and_offline_without() -> None:
    offline = ModelRegistry(environ={}).resolve("auto")
    assert offline.label == "offline"
    online = ModelRegistry(environ={"OPENAI_API_KEY": KEY}).resolve("auto")
    assert online.label == "openai:gpt-4o-mini"
    assert online.entry is not None and online.entry.price_input_per_million == 0.15
    assert online.retries == 2


def test_describe_models_says_what_is_usable_and_never_a_secret() -> None:
    config = ModelsConfig(
        default="remote",
        models={
            "auto": ModelEntry(provider="auto", openai_model="remote"),
            "offline": ModelEntry(provider="offline"),
            "remote": ModelEntry(
                provider="openai",
                model="gpt-x",
                api_key_env="REMOTE_KEY",
                base_url="https://user:pa55@gw.example.test/v1?token=abc",
                price_input_per_million=1.0,
                price_output_per_million=4.0,
            ),
            "local": ModelEntry(
                provider="openai",
                model="llama3.2",
                base_url="http://127.0.0.1:11434/v1",
                api_key_env="OLLAMA_API_KEY",
                key_required=False,
            ),
        },
    )
    rows = {r["name"]: r for r in describe_models(ModelRegistry(config, environ={}))}
    assert rows["remote"] | {"description": None} == {
        "name": "remote",
        "provider": "openai",
        "model": "gpt-x",
        "base_url": "https://gw.example.test/v1",
        "usable": False,
        "why_not": "set REMOTE_KEY",
        "default": True,
        "description": None,
        "price_input_per_million": 1.0,
        "price_output_per_million": 4.0,
    }
    assert (rows["local"]["usable"], rows["local"]["why_not"]) == (True, None)
    assert (rows["auto"]["model"], rows["auto"]["usable"]) == ("offline", True)
    assert rows["offline"]["usable"] is True

    with_key = ModelRegistry(config, environ={"REMOTE_KEY": KEY, "OPENAI_API_KEY": KEY})
    rows = {r["name"]: r for r in describe_models(with_key)}
    assert rows["remote"]["usable"] is True and rows["auto"]["model"] == "gpt-x"
    assert KEY not in repr(rows) and "pa55" not in repr(rows) and "token" not in repr(rows)


def test_cost_uses_both_prices() -> None:
    registry = ModelRegistry(
        ModelsConfig(models={"m": ModelEntry(provider="offline", price_output_per_million=10)})
    )
    assert registry.resolve("m").cost(1000, 2000) == pytest.approx(0.02)
    assert ModelRegistry(environ={}).resolve("offline").cost(1000, 2000) is None


def _rate_limited(headers: dict[str, str]) -> Any:
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    response = httpx2.Response(429, headers=headers, request=request)
    return openai.RateLimitError("rate limited", response=response, body=None)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "http-date in 30 s"}, 30.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], expected: float | None) -> None:
    if headers.get("retry-after") == "http-date in 30 s":  # built now, not at collection
        headers = {"retry-after": email.utils.formatdate(time.time() + 30, usegmt=True)}
    error = classify_error(_rate_limited(headers), "m")
    assert isinstance(error, TransientError) and error.type == "rate_limited"
    if expected is None:
        assert error.retry_after is None
    else:
        assert error.retry_after == pytest.approx(expected, abs=1.5)


def test_a_chunk_timer_timeout_is_transient_and_anything_else_is_permanent() -> None:
    from langchain_openai.chat_models._client_utils import StreamChunkTimeoutError

    error = classify_error(StreamChunkTimeoutError(5.0, model_name="m", chunks_received=2), "m")
    assert isinstance(error, TransientError) and error.type == "timeout"
    other = classify_error(ValueError(f"bad {KEY}"), "m")
    assert type(other) is StageError and KEY not in str(other)
    assert str(other) == "model 'm': ValueError: bad ***"


async def test_the_test_server_answers_non_stream_requests_too() -> None:
    from langchain_openai import ChatOpenAI

    async with OpenAIServer() as server:
        server.script(Reply(tokens=["one", " two"], usage=(3, 2)))
        model = ChatOpenAI(
            model="m", api_key=KEY, base_url=server.base_url, max_retries=0, streaming=False
        )
        try:
            message = await model.ainvoke("hi")
        finally:
            await model.root_async_client.close()
    assert message.content == "one two"
    assert message.usage_metadata is not None
    assert message.usage_metadata["input_tokens"] == 3
    assert server.requests[0].body.get("stream") in (None, False)


def test_errors_name_the_models_file_actually_used(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stagecast.engine.loading import parse_chain_text

    file = tmp_path / "my-models.yaml"
    file.write_text("default: mine\nmodels:\n  mine: {provider: openai, api_key_env: MINE_KEY}\n")
    monkeypatch.setenv("STAGECAST_MODELS", str(file))
    config = load_models_config()
    assert config.source == str(file.resolve())
    registry = ModelRegistry(config, environ={})
    with pytest.raises(ModelConfigError) as caught:
        registry.resolve("mine")
    assert f"(api_key_env of 'mine' in {file.resolve()}; key_required: false" in str(caught.value)
    with pytest.raises(ModelConfigError) as caught:
        registry.resolve("nope")
    assert str(caught.value) == f"unknown model 'nope'; models are: mine (in {file.resolve()})"
    text = "stages:\n  - id: a\n    kind: llm\n    model: mien\n    prompt: hi\n"
    _, problems = parse_chain_text(text, filename="c.yaml", model_names=registry.known_names())
    assert [str(p) for p in problems] == [
        "c.yaml:4:12: stages[a].model: unknown model 'mien'\n"
        f"  hint: did you mean 'mine'? models are: default, mine (in {file.resolve()})"
    ]
    with_key = ModelRegistry(config, environ={"MINE_KEY": KEY}).resolve("mine")
    assert with_key.chat_model.models_file == str(file.resolve())  # named by provider faults
    error = classify_error(RuntimeError("x"), "mine", models_file=str(file))
    assert isinstance(error, StageError)
    monkeypatch.delenv("STAGECAST_MODELS")
    monkeypatch.chdir(tmp_path)  # no ./configs here: the shipped file is the one used
    assert load_models_config().source == str((SHIPPED_CONFIGS / "models.yaml").resolve())


async def test_a_provider_fault_names_the_models_file_of_its_entry(tmp_path: Any) -> None:
    from stagecast.engine.orchestrator import run_chain
    from tests.providers.test_openai_faults import chain_of

    async with OpenAIServer(api_key=KEY, models={"test-model"}) as server:
        file = tmp_path / "models.yaml"
        file.write_text(
            "models:\n  local:\n    provider: openai\n    model: other-model\n"
            f"    base_url: {server.base_url}\n    api_key_env: THE_KEY\n    max_retries: 0\n"
        )
        registry = ModelRegistry(load_models_config(file), environ={"THE_KEY": KEY})
        chain = chain_of("defaults: {model: local}\nstages:\n  - {id: a, kind: llm, prompt: hi}\n")
        try:
            events = [e async for e in run_chain(chain, {}, models=registry)]
        finally:
            await registry.aclose()
    message = events[-1].error.message
    assert f"fix model of 'local' in {file.resolve()}" in message
