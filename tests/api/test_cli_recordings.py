"""``stagecast run --record/--reuse/--from``, ``replay`` and ``diff`` through a real subprocess."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from stagecast.engine.resources import SHIPPED_CHAINS
from tests.api.test_cli import TINY, cli, parse_stream

VOLATILE = ("run_id", "seq", "ts")
REPORT = str(SHIPPED_CHAINS / "examples" / "quarterly_report.md")


def same(line: str) -> dict[str, Any]:
    return {k: v for k, v in json.loads(line).items() if k not in VOLATILE}


def test_record_writes_exactly_the_events_stream_and_replays_to_it(tmp_path: Path) -> None:
    record = tmp_path / "tiny.ndjson"
    result = cli("run", TINY, "-i", "topic=owls", "--events", "--record", str(record))
    assert result.returncode == 0, result.stderr
    assert record.read_text(encoding="utf-8") == result.stdout
    events = parse_stream(result.stdout)
    assert events[0].inputs == {"topic": "owls", "count": 2, "extra": False}

    replayed = cli("replay", str(record), "--events", "--speed", "max")
    assert replayed.returncode == 0, replayed.stderr
    again = parse_stream(replayed.stdout)
    assert [same(line) for line in replayed.stdout.splitlines()] == [
        same(line) for line in result.stdout.splitlines()
    ]
    assert {e.run_id for e in again} != {events[0].run_id}

    plain = cli("replay", str(record), "--speed", "max")  # not a terminal: the plain log
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0].endswith(" · Tiny chain · model: offline")
    assert "outputs:" in plain.stdout.splitlines()


def test_replay_honours_the_speed(tmp_path: Path) -> None:
    record = tmp_path / "tiny.ndjson"
    result = cli("run", TINY, "-i", "topic=owls", "--events")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    origin = lines[0]["ts"]
    for i, event in enumerate(lines):  # spread the recording over 2 s
        event["ts"] = origin + round(2000 * i / (len(lines) - 1))
    record.write_text("".join(json.dumps(e) + "\n" for e in lines), encoding="utf-8")
    began = time.monotonic()
    replayed = cli("replay", str(record), "--events", "--speed", "4")
    elapsed = time.monotonic() - began
    assert replayed.returncode == 0, replayed.stderr
    again = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert [e["type"] for e in again] == [e["type"] for e in lines]
    assert elapsed >= 0.9 * 2 / 4  # never sooner than the recorded 2 s at 4x
    assert again[-1]["ts"] - again[0]["ts"] >= 0.9 * 2000 / 4


def test_replay_and_reuse_errors_name_the_file_and_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.ndjson"
    broken.write_text('{"v": 1, "type": "token"}\n', encoding="utf-8")
    result = cli("replay", str(broken))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {broken}:1: not a Stagecast event: ")
    assert "Traceback" not in result.stderr
    result = cli("replay", str(tmp_path / "none.ndjson"))
    assert result.stderr == f"error: {tmp_path / 'none.ndjson'}: no such file\n"
    result = cli("replay", str(broken), "--speed", "fast")
    assert result.stderr == "error: --speed: expected a number > 0 or 'max', got 'fast'\n"
    result = cli("run", TINY, "-i", "topic=owls", "--from", "points")
    assert result.returncode == 2
    assert result.stderr == (
        "error: --from needs --reuse FILE.ndjson (the run whose outputs to reuse)\n"
    )


def advanced(tmp_path: Path, old: str, new: str) -> Path:
    text = (SHIPPED_CHAINS / "advanced_summary.yaml").read_text(encoding="utf-8")
    assert text.count(old) == 1
    path = tmp_path / "advanced_summary.yaml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_an_author_edits_one_prompt_and_reruns_only_it_and_its_dependents(
    tmp_path: Path,
) -> None:
    """Issue 12's done-when, the way an author does it."""
    first = tmp_path / "first.ndjson"
    result = cli(
        "run", "advanced_summary", "-i", f"document=@{REPORT}", "--events", "--record", str(first)
    )
    assert result.returncode == 0, result.stderr
    edited = advanced(tmp_path, "Write the merged draft now.", "Write the merged draft now!")
    second = tmp_path / "second.ndjson"
    result = cli("run", str(edited), "--reuse", str(first), "--events", "--record", str(second))
    assert result.returncode == 0, result.stderr
    events = parse_stream(result.stdout)
    ends = {
        "/".join(map(str, e.path)): (e.reused, e.usage.output_tokens > 0)
        for e in events
        if e.type == "stage-end"
    }
    assert ends == {
        "sections": (True, False),
        "section_summaries/0": (True, False),
        "section_summaries/1": (True, False),
        "section_summaries/2": (True, False),
        "section_summaries/3": (True, False),
        "section_summaries": (True, False),
        "merge": (False, True),
        "polish": (False, True),
    }
    assert {e.stage for e in events if e.type == "token"} == {"merge", "polish"}

    report = cli("diff", str(first), str(second))
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    assert lines[0].startswith(f"A: {first} · run_") and " · advanced_summary v1 · " in lines[0]
    rows = {line.split()[0]: line for line in lines[3:7]}
    assert rows["sections"].split()[-3:] == ["reused", "same", "output"]
    assert rows["section_summaries"].split()[-3:] == ["reused", "same", "output"]
    assert rows["merge"].split()[-3:] == ["tok", "output", "changed"]  # ran again: not reused
    assert "== merge ==" in lines
    assert "--- A/merge" in lines and "+++ B/merge" in lines

    from_merge = cli("run", str(edited), "--reuse", str(second), "--from", "merge", "--events")
    reran = [e.stage for e in parse_stream(from_merge.stdout) if e.type == "stage-end"]
    reused = [
        e.stage for e in parse_stream(from_merge.stdout) if e.type == "stage-end" and e.reused
    ]
    assert reran[-2:] == ["merge", "polish"] and "merge" not in reused and "polish" not in reused

    newer = advanced(tmp_path, "version: 1\n", "version: 2\n")
    refused = cli("run", str(newer), "--reuse", str(first))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"error: --reuse: {first}: recorded with 'advanced_summary' version 1, but the chain is "
        "now version 2; outputs of another version are not reused (run without reuse, or reuse "
        "a recording of this version)\n"
    )
