"""The shipped advanced_summary chain against the OpenAI-wire test server.

Through ``run_chain`` with a registry entry whose ``base_url`` is the test server, and through
``stagecast run advanced_summary --model <entry> --events`` with a models file that names it: the
tokens on the event stream are the server's, usage and cost are on every stage-end and summed on
run-end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from stagecast.engine.loading import find_chain, load_chain
from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.orchestrator import run_chain
from stagecast.engine.providers import ModelRegistry
from tests.providers.conftest import KEY, entry_fields
from tests.providers.openai_server import OpenAIServer, Reply

pytestmark = pytest.mark.anyio

TEXT_TOKENS = ["- The", " plan", " ships", " in", " May", "."]
POLISHED = {
    "title": "Quarterly plan",
    "key_points": ["The plan ships in May.", "Costs fall.", "Risks remain."],
    "summary": "The plan ships in May.",
}
JSON_TOKENS = [json.dumps(POLISHED)[i : i + 9] for i in range(0, len(json.dumps(POLISHED)), 9)]
DOCUMENT = (
    "The plan ships in May. Costs fall by a tenth. Risks remain in hiring.\n\n" * 40
).strip()
PRICES = (2.0, 8.0)  # per million input / output tokens, from entry_fields()


def script(server: OpenAIServer) -> None:
    server.default = Reply(tokens=TEXT_TOKENS, usage=(100, 6))
    server.json_default = Reply(tokens=JSON_TOKENS, usage=(50, 20))


def cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * PRICES[0] + output_tokens * PRICES[1]) / 1e6


def check_events(events: list[dict[str, Any]], server: OpenAIServer) -> None:
    """The same assertions for library events (as dicts) and CLI NDJSON lines."""
    assert events[0]["type"] == "run-start" and events[0]["model"] == "openai:test-model"
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "succeeded"
    llm_calls = len(server.requests)
    sections = events[-1]["outputs"]["sections"]
    assert int(sections) >= 2 and llm_calls == int(sections) + 2  # map items, merge, polish

    tokens: dict[tuple[Any, ...], list[str]] = {}
    for e in events:
        if e["type"] == "token":
            tokens.setdefault(tuple(e["path"]), []).append(e["text"])
    assert tokens[("merge",)] == TEXT_TOKENS
    assert tokens[("polish",)] == JSON_TOKENS
    for i in range(int(sections)):
        assert tokens[("section_summaries", i)] == TEXT_TOKENS

    ends = {tuple(e["path"]): e for e in events if e["type"] == "stage-end"}
    assert ends[("merge",)]["usage"] == {
        "input_tokens": 100,
        "output_tokens": 6,
        "cost": pytest.approx(cost(100, 6)),
        "reported": True,
    }
    assert ends[("polish",)]["usage"] == {
        "input_tokens": 50,
        "output_tokens": 20,
        "cost": pytest.approx(cost(50, 20)),
        "reported": True,
    }
    assert ends[("polish",)]["output"] == POLISHED
    n = int(sections)
    assert ends[("section_summaries",)]["usage"] == {
        "input_tokens": 100 * n,
        "output_tokens": 6 * n,
        "cost": pytest.approx(cost(100, 6) * n),
        "reported": True,
    }
    total_in, total_out = 100 * (n + 1) + 50, 6 * (n + 1) + 20
    assert events[-1]["usage"] == {
        "input_tokens": total_in,
        "output_tokens": total_out,
        "cost": pytest.approx(cost(total_in, total_out)),
        "reported": True,
    }
    assert events[-1]["outputs"]["title"] == POLISHED["title"]

    polish_request = next(r for r in server.requests if "response_format" in r.body)
    assert polish_request.body["response_format"]["type"] == "json_schema"
    assert polish_request.body["stream_options"] == {"include_usage": True}
    assert all(r.body["model"] == "test-model" for r in server.requests)


async def test_advanced_summary_streams_the_servers_tokens(server: OpenAIServer) -> None:
    from stagecast.engine.events import event_to_dict

    script(server)
    entry = ModelEntry.model_validate(entry_fields(base_url=server.base_url))
    models = ModelRegistry(
        ModelsConfig(models={"testsrv": entry}), environ={"STAGECAST_TEST_KEY": KEY}
    )
    chain = load_chain(find_chain("advanced_summary"))
    try:
        with anyio.fail_after(10):
            events = [
                event_to_dict(e)
                async for e in run_chain(
                    chain, {"document": DOCUMENT}, models=models, model="testsrv"
                )
            ]
    finally:
        await models.aclose()
    check_events(events, server)
    assert not any(KEY in json.dumps(e) for e in events)


async def test_stagecast_run_advanced_summary_with_model_entry(
    server: OpenAIServer, tmp_path: Path
) -> None:
    script(server)
    models_file = tmp_path / "models.yaml"
    entry = entry_fields(base_url=server.base_url)
    models_file.write_text(yaml.safe_dump({"default": "testsrv", "models": {"testsrv": entry}}))
    document = tmp_path / "doc.md"
    document.write_text(DOCUMENT)
    env = {**os.environ, "STAGECAST_MODELS": str(models_file), "STAGECAST_TEST_KEY": KEY}
    env.pop("OPENAI_API_KEY", None)
    # A real process, as a user runs it (its own event loop; the server keeps serving here).
    command = [sys.executable, "-c", "from stagecast.api.cli import main; main()"]
    command += ["run", "advanced_summary", "--model", "testsrv", "--events"]
    command += ["-i", f"document=@{document}"]
    with anyio.fail_after(60):
        result = await anyio.run_process(command, env=env, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-2000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    check_events(events, server)
    assert KEY not in stdout and KEY not in stderr
