"""Re-runs, replays and ``max_waiting_runs`` on a deployment on Redis, in real processes.

The same fixtures as test_deployment.py: `stagecast serve` and `stagecast worker` subprocesses
on 127.0.0.1 sharing one real redis-server; no sticky routing. Which stages a re-run reused is
read from the stream (`reused` on each stage-end), exactly as a viewer sees it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis.test_deployment import (
    TEXT,
    Deployment,
    check_invariants,
    read_events,
    start,
    status,
)

VOLATILE = ("run_id", "seq", "ts")


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(redis_url, tmp_path)
    try:
        yield dep
    finally:
        dep.close()


def same(event: dict[str, Any]) -> dict[str, Any]:
    """An event without what a replay renumbers."""
    return {k: v for k, v in event.items() if k not in VOLATILE}


def ends(events: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    return [(e["stage"], e["reused"]) for e in events if e["type"] == "stage-end"]


def worker_of(deployment: Deployment, run_id: str) -> str:
    worker = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker")
    assert worker is not None
    return worker.decode()


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10)


def download(url: str, run_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/runs/{run_id}/events", params={"format": "ndjson"})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def write(folder: Path, name: str, events: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(e) + "\n" for e in events)
    (folder / f"{name}.ndjson").write_text(text, encoding="utf-8")


def left_nothing(deployment: Deployment) -> None:
    """No slot held, nothing counted as waiting, no queued source left, nothing pending."""
    r = deployment.redis
    deadline = time.monotonic() + 5  # the owner's registry update follows the run-end
    while r.zcard("stagecast:admitted") or list(r.scan_iter("stagecast:source:*")):
        assert time.monotonic() < deadline, (
            r.zrange("stagecast:admitted", 0, -1),
            list(r.scan_iter("stagecast:source:*")),
        )
        time.sleep(0.05)
    assert r.zcard("stagecast:waiting") == 0
    assert r.xpending("stagecast:queue", "workers")["pending"] == 0


def test_a_rerun_reuses_a_run_another_process_executed(
    deployment: Deployment, tmp_path: Path
) -> None:
    # the earlier run: executed by serve A, the only process working runs then
    a = deployment.serve()
    first = start(a)
    earlier = read_events(a, first)
    check_invariants(earlier)
    assert ends(earlier) == [("first", False), ("second", False)]
    executed_by = worker_of(deployment, first)
    folder = tmp_path / "recordings"
    folder.mkdir()
    recorded = download(a, first)
    write(folder, "first-run", recorded)
    v2 = recorded[0] | {"chain": recorded[0]["chain"] | {"version": 2}}
    write(folder, "first-v2", [v2, *recorded[1:]])
    deployment.processes[0].terminate()  # A is gone: its run's events live on in Redis
    deployment.processes[0].wait(10)

    # the re-run goes through B (works no runs) to a worker that has no recordings folder
    b = deployment.serve("--recordings", str(folder), work_runs="false")
    deployment.worker()
    created = post(b, "/v1/runs", {"chain": "slow", "reuse": {"run_id": first}})
    assert created.status_code == 201, created.text
    again = created.json()["run_id"]
    events = read_events(b, again)
    check_invariants(events)
    assert worker_of(deployment, again) != executed_by
    assert ends(events) == [("first", True), ("second", True)]  # nothing ran again
    assert not [e for e in events if e["type"] == "token"]
    assert events[0]["inputs"] == {"text": TEXT}  # the earlier run's inputs, none given
    reused = [e for e in events if e["type"] == "stage-end"]
    assert [e["output"] for e in reused] == [
        e["output"] for e in earlier if e["type"] == "stage-end"
    ]
    assert all(e["usage"]["input_tokens"] == e["usage"]["output_tokens"] == 0 for e in reused)
    assert events[-1]["status"] == "succeeded"
    assert events[-1]["outputs"] == earlier[-1]["outputs"]
    assert status(b, again)["status"] == "succeeded"

    # from a stage: it and what depends on it run again, the rest is reused
    created = post(b, "/v1/runs", {"chain": "slow", "reuse": {"run_id": first, "from": "second"}})
    assert created.status_code == 201, created.text
    events = read_events(b, created.json()["run_id"])
    check_invariants(events)
    assert ends(events) == [("first", True), ("second", False)]
    assert {e["stage"] for e in events if e["type"] == "token"} == {"second"}

    # a recording of the serve's folder: carried to the worker, reused the same way
    created = post(b, "/v1/runs", {"chain": "slow", "reuse": {"recording": "first-run"}})
    assert created.status_code == 201, created.text
    events = read_events(b, created.json()["run_id"])
    check_invariants(events)
    assert ends(events) == [("first", True), ("second", True)]

    # refused at POST time, with the texts of a single process; nothing is queued
    def refused(reuse: dict[str, Any], code: int) -> dict[str, Any]:
        response = post(b, "/v1/runs", {"chain": "slow", "reuse": reuse})
        assert response.status_code == code, response.text
        error: dict[str, Any] = response.json()["error"]
        return error

    unknown = refused({"run_id": "run_nope"}, 404)
    assert unknown["code"] == "unknown_run"
    assert unknown["message"] == (
        "reuse.run_id: no run 'run_nope' (unknown, or expired after it finished)"
    )
    wrong = refused({"run_id": first, "from": "secnod"}, 422)
    assert wrong["code"] == "invalid_reuse"
    assert wrong["details"]["fields"] == {
        "reuse.from": "from: no stage 'secnod' in 'slow'; stages are: first, second"
    }
    other = refused({"recording": "first-v2"}, 422)
    assert other["code"] == "invalid_reuse"
    assert other["message"] == (
        "first-v2.ndjson: recorded with 'slow' version 2, but the chain is now version 1; "
        "outputs of another version are not reused (run without reuse, or reuse a recording "
        "of this version)"
    )
    both = refused({"run_id": first, "recording": "first-run"}, 422)
    assert both["message"] == "reuse: give exactly one of run_id and recording"

    # a retried create (Idempotency-Key) finds its run, even once the reused run is gone
    body = {"chain": "slow", "reuse": {"run_id": first}}
    key = {"Idempotency-Key": "rerun-1"}
    created = httpx.post(f"{b}/v1/runs", json=body, headers=key, timeout=10)
    assert created.status_code == 201, created.text
    deployment.redis.delete(f"stagecast:run:{first}")  # as when it expires
    again = httpx.post(f"{b}/v1/runs", json=body, headers=key, timeout=10)
    assert again.status_code == 200, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["run_id"] == created.json()["run_id"]
    assert refused({"run_id": first}, 404)["code"] == "unknown_run"  # a new request: gone
    assert ends(read_events(b, created.json()["run_id"])) == [("first", True), ("second", True)]
    left_nothing(deployment)


@pytest.fixture
def paused_recording(deployment: Deployment, tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A recording of a `slow` run whose events after the first stage-start are 10 s later."""
    url = deployment.serve()
    run_id = start(url)
    read_events(url, run_id)
    events = download(url, run_id)
    deployment.processes[-1].terminate()
    deployment.processes[-1].wait(10)
    origin = events[0]["ts"]
    for i, event in enumerate(events):
        event["ts"] = origin if i < 2 else origin + 10_000 + i
    assert [e["type"] for e in events[:2]] == ["run-start", "stage-start"]
    folder = tmp_path / "recordings"
    folder.mkdir()
    write(folder, "paused", events)
    return folder, events


def test_a_replay_started_through_one_process_streams_resumes_and_cancels_through_another(
    deployment: Deployment, paused_recording: tuple[Path, list[dict[str, Any]]]
) -> None:
    folder, recorded = paused_recording
    a = deployment.serve("--recordings", str(folder), work_runs="false", max_concurrent_runs=1)
    b = deployment.serve(work_runs="false", max_concurrent_runs=1)  # no recordings here
    deployment.worker(max_concurrent_runs=1)  # nor here: the recording is carried

    created = post(a, "/v1/replays", {"recording": "paused", "speed": "max"})
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "pending"
    assert created.headers["location"] == created.json()["status_url"]
    replay = created.json()["run_id"]
    head = read_events(b, replay, until=lambda ev: len(ev) >= 5)[:5]
    rest = read_events(b, replay, after=head[-1]["seq"])
    events = head + rest
    check_invariants(events)
    assert [same(e) for e in events] == [same(e) for e in recorded]
    assert {e["run_id"] for e in events} == {replay} != {recorded[0]["run_id"]}
    done = status(b, replay)
    assert done["status"] == "succeeded"
    assert done["chain"] == recorded[0]["chain"]
    assert done["model"] == recorded[0]["model"]
    assert done["outputs"] == recorded[-1]["outputs"]
    assert done["stages"]["second"]["status"] == "succeeded"

    # at the recorded pace it pauses 10 s after its first stage-start: cancelled through B
    created = post(a, "/v1/replays", {"recording": "paused"})
    assert created.status_code == 201, created.text
    slow = created.json()["run_id"]
    seen = read_events(b, slow, until=lambda ev: ev and ev[-1]["type"] == "stage-start")
    assert status(b, slow)["status"] == "running"
    # it holds the deployment's one slot, like a run (max_concurrent_runs)
    for path, body in (
        ("/v1/runs", {"chain": "slow", "inputs": {"text": TEXT}}),
        ("/v1/replays", {"recording": "paused"}),
    ):
        full = post(a, path, body)
        assert full.status_code == 429, full.text
        assert full.json()["error"]["details"] == {"limit": 1, "setting": "max_concurrent_runs"}
    # a refused request left nothing behind: the one source is the running replay's
    sources = list(deployment.redis.scan_iter("stagecast:source:*"))
    assert sources == [f"stagecast:source:{slow}".encode()]
    cancel = httpx.post(f"{b}/v1/runs/{slow}/cancel", timeout=10)
    assert cancel.status_code == 202 and cancel.json()["run_id"] == slow
    t0 = time.monotonic()
    tail = read_events(b, slow, after=seen[-1]["seq"])
    assert time.monotonic() - t0 < 5  # the owning worker got the cancel at once
    check_invariants(seen + tail)
    assert [(e["type"], e.get("stage"), e.get("status")) for e in tail] == [
        ("stage-end", "first", "cancelled"),
        ("run-end", None, "cancelled"),
    ]
    assert status(a, slow)["status"] == "cancelled"
    left_nothing(deployment)

    # the recording's problems are said by the process that has the folder; B has none
    unknown = post(a, "/v1/replays", {"recording": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == (
        "recording: no recording 'nope'; recordings are: paused"
    )
    off = post(b, "/v1/replays", {"recording": "paused"})
    assert off.status_code == 404
    assert off.json()["error"]["message"] == (
        "recording: this server serves no recordings (start it with --recordings DIR)"
    )
    listed = httpx.get(f"{a}/v1/recordings", timeout=10).json()["recordings"]
    assert [(r["name"], r["chain"]) for r in listed] == [("paused", recorded[0]["chain"])]


def wait_status(url: str, run_id: str, wanted: str) -> None:
    deadline = time.monotonic() + 10  # the worker's snapshot reaches the registry
    while status(url, run_id)["status"] != wanted:
        assert time.monotonic() < deadline, status(url, run_id)
        time.sleep(0.05)


def ask(url: str) -> str:
    created = post(url, "/v1/runs", {"chain": "ask"})
    assert created.status_code == 201, created.text
    run_id: str = created.json()["run_id"]
    return run_id


def refused_waiting(url: str) -> None:
    response = post(url, "/v1/runs", {"chain": "slow", "inputs": {"text": TEXT}})
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "1"
    error = response.json()["error"]
    assert error["code"] == "too_many_runs"
    assert error["message"] == (
        "1 runs are already waiting for input (max_waiting_runs); retry when one ends"
    )
    assert error["details"] == {"limit": 1, "setting": "max_waiting_runs"}


def test_max_waiting_runs_holds_across_the_deployment(deployment: Deployment) -> None:
    a = deployment.serve(work_runs="false", max_waiting_runs=1)
    b = deployment.serve(work_runs="false", max_waiting_runs=1)
    deployment.worker(max_waiting_runs=1)

    waiting = ask(a)
    wait_status(b, waiting, "waiting_input")
    refused_waiting(b)  # counted in Redis: B refuses what A's run waits for
    refused_waiting(a)
    answered = post(b, f"/v1/runs/{waiting}/input", {"stage": "ask", "value": {"count": 2}})
    assert answered.status_code == 202, answered.text
    # answered: it leaves the count at once (the owner writes it with the answer)
    other = start(b)
    check_invariants(read_events(a, waiting))
    check_invariants(read_events(a, other))

    # a waiting run that ends (cancelled) leaves the count too
    second = ask(b)
    wait_status(a, second, "waiting_input")
    refused_waiting(a)
    assert httpx.post(f"{a}/v1/runs/{second}/cancel", timeout=10).status_code == 202
    assert read_events(b, second)[-1]["status"] == "cancelled"
    third = ask(a)
    wait_status(a, third, "waiting_input")
    assert deployment.redis.zrange("stagecast:waiting", 0, -1) == [third.encode()]
    assert httpx.post(f"{b}/v1/runs/{third}/cancel", timeout=10).status_code == 202
    assert read_events(a, third)[-1]["status"] == "cancelled"
    left_nothing(deployment)


def test_a_lost_worker_s_waiting_runs_leave_the_count(deployment: Deployment) -> None:
    timeout = 1.0
    a = deployment.serve(work_runs="false", max_waiting_runs=1, heartbeat_timeout=timeout)
    deployment.worker(max_waiting_runs=1, heartbeat_timeout=timeout)
    waiting = ask(a)
    wait_status(a, waiting, "waiting_input")
    refused_waiting(a)
    os.kill(deployment.owner_pid(waiting), signal.SIGKILL)  # no worker is left to take over
    killed = time.monotonic()
    while True:  # the waiting run's lease runs out with its worker's heartbeat
        response = post(a, "/v1/runs", {"chain": "slow", "inputs": {"text": TEXT}})
        if response.status_code == 201:
            break
        assert response.json()["error"]["details"]["setting"] == "max_waiting_runs"
        assert time.monotonic() - killed < timeout + 5, "the lost run still counts as waiting"
        time.sleep(0.1)


def test_what_a_queued_run_carries_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from stagecast.api import cluster
    from stagecast.api.errors import ApiError
    from stagecast.engine.events import RunEnded

    events = [RunEnded(run_id="run_x", seq=1, ts=0, status="succeeded", outputs="x" * 2000)]
    assert cluster._ndjson(events, "recording", "big.ndjson").startswith('{"v":1,')
    size = len(cluster._ndjson(events, "recording", "big.ndjson"))
    monkeypatch.setattr(cluster, "MAX_SOURCE_BYTES", 1024)
    for field, code in (("recording", "invalid_recording"), ("reuse", "invalid_reuse")):
        with pytest.raises(ApiError) as raised:
            cluster._ndjson(events, field, "big.ndjson")
        error = raised.value
        assert (error.status, error.code) == (422, code)
        problem = (
            f"big.ndjson: {size / 1024:.1f} KiB to carry to a worker; a deployment on Redis "
            "carries up to 1.0 KiB"
        )
        assert error.message == f"{field}: {problem}"
        assert error.details == {"fields": {field: problem}}
