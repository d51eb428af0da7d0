"""The real ChatOpenAI against the test server: streaming, usage, cost, every fault, cancel.

Each test runs a small chain through ``run_chain`` with a ``ModelRegistry`` whose entry points at
the server, so what is asserted is what a client of the event stream would see. Every test runs
twice (the ``stream_path`` fixture): on Stagecast's own stream and on ``ChatOpenAI.astream()``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
import pytest
import yaml

from stagecast.engine import openai_stream
from stagecast.engine.chain import Chain
from stagecast.engine.events import event_to_json
from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.openai_model import openai_model_class
from stagecast.engine.openai_wire import WireTarget
from stagecast.engine.orchestrator import ChainRun, run_chain
from stagecast.engine.providers import ModelRegistry
from stagecast.engine.spec import ChainSpec
from tests.providers.conftest import KEY, entry_fields
from tests.providers.openai_server import OpenAIServer, Reply, blackhole_port, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("stream_path")]

ONE_STAGE = """
defaults: {model: local}
stages:
  - id: answer
    kind: llm
    prompt: Say hello.
"""


def chain_of(text: str) -> Chain:
    return Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(text)), id="test")


def registry(base_url: str, key: str = KEY, **overrides: Any) -> ModelRegistry:
    entry = ModelEntry.model_validate(entry_fields(base_url=base_url, **overrides))
    config = ModelsConfig(default="local", models={"local": entry})
    return ModelRegistry(config, environ={"STAGECAST_TEST_KEY": key})


async def collect(
    models: ModelRegistry, text: str = ONE_STAGE, limit: float = 10, **options: Any
) -> list[Any]:
    options.setdefault("retry_backoff", 0.0)
    try:
        with anyio.fail_after(limit):
            events = [e async for e in run_chain(chain_of(text), {}, models=models, **options)]
    finally:
        await models.aclose()
    for event in events:  # no secret in any event, whatever happened
        assert KEY not in event_to_json(event)
    return events


def short(events: list[Any]) -> list[str]:
    out = []
    for e in events:
        if e.type == "token":
            out.append(f"token {e.attempt} {e.text!r}")
        elif e.type == "stage-retry":
            out.append(f"retry {e.attempt} {e.error.type}")
        elif e.type in ("stage-end", "run-end"):
            out.append(f"{e.type} {e.status}")
        else:
            out.append(e.type)
    return out


def ended(events: list[Any]) -> Any:
    return next(e for e in events if e.type == "stage-end")


# -- the happy path -------------------------------------------------------------------------


async def test_streams_the_servers_tokens_with_usage_and_cost(server: OpenAIServer) -> None:
    server.script(Reply(tokens=["Hi", " there", ",", " friend"], usage=(30, 4)))
    events = await collect(registry(server.base_url, temperature=0.3, max_tokens=64))
    assert short(events) == [
        "run-start",
        "stage-start",
        "token 1 'Hi'",
        "token 1 ' there'",
        "token 1 ','",
        "token 1 ' friend'",
        "stage-end succeeded",
        "run-end succeeded",
    ]
    assert events[0].model == "openai:test-model"
    end, run_end = events[-2], events[-1]
    assert end.output == "Hi there, friend"
    cost = (30 * 2.0 + 4 * 8.0) / 1e6
    assert (end.usage.input_tokens, end.usage.output_tokens) == (30, 4)
    assert end.usage.cost == pytest.approx(cost)
    assert (run_end.usage.input_tokens, run_end.usage.output_tokens) == (30, 4)
    assert run_end.usage.cost == pytest.approx(cost)
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "test-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"]) == (0.3, 64)
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]
    assert "response_format" not in body


async def test_a_server_that_streams_no_usage_gives_unknown_usage_not_zero(
    server: OpenAIServer,
) -> None:
    server.script(Reply(usage=None))  # like some local servers: no usage chunk even when asked
    events = await collect(registry(server.base_url))
    assert short(events)[-2:] == ["stage-end succeeded", "run-end succeeded"]
    assert server.requests[0].body["stream_options"] == {"include_usage": True}
    for event in events[-2:]:  # the entry has prices: still no $0.0000
        assert json.loads(event_to_json(event))["usage"] == {
            "input_tokens": 0,
            "output_tokens": 0,
            "cost": None,
            "reported": False,
        }


async def test_a_refused_attempt_counts_nothing_and_the_answer_its_usage(
    server: OpenAIServer,
) -> None:
    server.script(Reply(status=503), Reply(usage=(30, 4)))
    events = await collect(registry(server.base_url, max_retries=1))
    assert short(events)[2] == "retry 1 server_error"
    usage = events[-1].usage
    assert (usage.input_tokens, usage.output_tokens) == (30, 4)
    assert usage.cost == pytest.approx((30 * 2.0 + 4 * 8.0) / 1e6)


async def test_openai_base_url_from_the_environment_is_honoured(server: OpenAIServer) -> None:
    entry = ModelEntry.model_validate(entry_fields())  # no base_url
    models = ModelRegistry(
        ModelsConfig(models={"local": entry}),
        environ={"STAGECAST_TEST_KEY": KEY, "OPENAI_BASE_URL": server.base_url},
    )
    events = await collect(models)
    assert ended(events).output == "Hello, world."
    assert len(server.requests) == 1


async def test_a_keyless_local_entry_sends_a_placeholder_key() -> None:
    async with OpenAIServer(models={"llama3.2"}) as local:
        entry = ModelEntry(
            provider="openai",
            model="llama3.2",
            base_url=local.base_url,
            api_key_env="OLLAMA_API_KEY",
            key_required=False,
            fast_stream=entry_fields()["fast_stream"],
            stream_transport=entry_fields()["stream_transport"],
        )
        models = ModelRegistry(ModelsConfig(models={"local": entry}), environ={})
        events = await collect(models)
    assert ended(events).status == "succeeded"
    assert local.requests[0].headers["authorization"] == "Bearer not-needed"


async def test_the_path_under_test_is_the_one_that_streamed(
    server: OpenAIServer, stream_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cls = openai_model_class()
    calls: list[str] = []
    original = cls._astream

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("astream")
        return original(self, *args, **kwargs)

    original_wire = WireTarget.stream

    def counting_wire(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append("wire")
        return original_wire(self, *args, **kwargs)

    original_sdk = openai_stream._read

    def counting_sdk(*args: Any, **kwargs: Any) -> Any:
        calls.append("sdk")
        return original_sdk(*args, **kwargs)

    monkeypatch.setattr(cls, "_astream", counting)
    monkeypatch.setattr(WireTarget, "stream", counting_wire)
    monkeypatch.setattr(openai_stream, "_read", counting_sdk)
    for text in (ONE_STAGE, JSON_STAGE % json.dumps({"type": "object"})):
        server.script(Reply(content='{"a": 1}'))
        events = await collect(registry(server.base_url), text)
        assert ended(events).status == "succeeded"
    assert calls == [stream_path, stream_path]


# -- transient faults: retried, the failed attempt's tokens superseded -----------------------


async def test_connection_refused_is_retried_then_fails_naming_the_entry() -> None:
    events = await collect(registry(f"http://127.0.0.1:{free_port()}/v1", max_retries=1))
    assert short(events) == [
        "run-start",
        "stage-start",
        "retry 1 connection_error",
        "stage-end failed",
        "run-end failed",
    ]
    message = ended(events).error.message
    assert "model 'local'" in message and "cannot connect to http://127.0.0.1:" in message
    assert "base_url of 'local'" in message and "(after 2 attempts)" in message


async def test_connect_timeout_fires_and_names_connect_timeout() -> None:
    async with blackhole_port() as port:
        started = time.monotonic()
        events = await collect(registry(f"http://127.0.0.1:{port}/v1", connect_timeout=0.2))
        elapsed = time.monotonic() - started
    end = ended(events)
    assert (end.status, end.error.type) == ("failed", "timeout")
    assert "timed out connecting" in end.error.message
    assert "connect_timeout of 'local'" in end.error.message
    assert 0.15 < elapsed < 3


async def test_read_timeout_before_the_headers_is_retried(server: OpenAIServer) -> None:
    server.script(Reply(hang_before_headers=True))
    events = await collect(registry(server.base_url, read_timeout=0.2, max_retries=1))
    assert short(events) == [
        "run-start",
        "stage-start",
        "retry 1 timeout",
        "token 2 'Hello'",
        "token 2 ','",
        "token 2 ' world'",
        "token 2 '.'",
        "stage-end succeeded",
        "run-end succeeded",
    ]
    retry = events[2]
    assert "read_timeout of 'local'" in retry.error.message
    assert ended(events).attempt == 2
    await server.wait_disconnect()


async def test_a_stream_stalled_mid_answer_hits_the_read_timeout(server: OpenAIServer) -> None:
    server.script(Reply(stall_after=2))
    events = await collect(registry(server.base_url, read_timeout=0.2, max_retries=1))
    assert short(events) == [
        "run-start",
        "stage-start",
        "token 1 'Hello'",
        "token 1 ','",
        "retry 1 timeout",
        "token 2 'Hello'",
        "token 2 ','",
        "token 2 ' world'",
        "token 2 '.'",
        "stage-end succeeded",
        "run-end succeeded",
    ]
    assert ended(events).output == "Hello, world."  # not "Hello,Hello, world."
    # The abandoned attempt was answering when it stalled and reported no usage: what it used
    # is unknown, so the stage's total is unreported (11/4 are the second attempt's: a floor).
    usage = ended(events).usage
    assert (usage.input_tokens, usage.output_tokens, usage.cost, usage.reported) == (
        11,
        4,
        None,
        False,
    )
    await server.wait_disconnect()  # the stalled response was abandoned, not left open


async def test_a_stream_stalled_mid_answer_hits_the_stage_timeout(server: OpenAIServer) -> None:
    server.script(Reply(stall_after=1))
    text = ONE_STAGE.replace("kind: llm", "kind: llm\n    timeout: 0.3\n    retries: 1")
    events = await collect(registry(server.base_url, read_timeout=30), text)
    assert short(events)[:4] == ["run-start", "stage-start", "token 1 'Hello'", "retry 1 timeout"]
    assert events[3].error.message == "timed out after 0.3 s"
    assert ended(events).status == "succeeded"
    await server.wait_disconnect()


async def test_429_waits_for_retry_after(server: OpenAIServer) -> None:
    server.script(Reply(status=429, headers={"retry-after": "1"}, error_message="slow down"))
    events = await collect(registry(server.base_url, max_retries=1))
    assert short(events)[:3] == ["run-start", "stage-start", "retry 1 rate_limited"]
    assert ended(events).status == "succeeded"
    first, second = (r.at for r in server.requests)
    assert second - first >= 0.95  # backoff is 0 in these tests: only Retry-After waited


async def test_5xx_is_retried_with_backoff(server: OpenAIServer) -> None:
    server.script(Reply(status=503), Reply(status=500))
    events = await collect(registry(server.base_url, max_retries=2), retry_backoff=0.05)
    assert short(events)[:4] == [
        "run-start",
        "stage-start",
        "retry 1 server_error",
        "retry 2 server_error",
    ]
    assert "server error (503)" in events[2].error.message
    assert (ended(events).status, ended(events).attempt) == ("succeeded", 3)
    times = [r.at for r in server.requests]
    assert times[1] - times[0] >= 0.05 * 0.5  # base * jitter in [0.5, 1)
    assert times[2] - times[1] >= 0.1 * 0.5


GATEWAY_PAGE = (
    b"<!DOCTYPE html><html><head><title>x</title><style>body{color:red}</style></head><body>"
    b"<h1>502 Bad Gateway</h1>\n  <p>upstream model server crashed:   CUDA out of memory</p>"
    b"<p>Authorization: Bearer tok_live_9f8e7d6c5b4a</p><p>key sk-proj-abcdefghijklmnop "
    b"and the configured %s</p>" + b"<p>filler line</p>" * 400 + b"</body></html>"
)


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (
            GATEWAY_PAGE % KEY.encode(),
            "text/html",
            "server error (500): the body says: 502 Bad Gateway upstream model server crashed: "
            "CUDA out of memory Authorization: *** key *** and the configured *** "
            "filler line filler line",
        ),
        (
            b"upstream connect error or disconnect/reset before headers. reset reason: overflow",
            "text/plain",
            "server error (503): the body says: upstream connect error or disconnect/reset "
            "before headers. reset reason: overflow",
        ),
        (
            b'{"detail": "model runner crashed", "api_key": "abcdef123456"}',
            "application/json",
            'server error (500): the body says: {"detail": "model runner crashed", '
            '"api_key": "***"}',
        ),
        (b"", "text/plain", "server error (502): the body says: (empty body)"),
    ],
)
async def test_a_5xx_error_quotes_a_bounded_scrubbed_excerpt_of_its_body(
    server: OpenAIServer, body: bytes, content_type: str, says: str
) -> None:
    status = int(says.split("(")[1][:3])
    server.script(Reply(status=status, error_body=body, error_content_type=content_type))
    events = await collect(registry(server.base_url))
    error = ended(events).error
    assert error.type == "server_error"
    assert error.message.startswith("model 'local': " + says)
    assert "Error code" not in error.message
    quoted = error.message.split("the body says: ", 1)[1]
    assert len(quoted) <= 300
    if len(body) > 300:
        assert quoted.endswith("…")
    for secret in (KEY, "tok_live_9f8e7d6c5b4a", "sk-proj-abcdefghijklmnop", "abcdef123456"):
        assert secret not in error.message


async def test_a_long_error_message_is_cut_to_an_excerpt(server: OpenAIServer) -> None:
    server.script(Reply(status=400, error_message="bad value " + "x" * 5000))
    events = await collect(registry(server.base_url))
    message = ended(events).error.message
    assert message.startswith("model 'local': request refused (400): bad value xxx")
    assert message.endswith("x…") and len(message) < 400


async def test_a_malformed_chunk_is_retried(server: OpenAIServer) -> None:
    server.script(Reply(malformed_after=1))
    events = await collect(registry(server.base_url, max_retries=1))
    assert short(events)[:4] == [
        "run-start",
        "stage-start",
        "token 1 'Hello'",
        "retry 1 malformed_chunk",
    ]
    assert "malformed stream chunk" in events[3].error.message
    assert ended(events).output == "Hello, world."


async def test_a_connection_cut_mid_answer_is_retried(server: OpenAIServer) -> None:
    server.script(Reply(cut_after=2))
    events = await collect(registry(server.base_url, max_retries=1))
    assert short(events)[:5] == [
        "run-start",
        "stage-start",
        "token 1 'Hello'",
        "token 1 ','",
        "retry 1 connection_error",
    ]
    assert "dropped mid-answer" in events[4].error.message
    assert ended(events).output == "Hello, world."


async def test_a_stream_ended_cleanly_without_finish_reason_is_retried(
    server: OpenAIServer,
) -> None:
    server.script(Reply(end_after=2))
    events = await collect(registry(server.base_url, max_retries=1))
    assert short(events)[:5] == [
        "run-start",
        "stage-start",
        "token 1 'Hello'",
        "token 1 ','",
        "retry 1 stream_cut",
    ]
    assert ended(events).output == "Hello, world."


async def test_entry_max_retries_bounds_the_attempts(server: OpenAIServer) -> None:
    server.default = Reply(status=502)
    events = await collect(registry(server.base_url, max_retries=2))
    assert [e.attempt for e in events if e.type == "stage-retry"] == [1, 2]
    assert "(after 3 attempts)" in ended(events).error.message
    assert len(server.requests) == 3  # the HTTP client made no retries of its own


async def test_openai_entries_retry_twice_by_default(server: OpenAIServer) -> None:
    server.default = Reply(status=500)
    fields = entry_fields(base_url=server.base_url)
    del fields["max_retries"]
    config = ModelsConfig(models={"local": ModelEntry.model_validate(fields)})
    events = await collect(ModelRegistry(config, environ={"STAGECAST_TEST_KEY": KEY}))
    assert len(server.requests) == 3 and ended(events).status == "failed"


# -- permanent faults: fail at once, name the entry and the fix, never the key ---------------


@pytest.mark.parametrize(
    ("setup", "kind", "says"),
    [
        (
            "bad_key",
            "auth_error",
            "the server refused the API key (401): check the key in the variable named by "
            "api_key_env of 'local' in configs/models.yaml",
        ),
        (
            "bad_request",
            "model_error",
            "request refused (400): temperature is out of range for ***",
        ),
        (
            "unknown_model",
            "model_not_found",
            "the server has no model 'gpt-nope' (404): fix model of 'local' in configs/models.yaml",
        ),
        ("quota", "quota_exceeded", "quota is used up (429 insufficient_quota)"),
    ],
)
async def test_permanent_errors_fail_the_stage_at_once(
    server: OpenAIServer, setup: str, kind: str, says: str
) -> None:
    key, fields = KEY, {}
    if setup == "bad_key":
        key = "sk-wrong-key-0123456789"  # the server echoes it back, like OpenAI does
    elif setup == "bad_request":
        server.script(Reply(status=400, error_message=f"temperature is out of range for {KEY}"))
    elif setup == "unknown_model":
        fields["model"] = "gpt-nope"
    else:
        server.script(Reply(status=429, error_code="insufficient_quota"))
    events = await collect(registry(server.base_url, key=key, max_retries=3, **fields))
    assert short(events) == ["run-start", "stage-start", "stage-end failed", "run-end failed"]
    error = ended(events).error
    assert error.type == kind
    assert error.message.startswith("model 'local': ")
    assert says in error.message
    assert len(server.requests) == 1
    for event in events:
        assert "wrong-key" not in event_to_json(event)


# -- JSON stages ------------------------------------------------------------------------------

JSON_STAGE = """
defaults: {model: local}
stages:
  - id: facts
    kind: llm
    prompt: List two facts.
    output: json
    retries: 1
    schema: %s
"""


async def test_a_json_stage_sends_its_schema_as_response_format(server: OpenAIServer) -> None:
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    server.script(Reply(content='{"a": "one"}'), Reply(content='{"a": 1}'))
    events = await collect(registry(server.base_url), JSON_STAGE % json.dumps(schema))
    assert short(events) == [
        "run-start",
        "stage-start",
        """token 1 '{"a": "one"}'""",
        "retry 1 invalid_json",
        """token 2 '{"a": 1}'""",
        "stage-end succeeded",
        "run-end succeeded",
    ]
    assert ended(events).output == {"a": 1}
    body = server.requests[0].body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": False},
    }
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert "JSON Schema" in body["messages"][0]["content"]
    assert ended(events).usage.input_tokens == 22  # both attempts, each counted once


async def test_an_array_schema_is_wrapped_and_unwrapped(server: OpenAIServer) -> None:
    schema = {"type": "array", "items": {"type": "string"}, "minItems": 2}
    server.script(Reply(tokens=['{"value": ', '["x", ', '"y"]}']))
    events = await collect(registry(server.base_url), JSON_STAGE % json.dumps(schema))
    assert ended(events).output == ["x", "y"]
    sent = server.requests[0].body["response_format"]["json_schema"]["schema"]
    assert sent["type"] == "object" and sent["properties"] == {"value": schema}


@pytest.mark.parametrize(
    ("mode", "expected"), [("json_object", {"type": "json_object"}), ("off", None)]
)
async def test_json_mode_follows_the_entry(
    server: OpenAIServer, mode: str, expected: dict[str, str] | None
) -> None:
    server.script(Reply(content='{"a": 1}'))
    text = JSON_STAGE % json.dumps({"type": "object"})
    events = await collect(registry(server.base_url, json_mode=mode), text)
    assert ended(events).output == {"a": 1}
    assert server.requests[0].body.get("response_format") == expected


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelling_the_run_closes_the_stream_to_the_server(server: OpenAIServer) -> None:
    server.script(Reply(tokens=[f"t{i} " for i in range(200)], delay=0.02))
    events: list[Any] = []
    got_token = asyncio.Event()

    def sink(event: Any) -> None:
        events.append(event)
        if event.type == "token":
            got_token.set()

    run = ChainRun(chain_of(ONE_STAGE), {}, models=registry(server.base_url), sink=sink)
    with anyio.fail_after(5):
        task = asyncio.create_task(run.execute())
        await got_token.wait()
        run.cancel()
        await task
        await server.wait_disconnect(2)
    await run.registry.aclose()
    assert short(events)[-2:] == ["stage-end cancelled", "run-end cancelled"]
    assert server.disconnects == 1 and server.completed == 0
    assert sum(e.type == "token" for e in events) < 50
