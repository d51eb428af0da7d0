"""The wire format of events: exact JSON, the committed schema, the engine/web boundary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from stagecast.engine.events import (
    ErrorInfo,
    RunEnded,
    StageEnded,
    Token,
    Usage,
    event_from_json,
    event_to_json,
    events_json_schema,
    events_json_schema_text,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "api" / "schema" / "run-events.json"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (
            Token(
                run_id="r1",
                seq=5,
                ts=1700,
                stage="draft",
                path=["draft"],
                attempt=1,
                text='a "b"\n',
            ),
            '{"v":1,"type":"token","run_id":"r1","seq":5,"ts":1700,"stage":"draft",'
            '"path":["draft"],"attempt":1,"text":"a \\"b\\"\\n"}',
        ),
        (
            Token(run_id="r1", seq=6, ts=1, stage="m", path=["m", 3], attempt=2, text="한국어"),
            '{"v":1,"type":"token","run_id":"r1","seq":6,"ts":1,"stage":"m","path":["m",3],'
            '"attempt":2,"text":"한국어"}',
        ),
        (
            RunEnded(
                run_id="r1",
                seq=9,
                ts=2,
                status="failed",
                error=ErrorInfo(type="timeout", message="slow", stage="x"),
            ),
            '{"v":1,"type":"run-end","run_id":"r1","seq":9,"ts":2,"stage":null,"path":null,'
            '"attempt":null,"status":"failed","outputs":null,"usage":{"input_tokens":0,'
            '"output_tokens":0,"cost":null,"reported":true},"duration_ms":0,"error":{"type":"timeout",'
            '"message":"slow","stage":"x"}}',
        ),
    ],
)
def test_event_json_is_exact(event: object, expected: str) -> None:
    assert event_to_json(event) == expected  # type: ignore[arg-type]
    assert event_from_json(expected) == event


def test_every_field_is_present_even_when_null() -> None:
    end = StageEnded(run_id="r", seq=2, ts=3, stage="s", path=["s"], attempt=1, status="skipped")
    data = json.loads(event_to_json(end))
    assert list(data) == [
        "v",
        "type",
        "run_id",
        "seq",
        "ts",
        "stage",
        "path",
        "attempt",
        "status",
        "output",
        "usage",
        "duration_ms",
        "error",
        "progress",
        "citations",
        "reused",
        "fingerprint",
    ]
    assert data["citations"] is None
    assert data["reused"] is False and data["fingerprint"] is None
    assert data["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost": None, "reported": True}


def test_committed_event_schema_is_current() -> None:
    expected = json.dumps(events_json_schema(), indent=2, ensure_ascii=False) + "\n"
    assert events_json_schema_text() == expected
    assert SCHEMA_FILE.read_text(encoding="utf-8") == expected, (
        "api/schema/run-events.json is stale: run `stagecast schema --events > "
        "api/schema/run-events.json` and review the wire change"
    )


def test_schema_accepts_real_events_and_rejects_missing_fields() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    token = json.loads(
        event_to_json(Token(run_id="r", seq=1, ts=1, stage="a", path=["a"], attempt=1, text="x"))
    )
    validator.validate(token)
    del token["attempt"]
    assert not validator.is_valid(token)
    token_only = jsonschema.Draft202012Validator(
        {"$ref": "#/$defs/Token", "$defs": schema["$defs"]}
    )
    error = jsonschema.exceptions.best_match(token_only.iter_errors(token))
    assert error is not None and error.message == "'attempt' is a required property"
    usage = Usage(input_tokens=3)
    usage.add(Usage(output_tokens=2, cost=0.5))
    assert (usage.input_tokens, usage.output_tokens, usage.cost) == (3, 2, 0.5)


def test_an_unreported_part_makes_the_total_unreported_and_its_cost_unknown() -> None:
    total = Usage()
    total.add(Usage(input_tokens=3, output_tokens=2, cost=0.5))
    assert total.reported
    total.add(Usage(output_tokens=4, reported=False))
    assert (total.input_tokens, total.output_tokens, total.cost, total.reported) == (
        3,
        6,
        None,
        False,
    )
    total.add(Usage(input_tokens=1, output_tokens=1, cost=0.25))  # stays unreported
    assert (total.input_tokens, total.output_tokens, total.cost, total.reported) == (
        4,
        7,
        None,
        False,
    )
    assert Usage().reported


def test_engine_imports_no_web_stack() -> None:
    # every engine module, imported for real: none may pull in the web stack or stagecast.api
    probe = (
        "import sys, pkgutil, importlib, stagecast.engine as e;"
        "mods = pkgutil.walk_packages(e.__path__, e.__name__ + '.');"
        "[importlib.import_module(m.name) for m in mods];"
        "web = {'fastapi', 'starlette', 'sse_starlette', 'uvicorn'};"
        "print(sorted({m.split('.')[0] for m in sys.modules} & web),"
        " sorted(m for m in sys.modules if m.startswith('stagecast.api')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []"
