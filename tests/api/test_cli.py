"""The ``stagecast`` CLI through a real subprocess: exit codes, exact lines, NDJSON on the wire."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from stagecast.api.live import LiveView
from stagecast.engine.events import (
    RunEnded,
    RunEvent,
    event_from_json,
    event_to_json,
    events_json_schema,
)
from stagecast.engine.loading import load_chain
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.resources import SHIPPED_CHAINS

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "cli_chains"
TINY = str(FIXTURES / "tiny.yaml")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stagecast.api.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env or _env(),
    )


def parse_stream(stdout: str) -> list[RunEvent]:
    lines = stdout.splitlines()
    events = [event_from_json(line) for line in lines]
    assert [event_to_json(e) for e in events] == lines  # exactly the wire JSON, nothing else
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "run-start"
    assert [e.type for e in events].count("run-end") == 1
    assert events[-1].type == "run-end"
    return events


# -- validate -----------------------------------------------------------------------------------


def test_validate_ok() -> None:
    result = cli("validate", TINY, str(FIXTURES / "slow.yaml"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{TINY}: ok", f"{FIXTURES / 'slow.yaml'}: ok"]


def test_validate_reports_every_problem_with_its_place() -> None:
    broken = FIXTURES / "broken.yaml"
    result = cli("validate", TINY, str(broken))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{TINY}: ok",
        f"{broken}:3:5: stages[first]: missing required key 'prompt'",
        f"{broken}:5:5: stages[first].promt: unknown key",
        "  hint: did you mean 'prompt'?",
        f"{broken}:8:15: stages[second].text: no stage 'frist'; stages are: first, second",
        "  hint: did you mean 'first'?",
    ]
    assert result.stderr == "3 problems in 1 file\n"


def test_run_of_an_invalid_chain_prints_problems_and_exits_1() -> None:
    result = cli("run", str(FIXTURES / "broken.yaml"), "--events")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "broken.yaml:5:5: stages[first].promt: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


# -- run --events -------------------------------------------------------------------------------


def test_run_events_is_a_valid_v1_stream() -> None:
    result = cli("run", TINY, "-i", "topic=rivers", "--events")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    events = parse_stream(result.stdout)
    start, end = events[0], events[-1]
    assert start.type == "run-start" and start.model == "offline"
    assert [s.stage for s in start.plan] == ["outline", "points", "expand", "bonus", "final"]
    assert isinstance(end, RunEnded) and end.status == "succeeded"
    assert set(end.outputs) == {"text", "points"}
    ends = {e.stage: e.status for e in events if e.type == "stage-end" and len(e.path or []) == 1}
    assert ends == {
        "outline": "succeeded",
        "points": "succeeded",
        "expand": "succeeded",
        "bonus": "skipped",
        "final": "succeeded",
    }
    assert [(e.completed, e.total) for e in events if e.type == "stage-progress"] == [
        (1, 2),
        (2, 2),
    ]


def test_a_failing_chain_exits_1_with_run_end_failed() -> None:
    result = cli("run", str(FIXTURES / "fails.yaml"), "--events")
    assert result.returncode == 1
    end = parse_stream(result.stdout)[-1]
    assert isinstance(end, RunEnded) and end.status == "failed"
    assert end.error is not None and end.error.stage == "boom"
    message = "template error: 'dict object' has no attribute 'missing'"
    assert end.error.message == message
    assert result.stderr == f"error: run failed: boom: {message}\n"


# -- inputs and usage errors --------------------------------------------------------------------


def test_bad_inputs_name_each_field_and_exit_2() -> None:
    result = cli("run", TINY, "-i", "count=zero", "-i", "colour=red", "--events")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: inputs.colour: unknown input (inputs are: topic, count, extra)",
        "error: inputs.topic: required (What to write about)",
        "error: inputs.count: expected integer, got string",
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-i", "topic=@no/such/file.txt"], "error: -i topic: no/such/file.txt: no such file"),
        (["-i", "topic"], "error: -i 'topic': expected key=value or key=@file"),
        (["--inputs", "BAD_JSON"], "error: BAD_JSON:3:3: invalid JSON: Expecting ',' delimiter"),
    ],
)
def test_input_files_and_flags_are_checked(args: list[str], expected: str, tmp_path: Path) -> None:
    bad = tmp_path / "inputs.json"
    bad.write_text('{\n  "topic": "x"\n  "count": 2\n}\n')
    args = [str(bad) if a == "BAD_JSON" else a for a in args]
    result = cli("run", TINY, *args)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [expected.replace("BAD_JSON", str(bad))]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"topic": 5, "count": "2"}', ["error: inputs.topic: expected string, got integer"]),
        ('{"topic": "x", "count": 1e400}', ["error: inputs.count: expected integer, got number"]),
        ('{"topic": "x", "count": 10000000000000000000000}', ["error: inputs.count: must be <= 5"]),
        (
            '{"topic": "\\ud800", "count": true}',
            ["error: inputs.count: expected integer, got boolean"],
        ),
        ('{"topic": {"a": [1]}}', ["error: inputs.topic: expected string, got object"]),
        ('{"topic": "x", "extra": "maybe"}', ["error: inputs.extra: expected boolean, got string"]),
        ("[1, 2]", ["error: FILE: expected a JSON object of inputs, got list"]),
        ("[" * 100_000, ["error: FILE: the JSON is nested too deeply"]),
        (
            '{"topic": ' + '{"k": ' * 200 + "1" + "}" * 200 + "}",
            ["error: inputs.topic: nested more than 64 levels deep"],
        ),
        (
            "\ufeff{}",
            ["error: FILE:1:1: invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig)"],
        ),
    ],
)
def test_fuzzed_input_files_exit_2_with_one_line_each(
    content: str, expected: list[str], tmp_path: Path
) -> None:
    file = tmp_path / "inputs.json"
    file.write_text(content, encoding="utf-8")
    result = cli("run", TINY, "--inputs", str(file), "--events")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line.replace("FILE", str(file)) for line in expected]


def test_huge_unicode_and_binary_inputs_are_handled(tmp_path: Path) -> None:
    huge = tmp_path / "huge.txt"
    huge.write_text("ü" * 300_000 + " 한국어 " * 1000, encoding="utf-8")
    result = cli("dry-run", TINY, "-i", f"topic=@{huge}", "--events")
    assert result.returncode == 0, result.stderr[-2000:]
    assert parse_stream(result.stdout)[-1].status == "succeeded"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    result = cli("run", TINY, "-i", f"topic=@{binary}")
    assert (result.returncode, result.stderr) == (2, f"error: -i topic: {binary}: not UTF-8 text\n")


def test_inputs_from_files(tmp_path: Path) -> None:
    (tmp_path / "topic.txt").write_text("glaciers and fjords")
    (tmp_path / "inputs.json").write_text('{"topic": "ignored", "count": 3}')
    result = cli(
        "dry-run",
        TINY,
        "--inputs",
        str(tmp_path / "inputs.json"),
        "-i",
        f"topic=@{tmp_path / 'topic.txt'}",
        "--events",
    )
    assert result.returncode == 0, result.stderr
    parse_stream(result.stdout)
    assert "Outline 3 points about glaciers and fjords." in result.stderr


def test_unknown_chain_and_unknown_model_exit_2() -> None:
    result = cli("run", "no_such_chain", "--events")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: no chain 'no_such_chain'; chains are: ")
    result = cli("run", TINY, "-i", "topic=x", "--model", "nope", "--events")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown model 'nope'; models are: ")
    assert "Traceback" not in result.stderr


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_ctrl_c_cancels_cleanly_and_exits_130() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stagecast.api.cli", "run", str(FIXTURES / "slow.yaml"), "--events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_env(),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the stream ended before any token"
            lines.append(line.rstrip("\n"))
            if json.loads(line)["type"] == "token":
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    events = parse_stream("\n".join(lines) + "\n" + out)
    end = events[-1]
    assert isinstance(end, RunEnded) and end.status == "cancelled"
    stage_ends = [e for e in events if e.type == "stage-end"]
    assert [(e.stage, e.status) for e in stage_ends] == [("write", "cancelled")]
    assert "Traceback" not in err


# -- dry-run, graph, list, schema, models ----------------------------------------


def test_dry_run_prints_rendered_prompts_and_a_plain_log() -> None:
    result = cli("dry-run", TINY, "-i", "topic=rivers")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("run run_")
    assert out.splitlines()[0].endswith(" · Tiny chain · model: offline")
    assert (
        "--- prompt: outline ---\n[system]\nYou plan short essays.\n[user]\n"
        "Outline 2 points about rivers.\n---\n"
    ) in out
    assert "--- prompt: expand[0] ---\n[user]\nExpand point 0: " in out
    assert "--- prompt: expand[1] ---\n[user]\nExpand point 1: " in out
    lines = out.splitlines()
    assert any(line.endswith("skipped   bonus") for line in lines)
    assert any(line.endswith("progress  expand  2/2") for line in lines)
    tail = out[out.index("run succeeded in ") :].splitlines()
    assert tail[1] == "usage: 46 in / 44 out tokens"
    assert tail[2:6] == ["model: offline", "", "outputs:", "== text =="]
    assert tail[6].startswith("- [offline ")
    assert "== points ==" in tail


def test_graph_is_mermaid_with_every_stage() -> None:
    result = cli("graph", TINY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "flowchart TD",
        '    outline["Writing an outline<br/><small>llm · outline</small>"]',
        '    points["Listing points<br/><small>llm · points</small>"]',
        '    expand[["Expanding points<br/><small>map × llm · expand</small>"]]',
        '    bonus("Bonus<br/><small>template · bonus</small><br/><i>when: inputs.extra</i>")',
        '    final("Joining<br/><small>template · final</small>")',
        "    outline --> points",
        "    points --> expand",
        "    expand --> final",
        '    outputs__(["outputs<br/><small>text, points</small>"])',
        "    points --> outputs__",
        "    final --> outputs__",
        "    classDef conditional stroke-dasharray: 5 5",
        "    class bonus conditional",
    ]


def test_list_shows_every_shipped_chain() -> None:
    result = cli("list")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    shipped = sorted(p for p in SHIPPED_CHAINS.glob("*.yaml"))
    assert len(rows) == len(shipped)
    for row, path in zip(rows, shipped, strict=True):
        chain = load_chain(path)
        assert row.split()[0] == chain.id
        assert chain.title in row
        for name in chain.spec.inputs:
            assert f"{name} (" in row


def test_schema_prints_the_committed_chain_and_event_schemas() -> None:
    # the fix the staleness tests suggest (`stagecast schema [--events] > FILE`) must make them pass
    chain_schema = cli("schema")
    assert chain_schema.returncode == 0
    assert chain_schema.stdout == (SHIPPED_CHAINS / "chain.schema.json").read_text("utf-8")
    assert "stages" in json.loads(chain_schema.stdout)["properties"]
    result = cli("schema", "--events")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "api" / "schema" / "run-events.json").read_text("utf-8")
    assert json.loads(result.stdout) == events_json_schema()


def test_models_says_which_are_usable_and_never_prints_a_secret() -> None:
    secret = "sk-test-do-not-print-1234"
    result = cli("models", env=_env(OPENAI_API_KEY=secret))
    assert result.returncode == 0, result.stderr
    assert secret not in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["auto"][1:6] == ["(default)", "auto", "→", "openai:gpt-4o-mini", "yes"]
    assert rows["offline"][1:3] == ["offline", "yes"]
    assert rows["demo"][1:4] == ["offline", "(25", "ms/token)"]
    result = cli("models")
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()}
    assert rows["auto"][1:6] == ["(default)", "auto", "→", "offline", "yes"]
    assert rows["gpt-4o-mini"][2:5] == ["no:", "set", "OPENAI_API_KEY"]


def test_console_script_shows_help() -> None:
    # the README's commands install the package first, so the script must be there
    assert shutil.which("stagecast"), "the stagecast console script is not installed"
    result = subprocess.run(
        ["stagecast", "--help"], capture_output=True, text=True, timeout=60, env=_env()
    )
    assert result.returncode == 0
    for command in (
        "validate",
        "run",
        "dry-run",
        "graph",
        "list",
        "schema",
        "models",
        "serve",
        "worker",
    ):
        assert command in result.stdout


# -- the live view (in process: rich on a fake terminal) ------------------------------


async def _live_run(path: str, inputs: dict[str, Any]) -> tuple[RunEnded, str, list[str]]:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=400, color_system=None)
    view = LiveView(console)
    chain = load_chain(path)
    frames: list[str] = []

    def sink(event: Any) -> None:
        view.handle(event)
        if event.type in ("stage-progress", "stage-retry"):
            frame = io.StringIO()
            Console(file=frame, force_terminal=True, width=400, color_system=None).print(
                view.render()
            )
            frames.append(frame.getvalue())

    run = ChainRun(chain, inputs, model="offline", sink=sink, retry_backoff=0)
    view.start()
    with anyio.fail_after(10):
        end = await run.execute()
    view.finish(end)
    return end, out.getvalue(), frames


@pytest.mark.anyio
async def test_live_view_shows_stages_bars_and_outputs() -> None:
    end, text, frames = await _live_run(TINY, {"topic": "rivers"})
    assert end.status == "succeeded"
    frame = next(f for f in frames if "2/2" in f)
    assert "Expanding points" in frame and "━" in frame
    for label in ("Writing an outline", "Listing points", "Expanding points", "Bonus", "Joining"):
        assert label in text
    assert "✓ succeeded in " in text
    assert "usage: 46 in / 44 out tokens · model: offline" in text


@pytest.mark.anyio
async def test_live_view_shows_retries_and_the_failure() -> None:
    end, text, frames = await _live_run(str(FIXTURES / "retry_fails.yaml"), {})
    assert end.status == "failed"
    problem = (
        "the JSON answer does not match the schema at (top): "
        "'(offline value) postal code give' does not match '^[0-9]{5}$'"
    )
    assert f"↻ code: attempt 1 failed (invalid_json: {problem}); trying again" in text
    assert "attempt 2 · attempt 1 failed (invalid_json" in frames[0]
    assert "✗ failed in " in text
    assert f"code: {problem} (after 2 attempts)" in text


def test_plain_log_shows_retries_and_a_failed_run() -> None:
    result = cli("run", str(FIXTURES / "retry_fails.yaml"))
    assert result.returncode == 1
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert lines[0].endswith(" · A schema the offline model cannot satisfy · model: offline")
    assert lines[1].endswith("start     code  A postal code (llm)")
    assert lines[2].endswith(
        "retry     code  attempt 1 failed (invalid_json: the JSON answer does not match the "
        "schema at (top): '(offline value) postal code give' does not match '^[0-9]{5}$'); "
        "trying again"
    )
    assert " failed    code in " in lines[3] and lines[3].endswith("(after 2 attempts)")
    assert lines[4].startswith("run failed in ")
    assert lines[5:] == ["usage: 8 in / 10 out tokens", "model: offline"]
    assert result.stderr.startswith("error: run failed: code: the JSON answer does not match")


# -- run --server (a real `stagecast serve` on a free port) -------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_run_against_a_server(tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stagecast.api.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        document = tmp_path / "doc.md"
        document.write_text("Rivers carve valleys. Glaciers carve fjords.\n\nDeserts are dry.")
        result = cli(
            "run", "advanced_summary", "-i", f"document=@{document}", "--server", url, "--events"
        )
        assert result.returncode == 0, result.stderr
        events = parse_stream(result.stdout)
        end = events[-1]
        assert isinstance(end, RunEnded) and end.status == "succeeded"
        result = cli("run", "advanced_summary", "--server", url, "--events")
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr.startswith("error: inputs.document: required")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- retrieval: `stagecast index`, sources and citations in the views --------------------------


def test_index_builds_then_reuses_and_names_a_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    shutil.copytree(
        SHIPPED_CHAINS / "collections" / "docs_qa",
        folder,
        ignore=shutil.ignore_patterns(".stagecast-index"),
    )
    (folder / "broken.pdf").write_bytes(b"not a pdf")
    built = cli("index", str(folder))
    assert built.returncode == 0, built.stderr
    line = built.stdout.strip()
    assert line.startswith(f"{folder}: 30 passages from 11 files in ")
    assert line.endswith(f" s (built; {folder / '.stagecast-index'})")
    assert f"warning: {folder / 'broken.pdf'}: skipped: not a readable PDF" in built.stderr
    again = cli("index", str(folder))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().endswith(f" s (up to date; {folder / '.stagecast-index'})")
    missing = cli("index", str(tmp_path / "nope"))
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder"


def test_plain_view_lists_sources_and_citations_of_docs_qa() -> None:
    ran = cli("run", "docs_qa", "-i", "question=Is water damage covered by the warranty?")
    assert ran.returncode == 0, ran.stderr
    lines = [line.split("s  ", 1)[-1] for line in ran.stdout.splitlines()]
    assert "source    search  [1] warranty: What the warranty does not cover (score " in "\n".join(
        lines
    )
    sources = [line for line in lines if line.startswith("source ")]
    assert len(sources) == 4 and sources[1].startswith("source    search  [2] warranty: Warranty")
    assert sources[0].endswith(" · warranty.docx#2")
    answer = next(line for line in lines if line.startswith("succeeded answer"))
    assert answer.endswith(" · cites [1] [2]")


@pytest.mark.anyio
async def test_live_view_lists_sources_per_stage_and_the_citations() -> None:
    path = str(SHIPPED_CHAINS / "docs_qa.yaml")
    end, text, _ = await _live_run(path, {"question": "카카오톡 상담이 되나요?"})
    assert end.status == "succeeded"
    assert "sources · Searching the documents" in text
    assert "[1] support (고객센터, row 3): 카카오톡으로도 상담할 수 있나요? (score " in text
    assert "cites [1]" in text


def test_version_prints_package_protocol_and_api_versions() -> None:
    from importlib.metadata import version

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"stagecast {version('stagecast')} (event protocol v1, HTTP API 1.3)\n"


# -- usage the provider did not report ------------------------------------------------------

SILENT_CHAIN = """
id: silent
defaults: {model: silent}
stages:
  - id: answer
    kind: llm
    label: Answering
    prompt: Say hi.
"""


async def _views_of_a_run_without_usage() -> tuple[str, str]:
    import yaml
    from rich.console import Console

    from stagecast.api.live import PlainView
    from stagecast.engine.chain import Chain
    from stagecast.engine.spec import ChainSpec
    from tests.fakes import ScriptedChatModel

    chain = Chain.from_spec(ChainSpec.model_validate(yaml.safe_load(SILENT_CHAIN)), id="silent")
    plain_out, live_out = io.StringIO(), io.StringIO()
    plain = PlainView(plain_out)
    live = LiveView(Console(file=live_out, force_terminal=True, width=200, color_system=None))
    model = ScriptedChatModel(scripts=[["hi"]])  # streams no usage

    def sink(event: Any) -> None:
        plain.handle(event)
        live.handle(event)

    run = ChainRun(chain, {}, models={"silent": model}, sink=sink, retry_backoff=0)
    live.start()
    with anyio.fail_after(5):
        end = await run.execute()
    plain.finish(end)
    live.finish(end)
    return plain_out.getvalue(), live_out.getvalue()


@pytest.mark.anyio
async def test_the_views_say_usage_unknown_not_zero_tokens_and_no_cost() -> None:
    plain, live = await _views_of_a_run_without_usage()
    lines = [line.strip() for line in plain.splitlines()]
    ended = next(line for line in lines if " succeeded answer in " in line)
    assert ended.endswith(" ms · usage unknown (the provider reported none)")
    assert "usage unknown (the provider reported none)" in lines
    for text in (plain, live):
        assert "0 in / 0 out" not in text and "$0.0000" not in text
    assert "· usage unknown (the provider reported none) · model: silent" in live
    assert "tokens unknown" in live


def test_usage_line_names_each_unknown_count_and_the_unknown_cost() -> None:
    from stagecast.api.live import usage_line, usage_summary
    from stagecast.engine.events import Usage

    assert usage_line(Usage(input_tokens=46, output_tokens=44)) == "46 in / 44 out tokens"
    assert usage_line(Usage(input_tokens=3, output_tokens=1, cost=0.5)) == (
        "3 in / 1 out tokens · $0.5000"
    )
    assert usage_line(Usage(input_tokens=0, output_tokens=12, reported=False)) == (
        "0 in / 12 out tokens and more not reported · cost unknown"
    )
    assert usage_line(Usage(reported=False)) == "usage unknown (the provider reported none)"
    assert usage_summary(Usage(reported=False)) == "usage unknown (the provider reported none)"
    assert usage_summary(Usage(input_tokens=2, output_tokens=1)) == "usage: 2 in / 1 out tokens"


def test_serve_chains_from_another_folder_and_run_a_file_path_on_it(tmp_path: Path) -> None:
    import httpx

    folder = tmp_path / "team_chains"
    folder.mkdir()
    chain_text = (
        "title: Greeting\ninputs:\n  who: {type: string}\nstages:\n"
        '  - id: greet\n    kind: template\n    text: "hello {{ inputs.who }}"\n'
    )
    (folder / "greeting.yaml").write_text(chain_text)
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(chain_text)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "stagecast.api.cli", "serve", "--port", str(port)]
        + ["--chains", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.1)
        listed = httpx.get(f"{url}/v1/chains", timeout=5).json()["chains"]
        assert [c["id"] for c in listed] == ["greeting"]  # that folder only
        result = cli("run", str(folder / "greeting.yaml"), "-i", "who=ana", "--server", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip().endswith("== output ==\nhello ana")
        assert result.stderr == (
            f"note: {url} runs its own chain 'greeting' (by id); the file "
            f"{folder / 'greeting.yaml'} is not sent\n"
        )
        result = cli("run", str(elsewhere), "-i", "who=ana", "--server", url)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        assert lines[1] == (
            f"error: {url}: the server has no chain 'elsewhere' (no chain 'elsewhere'; "
            "chains are: greeting)"
        )
        assert lines[2].startswith("  hint: --server runs a chain of the server's chains ")
        assert f"`stagecast serve --chains {tmp_path}`" in lines[2]
        assert "Traceback" not in result.stderr
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, err = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
    assert err.startswith(f"serving the chains in {folder}\n")


def test_serve_names_a_missing_chains_folder_or_models_file(tmp_path: Path) -> None:
    result = cli("serve", "--chains", str(tmp_path / "nope"))
    assert (result.returncode, result.stderr) == (
        2,
        f"error: --chains {tmp_path / 'nope'}: no such folder\n",
    )
    result = cli("serve", "--models", str(tmp_path / "m.yaml"))
    assert (result.returncode, result.stderr) == (
        2,
        f"error: --models {tmp_path / 'm.yaml'}: no such file\n",
    )
