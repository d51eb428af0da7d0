"""api/static/stagecast.d.ts: generated from the committed JSON Schemas, current, and strict.

The declarations come from api/schema/run-events.json and api/schema/http-bodies.json through
json-schema-to-typescript (generate.mjs); a small frontend (client.ts) type-checks against them
with ``tsc --noEmit`` and a deliberate type error in it is caught. Outside CI, a machine without
node or the npm packages skips with the reason; with CI=true that is a failure.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from stagecast.api.rest_schema import rest_json_schema_text
from tests.setup_needed import node_with

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DECLARATIONS = ROOT / "api" / "static" / "stagecast.d.ts"
CLIENT_JS = ROOT / "api" / "static" / "stagecast.js"
PACKAGES = ("json-schema-to-typescript", "typescript")


def node_or_skip() -> str:
    return node_with(HERE, PACKAGES)


def tsc(node: str, project: Path, cwd: Path = HERE) -> subprocess.CompletedProcess[str]:
    compiler = HERE / "node_modules" / "typescript" / "bin" / "tsc"
    return subprocess.run(
        [node, str(compiler), "-p", str(project), "--pretty", "false"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_the_committed_http_bodies_schema_is_current() -> None:
    committed = (ROOT / "api" / "schema" / "http-bodies.json").read_text(encoding="utf-8")
    assert committed == rest_json_schema_text(), (
        "api/schema/http-bodies.json is stale: run `stagecast schema --http > "
        "api/schema/http-bodies.json`, then regenerate api/static/stagecast.d.ts"
    )


def test_the_committed_declarations_are_current() -> None:
    node = node_or_skip()
    result = subprocess.run(
        [node, str(HERE / "generate.mjs")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == DECLARATIONS.read_text(encoding="utf-8"), (
        "api/static/stagecast.d.ts is stale: run "
        "`node tests/typescript/generate.mjs > api/static/stagecast.d.ts` and review the change"
    )


def test_every_event_and_every_export_of_stagecast_js_is_declared() -> None:
    declared = DECLARATIONS.read_text(encoding="utf-8")
    events = json.loads((ROOT / "api" / "schema" / "run-events.json").read_text("utf-8"))
    for name in events["discriminator"]["mapping"].values():
        assert f"export interface {name.rsplit('/', 1)[1]} {{" in declared, name
    exports = re.findall(
        r"^export (?:async function|function|class|const) (\w+)", CLIENT_JS.read_text("utf-8"), re.M
    )
    assert "followRun" in exports and "startReplay" in exports
    for name in exports:
        assert re.search(rf"^export declare (?:function|class|const) {name}\b", declared, re.M), (
            f"stagecast.js exports {name}, which tests/typescript/client-api.d.ts does not declare"
        )


def test_a_frontend_and_stagecast_js_type_check_against_the_declarations() -> None:
    node = node_or_skip()
    for project in ("tsconfig.json", "tsconfig.js.json"):
        result = tsc(node, HERE / project)
        assert (result.returncode, result.stdout) == (0, ""), project


MISTAKES = [
    # a stage-end has no text: only tokens do
    (
        "return `${event.stage} ${event.status}",
        "return `${event.text} ${event.status}",
        "error TS2339: Property 'text' does not exist on type 'StageEnded'.",
    ),
    # a per-type handler gets its own event type
    (
        "source: (e) => sources.push(e),",
        "source: (e) => sources.push(e.source),",
        "error TS2345: Argument of type 'Source' is not assignable to parameter of type "
        "'SourceFound'.",
    ),
    # a status the protocol does not have
    (
        "return `${event.status} ${event.usage.output_tokens} tokens`;",
        'return event.status === "done" ? "" : "";',
        # (the union's members in the order tsc prints them; the run-end status is exactly these)
        "error TS2367: This comparison appears to be unintentional because the types "
        '\'"failed" | "succeeded" | "cancelled"\' and \'"done"\' have no overlap.',
    ),
    # a body field that does not exist
    (
        'const body: RunRequest = { chain, inputs: { document }, model: "offline" };',
        'const body: RunRequest = { chain, inputs: { document }, modle: "offline" };',
        "error TS2561: Object literal may only specify known properties, but 'modle' does not "
        "exist in type 'RunRequest'. Did you mean to write 'model'?",
    ),
]


@pytest.mark.parametrize(("old", "new", "expected"), MISTAKES, ids=lambda v: str(v)[:30])
def test_a_deliberate_type_error_is_caught(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    node = node_or_skip()
    source = (HERE / "client.ts").read_text(encoding="utf-8")
    assert source.count(old) == 1, old
    line = source[: source.index(old)].count("\n") + 1
    broken = tmp_path / "client.ts"
    broken.write_text(
        source.replace(old, new).replace('"../../api/static/stagecast.js"', f'"{CLIENT_JS}"'),
        encoding="utf-8",
    )
    config = {"extends": str(HERE / "tsconfig.json"), "files": [str(broken)]}
    (tmp_path / "tsconfig.json").write_text(json.dumps(config), encoding="utf-8")
    result = tsc(node, tmp_path / "tsconfig.json", cwd=tmp_path)
    assert result.returncode == 2
    errors = [e for e in result.stdout.splitlines() if not e.startswith(" ")]  # no details
    assert len(errors) == 1, result.stdout
    assert errors[0].startswith(f"client.ts({line},")
    assert errors[0].endswith(expected)
