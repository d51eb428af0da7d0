"""Recordings over real HTTP: NDJSON download, replays as live runs, re-runs that reuse."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stagecast.api.client import Client
from stagecast.engine.events import (
    ChainInfo,
    PlanStep,
    RunEnded,
    RunStarted,
    StageEnded,
    StageProgress,
    StageStarted,
    Token,
    Usage,
    event_from_json,
    event_to_json,
)
from tests.api.conftest import ScriptedModel
from tests.api.sse_parse import complete, events_of

THINGS = {"things": [1, 2, 3]}
VOLATILE = ("run_id", "seq", "ts")


def same(event: dict[str, Any]) -> dict[str, Any]:
    """An event without what a replay renumbers."""
    return {k: v for k, v in event.items() if k not in VOLATILE}


def run_to_end(client: httpx.Client, body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    created = client.post("/v1/runs", json=body)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    return run_id, events_of(client.get(f"/v1/runs/{run_id}/events").text)


def ndjson(client: httpx.Client, run_id: str) -> str:
    response = client.get(f"/v1/runs/{run_id}/events", params={"format": "ndjson"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["content-disposition"] == f'attachment; filename="{run_id}.ndjson"'
    return response.text


def test_a_run_downloads_as_ndjson_exactly_its_sse_events(serve: Callable[..., str]) -> None:
    url = serve()
    with httpx.Client(base_url=url, timeout=10) as client:
        run_id, events = run_to_end(client, {"chain": "parallel", "inputs": THINGS})
        text = ndjson(client, run_id)
    lines = text.splitlines()
    assert text.endswith("\n")
    assert [json.loads(line) for line in lines] == events
    assert [event_to_json(event_from_json(line)) for line in lines] == lines  # the wire JSON
    assert events[0]["inputs"] == {"things": [1, 2, 3], "topic": "tests"}
    assert events[0]["chain"] == {"id": "parallel", "title": "Parallel items", "version": 1}


def test_a_live_run_streams_as_ndjson_to_its_end(serve: Callable[..., str]) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=20)})
    with httpx.Client(base_url=url, timeout=10) as client:
        run_id = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS}).json()[
            "run_id"
        ]
        lines = ndjson(client, run_id).splitlines()  # asked at once: the run is still going
        assert client.get(f"/v1/runs/{run_id}").json()["status"] == "succeeded"
    assert json.loads(lines[0])["type"] == "run-start"
    assert json.loads(lines[-1])["type"] == "run-end"
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, len(lines) + 1))


@pytest.fixture
def recordings(tmp_path: Path, serve: Callable[..., str]) -> tuple[Path, list[dict[str, Any]]]:
    """A recording of a `parallel` run, spread over 300 ms of recorded time."""
    url = serve()
    with httpx.Client(base_url=url, timeout=10) as client:
        run_id, _ = run_to_end(client, {"chain": "parallel", "inputs": THINGS})
        lines = ndjson(client, run_id).splitlines()
    events = [json.loads(line) for line in lines]
    origin = events[0]["ts"]
    for i, event in enumerate(events):
        event["ts"] = origin + round(300 * i / (len(events) - 1))
    folder = tmp_path / "recordings"
    folder.mkdir()
    text = "".join(json.dumps(e) + "\n" for e in events)
    (folder / "parallel-run.ndjson").write_text(text, encoding="utf-8")
    return folder, events


def replay(client: httpx.Client, body: dict[str, Any]) -> str:
    created = client.post("/v1/replays", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == created.json()["status_url"]
    run_id: str = created.json()["run_id"]
    return run_id


def test_a_replay_is_a_new_run_with_the_recorded_events(
    serve: Callable[..., str], recordings: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, recorded = recordings
    url = serve(recordings_dir=folder)
    with httpx.Client(base_url=url, timeout=10) as client:
        listed = client.get("/v1/recordings").json()["recordings"]
        assert listed == [
            {
                "name": "parallel-run",
                "bytes": (folder / "parallel-run.ndjson").stat().st_size,
                "chain": {"id": "parallel", "title": "Parallel items", "version": 1},
                "model": "fake",
            }
        ]
        began = time.monotonic()
        run_id = replay(client, {"recording": "parallel-run", "speed": 2})
        events = events_of(client.get(f"/v1/runs/{run_id}/events").text)
        elapsed = time.monotonic() - began
        status = client.get(f"/v1/runs/{run_id}").json()
    assert [same(e) for e in events] == [same(e) for e in recorded]
    assert {e["run_id"] for e in events} == {run_id} != {recorded[0]["run_id"]}
    assert [e["seq"] for e in events] == list(range(1, len(recorded) + 1))
    assert all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:], strict=False))
    assert elapsed >= 0.9 * 0.3 / 2  # 300 ms recorded at speed 2: never sooner than ~150 ms
    assert events[-1]["ts"] - events[0]["ts"] >= 0.9 * 300 / 2
    assert status["status"] == "succeeded"
    assert status["chain"] == {"id": "parallel", "title": "Parallel items", "version": 1}
    assert status["stages"]["merge"]["status"] == "succeeded"
    assert status["outputs"] == recorded[-1]["outputs"]


def test_a_replay_resumes_after_a_cut_and_cancels(
    serve: Callable[..., str], recordings: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, recorded = recordings
    url = serve(recordings_dir=folder)
    with httpx.Client(base_url=url, timeout=10) as client:
        run_id = replay(client, {"recording": "parallel-run", "speed": "max"})
        first = events_of(complete(client.get(f"/v1/runs/{run_id}/events").text))[:5]
        rest = client.get(
            f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(first[-1]["seq"])}
        )
        assert [same(e) for e in first + events_of(rest.text)] == [same(e) for e in recorded]

        slow = replay(client, {"recording": "parallel-run", "speed": 0.01})  # 30 s long
        with client.stream("GET", f"/v1/runs/{slow}/events") as stream:
            text = ""
            chunks = stream.iter_text()
            while "event: stage-start" not in text:  # intro started; seq 3 is 3 s away
                text += next(chunks)
            assert client.post(f"/v1/runs/{slow}/cancel").status_code == 202
            text += "".join(chunks)
    tail = events_of(text)[1:]
    assert [(e["type"], e.get("stage"), e.get("status")) for e in tail] == [
        ("stage-start", "intro", None),
        ("stage-end", "intro", "cancelled"),
        ("run-end", None, "cancelled"),
    ]


def test_replay_errors_name_the_field(
    serve: Callable[..., str], recordings: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, _ = recordings
    (folder / "broken.ndjson").write_text('{"v": 1, "type": "run-start"}\n', encoding="utf-8")
    with httpx.Client(base_url=serve(), timeout=10) as client:
        off = client.post("/v1/replays", json={"recording": "parallel-run"})
        assert off.status_code == 404
        assert off.json()["error"]["message"] == (
            "recording: this server serves no recordings (start it with --recordings DIR)"
        )
        assert client.get("/v1/recordings").json() == {"recordings": []}
    with httpx.Client(base_url=serve(recordings_dir=folder), timeout=10) as client:
        unknown = client.post("/v1/replays", json={"recording": "nope"}).json()["error"]
        assert unknown["message"] == (
            "recording: no recording 'nope'; recordings are: broken, parallel-run"
        )
        sneaky = client.post("/v1/replays", json={"recording": "../secrets"})
        assert sneaky.status_code == 422
        broken = client.post("/v1/replays", json={"recording": "broken"}).json()["error"]
        assert broken["code"] == "invalid_recording"
        assert broken["message"].startswith("broken.ndjson:1: not a Stagecast event: ")
        assert str(folder) not in broken["message"]
        zero = client.post("/v1/replays", json={"recording": "parallel-run", "speed": 0})
        assert zero.json()["error"]["details"]["fields"] == {
            "speed": "expected a number > 0 or 'max', got 0.0"
        }


def test_a_rerun_reuses_an_earlier_run_by_id_or_recording(
    serve: Callable[..., str], recordings: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, recorded = recordings
    start = recorded[0] | {"chain": recorded[0]["chain"] | {"version": 2}}
    lines = [json.dumps(e) for e in [start, *recorded[1:]]]
    (folder / "parallel-v2.ndjson").write_text("\n".join(lines) + "\n", encoding="utf-8")
    calls: list[str] = []
    url = serve(models={"fake": ScriptedModel(record=calls)}, recordings_dir=folder)
    with httpx.Client(base_url=url, timeout=10) as client:
        first, _ = run_to_end(client, {"chain": "parallel", "inputs": THINGS})
        assert calls.count("open") == 4  # three items and the merge
        calls.clear()
        _, events = run_to_end(
            client, {"chain": "parallel", "reuse": {"run_id": first, "from": "merge"}}
        )
        assert calls.count("open") == 1  # the merge only
        ends = [(e["path"], e["reused"]) for e in events if e["type"] == "stage-end"]
        assert ends == [
            (["intro"], True),
            (["pieces", 0], True),
            (["pieces", 1], True),
            (["pieces", 2], True),
            (["pieces"], True),
            (["merge"], False),
        ]
        calls.clear()
        _, events = run_to_end(
            client,
            {"chain": "parallel", "inputs": {"topic": "other"}, "reuse": {"run_id": first}},
        )
        # every item reads the intro, which reads the topic; the merge reads only the items'
        # outputs, which came out the same (a scripted model): its rendered prompt is unchanged
        assert calls.count("open") == 3
        assert [e["reused"] for e in events if e["type"] == "stage-end"][-1] is True
        calls.clear()
        _, events = run_to_end(
            client, {"chain": "parallel", "reuse": {"recording": "parallel-run"}}
        )
        assert calls.count("open") == 0
        assert events[-1]["status"] == "succeeded"

        def refused(reuse: dict[str, Any]) -> dict[str, Any]:
            response = client.post("/v1/runs", json={"chain": "parallel", "reuse": reuse})
            assert response.status_code in (404, 422), response.text
            error: dict[str, Any] = response.json()["error"]
            return error

        assert refused({})["message"] == "reuse: give exactly one of run_id and recording"
        assert refused({"run_id": "run_nope"})["code"] == "unknown_run"
        wrong = refused({"run_id": first, "from": "mrege"})
        assert wrong["details"]["fields"] == {
            "reuse.from": "from: no stage 'mrege' in 'parallel'; stages are: intro, pieces, merge"
        }
        older = refused({"recording": "parallel-v2"})
        assert older["code"] == "invalid_reuse"
        assert older["message"] == (
            "parallel-v2.ndjson: recorded with 'parallel' version 2, but the chain is now "
            "version 1; outputs of another version are not reused (run without reuse, or "
            "reuse a recording of this version)"
        )


def test_the_python_client_yields_the_engines_typed_events(
    serve: Callable[..., str], recordings: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, recorded = recordings
    url = serve(recordings_dir=folder)
    with Client(url) as client:
        first = list(client.stream("parallel", THINGS))
        run = client.start_replay("parallel-run", speed="max")
        replayed = list(client.events(run.run_id))
        again = client.start_run("parallel", reuse={"run_id": first[0].run_id})
        reused = list(client.events(again.run_id))
    classes = {
        "run-start": RunStarted,
        "stage-start": StageStarted,
        "token": Token,
        "stage-progress": StageProgress,
        "stage-end": StageEnded,
        "run-end": RunEnded,
    }
    for events in (first, replayed, reused):
        assert {e.type for e in events} <= set(classes)
        assert all(type(e) is classes[e.type] for e in events)
    start, end = first[0], first[-1]
    assert isinstance(start, RunStarted) and isinstance(start.chain, ChainInfo)
    assert isinstance(start.plan[0], PlanStep) and start.inputs == {**THINGS, "topic": "tests"}
    assert isinstance(end, RunEnded) and isinstance(end.usage, Usage)
    assert [e.type for e in replayed] == [e["type"] for e in recorded]
    assert [e.reused for e in reused if isinstance(e, StageEnded)] == [True] * 6
