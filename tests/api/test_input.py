"""Input stages over real HTTP on 127.0.0.1: the run pauses, the stream stays open with pings,
answers are checked (422), raced (409), and the run goes on; viewers attaching while paused;
cancel and the wait limit while paused; a waiting run holds no slot of the runs limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from tests.api.sse_parse import events_of

Serve = Callable[..., str]


class Viewer(threading.Thread):
    """Reads one run's SSE stream in the background (bounded by the client's timeout)."""

    def __init__(self, url: str, path: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.path, self.headers = url, path, headers or {}
        self.text = ""
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=10) as http,
                http.stream("GET", self.path, headers=self.headers) as response,
            ):
                for chunk in response.iter_text():
                    with self.lock:
                        self.text += chunk
        except httpx.TransportError:
            pass  # the test ended and its server stopped first: what was read is kept

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            text = self.text
        return events_of(text[: text.rfind("\n\n") + 2])

    def wait_for(self, event_type: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events() if e["type"] == event_type]
            if found:
                return found[-1]
            time.sleep(0.01)
        raise AssertionError(f"no {event_type} within {timeout} s: {self.events()}")


def start(http: httpx.Client, chain: str = "ask") -> dict[str, Any]:
    response = http.post("/v1/runs", json={"chain": chain})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def answer(http: httpx.Client, run_id: str, value: Any, path: Any = ("ask",)) -> httpx.Response:
    body = {"stage": "ask", "path": list(path) if path is not None else None, "value": value}
    return http.post(f"/v1/runs/{run_id}/input", json=body)


def test_a_run_pauses_refuses_a_wrong_answer_and_goes_on_after_a_valid_one(serve: Serve) -> None:
    url = serve(ping_interval=0.1)
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        run_id = run["run_id"]
        viewer = Viewer(url, run["events_url"])
        viewer.start()
        asked = viewer.wait_for("input-required")
        assert (asked["stage"], asked["path"], asked["prompt"]) == (
            "ask",
            ["ask"],
            "How many **points**?",
        )
        assert asked["schema"]["required"] == ["count"]
        assert asked["expires_at"] - asked["ts"] in range(3_599_000, 3_600_001)  # max_input_wait
        status = http.get(run["status_url"]).json()
        assert status["status"] == "waiting_input"
        assert status["stages"]["ask"]["status"] == "waiting_input"
        assert status["pending_input"] == [
            {
                "stage": "ask",
                "path": ["ask"],
                "prompt": "How many **points**?",
                "schema": asked["schema"],
                "expires_at": asked["expires_at"],
            }
        ]
        time.sleep(0.35)  # paused: the stream stays open and pings
        assert viewer.text.count(": ping") >= 2 and viewer.is_alive()
        seen = len(viewer.events())

        refused = answer(http, run_id, {"count": 0, "note": 5})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "invalid_answer"
        assert error["details"] == {
            "fields": {"value.count": "at least 1", "value.note": "expected text"},
            "path": ["ask"],
        }
        assert error["message"] == (
            "the answer to ask was refused: value.count: at least 1; value.note: expected text"
        )
        missing = answer(http, run_id, {})
        assert missing.json()["error"]["details"]["fields"] == {"value.count": "required"}
        bad_body = http.post(f"/v1/runs/{run_id}/input", json={"stage": "ask"})
        assert bad_body.status_code == 422  # no value at all: the request itself is wrong
        assert bad_body.json()["error"]["code"] == "invalid_request"
        time.sleep(0.05)
        assert len(viewer.events()) == seen  # refused answers emit nothing
        assert http.get(run["status_url"]).json()["status"] == "waiting_input"

        accepted = answer(http, run_id, {"count": 3})
        assert accepted.status_code == 202
        assert accepted.json() == {"run_id": run_id, "status": "running"}
        viewer.join(5)
        events = viewer.events()
        assert [(e["type"], e.get("stage")) for e in events] == [
            ("run-start", None),
            ("stage-start", "ask"),
            ("input-required", "ask"),
            ("stage-end", "ask"),
            ("stage-start", "after"),
            ("token", "after"),
            ("token", "after"),
            ("token", "after"),
            ("stage-end", "after"),
            ("run-end", None),
        ]
        assert events[3]["output"] == {"count": 3}
        assert events[-1]["status"] == "succeeded"
        assert events[-1]["outputs"]["count"] == 3
        assert [e["seq"] for e in events] == list(range(1, 11))
        final = http.get(run["status_url"]).json()
        assert final["pending_input"] == [] and final["status"] == "succeeded"
        metrics = http.get("/metrics").text
        assert 'stagecast_answers_total{outcome="accepted"} 1' in metrics
        assert 'stagecast_answers_total{outcome="refused"} 2' in metrics


def test_two_answers_racing_for_one_input_one_wins_and_one_gets_409(serve: Serve) -> None:
    url = serve()
    with httpx.Client(base_url=url, timeout=5) as http:
        for _ in range(5):  # a few rounds: the race must be decided the same way every time
            run = start(http)
            viewer = Viewer(url, run["events_url"])
            viewer.start()
            viewer.wait_for("input-required")
            gate = threading.Barrier(2)
            codes: list[tuple[int, dict[str, Any]]] = []

            def post(
                count: int,
                gate: threading.Barrier = gate,
                run: Any = run,
                codes: list[tuple[int, dict[str, Any]]] = codes,
            ) -> None:
                with httpx.Client(base_url=url, timeout=5) as own:
                    gate.wait()
                    response = answer(own, run["run_id"], {"count": count})
                    codes.append((response.status_code, response.json()))

            racers = [threading.Thread(target=post, args=(n,)) for n in (1, 2)]
            for racer in racers:
                racer.start()
            for racer in racers:
                racer.join(5)
            assert sorted(code for code, _ in codes) == [202, 409]
            loser = next(body for code, body in codes if code == 409)["error"]
            assert loser["code"] == "not_waiting_input"
            assert loser["details"]["waiting"] == []
            viewer.join(5)
            ends = [e for e in viewer.events() if e["type"] == "stage-end" and e["stage"] == "ask"]
            winner = next(body for code, body in codes if code == 202)
            assert winner["run_id"] == run["run_id"]
            assert len(ends) == 1 and ends[0]["output"]["count"] in (1, 2)


def test_a_viewer_attaching_while_paused_gets_input_required_and_can_answer(
    serve: Serve,
) -> None:
    url = serve()
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        first = Viewer(url, run["events_url"])
        first.start()
        asked = first.wait_for("input-required")
        late = Viewer(url, run["events_url"], {"Last-Event-ID": "1"})
        late.start()
        replayed = late.wait_for("input-required")
        assert replayed == asked
        assert [e["seq"] for e in late.events()] == [2, 3]
        assert answer(http, run["run_id"], {"count": 7}).status_code == 202
        first.join(5)
        late.join(5)
        assert first.events()[1:] == late.events()
        assert late.events()[-1]["outputs"]["count"] == 7


def test_an_answer_naming_another_stage_gets_409_naming_what_is_waiting(serve: Serve) -> None:
    url = serve()
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        Viewer(url, run["events_url"]).start()
        wait_until(http, run, "waiting_input")
        response = http.post(f"/v1/runs/{run['run_id']}/input", json={"stage": "after", "value": 1})
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["message"] == (
            f"run {run['run_id']!r}: after is not waiting for input; waiting: ask "
            "(status: waiting_input)"
        )
        assert error["details"] == {
            "status": "waiting_input",
            "waiting": [{"stage": "ask", "path": ["ask"]}],
        }
        assert answer(http, run["run_id"], {"count": 2}, path=None).status_code == 202


def test_cancel_while_paused_ends_the_run_cancelled(serve: Serve) -> None:
    url = serve()
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        viewer = Viewer(url, run["events_url"])
        viewer.start()
        viewer.wait_for("input-required")
        assert http.post(run["cancel_url"]).status_code == 202
        viewer.join(5)
        assert [(e["type"], e.get("status")) for e in viewer.events()[-2:]] == [
            ("stage-end", "cancelled"),
            ("run-end", "cancelled"),
        ]
        status = http.get(run["status_url"]).json()
        assert status["status"] == "cancelled" and status["pending_input"] == []
        late = answer(http, run["run_id"], {"count": 1})
        assert late.status_code == 409
        assert late.json()["error"]["details"]["status"] == "cancelled"


def test_past_the_wait_limit_the_run_ends_failed_with_a_clear_error(serve: Serve) -> None:
    url = serve(max_input_wait=0.3)
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        viewer = Viewer(url, run["events_url"])
        viewer.start()
        viewer.join(5)
        end = viewer.events()[-1]
        assert end["type"] == "run-end" and end["status"] == "failed"
        assert end["error"] == {
            "type": "input_timeout",
            "message": "no answer within 0.3 s (the limit on waiting for input, max_input_wait)",
            "stage": "ask",
        }


def wait_until(http: httpx.Client, run: dict[str, Any], status: str) -> None:
    deadline = time.monotonic() + 5
    while http.get(run["status_url"]).json()["status"] != status:
        assert time.monotonic() < deadline, f"{run['run_id']} never {status}"
        time.sleep(0.01)


def test_a_run_waiting_for_input_holds_no_slot_of_the_runs_limit(serve: Serve) -> None:
    url = serve(max_concurrent_runs=1, max_waiting_runs=3)
    with httpx.Client(base_url=url, timeout=5) as http:
        waiting = []
        for _ in range(2):  # each holds the one slot until it pauses, then releases it
            waiting.append(start(http))
            wait_until(http, waiting[-1], "waiting_input")
        other = http.post("/v1/runs", json={"chain": "endless"})
        assert other.status_code == 201  # the one running slot is free
        busy = http.post("/v1/runs", json={"chain": "endless"})
        assert busy.status_code == 429
        assert busy.json()["error"]["details"] == {"limit": 1, "setting": "max_concurrent_runs"}
        http.post(other.json()["cancel_url"])
        wait_until(http, other.json(), "cancelled")
        waiting.append(start(http))
        wait_until(http, waiting[-1], "waiting_input")
        full = http.post("/v1/runs", json={"chain": "endless"})
        assert full.status_code == 429  # three wait: no new run until one is answered
        assert full.json()["error"]["details"] == {"limit": 3, "setting": "max_waiting_runs"}
        assert full.json()["error"]["message"] == (
            "3 runs are already waiting for input (max_waiting_runs); retry when one ends"
        )
        metrics = http.get("/metrics").text
        assert "stagecast_runs_waiting_input 3\n" in metrics
        assert answer(http, waiting[0]["run_id"], {"count": 1}).status_code == 202
        wait_until(http, waiting[0], "succeeded")
        assert http.post("/v1/runs", json={"chain": "ask"}).status_code == 201
        for run in waiting:
            http.post(run["cancel_url"])


def test_waiting_runs_can_be_told_to_hold_their_slot(serve: Serve) -> None:
    url = serve(max_concurrent_runs=1, waiting_runs_hold_slots=True)
    with httpx.Client(base_url=url, timeout=5) as http:
        run = start(http)
        wait_until(http, run, "waiting_input")
        refused = http.post("/v1/runs", json={"chain": "ask"})
        assert refused.status_code == 429
        assert refused.json()["error"]["details"]["setting"] == "max_concurrent_runs"
        http.post(run["cancel_url"])
