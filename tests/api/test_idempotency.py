"""Create-and-stream that survives a blip: Idempotency-Key, and the grace period before
``on_disconnect: cancel`` cancels (real HTTP on 127.0.0.1), on both event logs (with Redis the
key, the viewers and the grace are the deployment's, in the registry)."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.api.conftest import ScriptedModel
from tests.api.sse_parse import complete, events_of

Serve = Callable[..., str]


@pytest.fixture
def serve(serve_on_both_logs: Serve) -> Serve:
    return serve_on_both_logs


BODY = {"chain": "parallel", "inputs": {"things": [1, 2, 3]}}


def started(http: httpx.Client, expected: int) -> int:
    """Runs started by the server, once ``expected`` have (with Redis a run is started by the
    worker that takes it from the queue, a moment after the create): bounded wait."""
    deadline = time.monotonic() + 5
    while (count := runs_started(http)) < expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


def runs_started(http: httpx.Client) -> int:
    text = http.get("/metrics").text
    return int(
        next(
            ln for ln in text.splitlines() if ln.startswith("stagecast_runs_started_total ")
        ).split()[1]
    )


def test_same_key_same_body_is_the_same_run_another_body_is_422(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=1)})
    with httpx.Client(base_url=url, timeout=5) as http:
        key = {"Idempotency-Key": "k-7f3a"}
        first = http.post("/v1/runs", json=BODY, headers=key)
        assert first.status_code == 201 and "idempotent-replayed" not in first.headers
        again = http.post("/v1/runs", json=BODY, headers=key)
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json()["run_id"] == first.json()["run_id"]
        assert again.headers["location"] == first.headers["location"]
        other = http.post("/v1/runs", json={**BODY, "inputs": {"things": [9]}}, headers=key)
        assert other.status_code == 422
        error = other.json()["error"]
        assert error["code"] == "idempotency_key_reused"
        assert error["details"]["run_id"] == first.json()["run_id"]
        assert error["message"] == (
            f"the Idempotency-Key 'k-7f3a' was already used for run {first.json()['run_id']} "
            "with a different request; send a new key for a new run, or the same request to "
            "re-attach"
        )
        bad = http.post("/v1/runs", json=BODY, headers={"Idempotency-Key": "has space"})
        assert bad.status_code == 422
        assert bad.json()["error"]["details"]["fields"] == {
            "Idempotency-Key": "expected 1 to 255 printable ASCII characters without spaces "
            "(a UUID is good)"
        }
        assert http.post("/v1/runs", json=BODY).status_code == 201  # no key: a new run each time
        assert started(http, 2) == 2


def test_a_retried_stream_post_reattaches_after_last_event_id(serve: Serve) -> None:
    """What a generic client does after a blip: the same POST again, with Last-Event-ID."""
    url = serve(models={"fake": ScriptedModel(tokens=["w "] * 30, delay_ms=20)}, disconnect_grace=5)
    key = {"Idempotency-Key": "retry-me"}
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/runs?stream=true", json=BODY, headers=key) as response:
            assert response.status_code == 200
            run_id = response.headers["x-stagecast-run-id"]
            text = ""
            for chunk in response.iter_text():
                text += chunk
                if text.count("\n\n") >= 3:
                    break  # the blip: the connection drops mid-run
        got = events_of(complete(text))
        last = got[-1]["seq"]
        time.sleep(0.3)  # the server has seen the disconnect; the run waits out its grace
        assert http.get(f"/v1/runs/{run_id}").json()["status"] == "running"
        resumed = http.post(
            "/v1/runs?stream=true", json=BODY, headers={**key, "Last-Event-ID": str(last)}
        )
        assert resumed.status_code == 200
        assert resumed.headers["x-stagecast-run-id"] == run_id
        assert resumed.headers["idempotent-replayed"] == "true"
        rest = events_of(resumed.text)
        seqs = [e["seq"] for e in got + rest]
        assert seqs == list(range(1, seqs[-1] + 1))
        assert rest[-1]["type"] == "run-end" and rest[-1]["status"] == "succeeded"
        assert started(http, 1) == 1


def test_an_abandoned_stream_run_is_cancelled_after_the_grace_period(serve: Serve) -> None:
    url = serve(models={"endless": ScriptedModel(forever=True, delay_ms=5)}, disconnect_grace=1)
    with httpx.Client(base_url=url, timeout=5) as http:
        body = {"chain": "endless", "inputs": {}}
        with http.stream("POST", "/v1/runs?stream=true", json=body) as response:
            run_id = response.headers["x-stagecast-run-id"]
            for chunk in response.iter_text():
                if "event: token" in chunk:
                    break
        closed = time.monotonic()
        time.sleep(0.2)
        assert http.get(f"/v1/runs/{run_id}").json()["status"] == "running"
        deadline = closed + 10
        while http.get(f"/v1/runs/{run_id}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the abandoned run was never cancelled"
            time.sleep(0.05)
        assert time.monotonic() - closed >= 1.0
        events = events_of(http.get(f"/v1/runs/{run_id}/events").text)
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "cancelled"


def test_a_viewer_back_within_the_grace_period_keeps_the_run(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=30)}, disconnect_grace=2)
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/runs?stream=true", json=BODY) as response:
            run_id = response.headers["x-stagecast-run-id"]
            for chunk in response.iter_text():
                if "event: token" in chunk:
                    break
        time.sleep(0.2)
        replay = http.get(f"/v1/runs/{run_id}/events")  # back in time, then to the end
        events = events_of(replay.text)
        time.sleep(2.2)  # past the first grace period: nothing cancels a finished run
        status = http.get(f"/v1/runs/{run_id}").json()["status"]
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "succeeded"
    assert status == "succeeded"
