"""A deployment on Redis, in real processes: `stagecast serve` x2 and `stagecast worker`.

Every process is a subprocess of the installed CLI on 127.0.0.1 (free ports), sharing one real
redis-server (``redis_url``; skipped outside CI without one). No sticky routing: each request
goes to whichever process the test picks.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from stagecast.api.client import Client, StagecastError, StreamLost
from tests.api.sse_parse import complete, events_of
from tests.redis_server import RedisServer, free_port

HERE = Path(__file__).parent
TEXT = "alpha bravo charlie delta foxtrot hotel india juliet kilo lima mike november oscar papa"


def check_invariants(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
    assert events[0]["type"] == "run-start"
    assert [e["type"] for e in events].count("run-end") == 1
    assert events[-1]["type"] == "run-end"


class Deployment:
    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.processes: list[subprocess.Popen[bytes]] = []
        self.redis = redis.Redis.from_url(redis_url)

    def env(self, **settings: Any) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STAGECAST_", "OPENAI_"))}
        env.update(
            STAGECAST_EVENT_LOG=self.redis_url,
            STAGECAST_CHAINS_DIR=str(HERE / "chains"),
            STAGECAST_MODELS_FILE=str(HERE / "models.yaml"),
            STAGECAST_PING_INTERVAL="1",  # an idle stream still lets read_events check its clock
        )
        env.update({f"STAGECAST_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    def _spawn(self, args: list[str], name: str, **settings: Any) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "stagecast.api.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.env(**settings),
            )
        self.processes.append(process)
        return process

    def serve(self, *extra: str, **settings: Any) -> str:
        port = free_port()
        name = f"serve-{port}"
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), *extra]
        process = self._spawn(args, name, **settings)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # bounded wait for the server to answer
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return url
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log(name)}")
            time.sleep(0.05)

    def worker(self, **settings: Any) -> subprocess.Popen[bytes]:
        before = set(self.redis.scan_iter("stagecast:worker:*"))
        name = f"worker-{len(self.processes)}"
        process = self._spawn(["worker"], name, **settings)
        deadline = time.monotonic() + 30
        while not set(self.redis.scan_iter("stagecast:worker:*")) - before:  # its heartbeat
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log(name)}")
            time.sleep(0.05)
        return process

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]

    def owner_pid(self, run_id: str) -> int:
        deadline = time.monotonic() + 10
        while True:
            worker = self.redis.hget(f"stagecast:runs:{run_id}", "worker")
            if worker is not None:
                return int(worker.decode().rsplit("-", 2)[1])  # <host>-<pid>-<random>
            assert time.monotonic() < deadline, "no worker took the run"
            time.sleep(0.02)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.redis.close()


@pytest.fixture
def deployment(redis_url: str, tmp_path: Path) -> Iterator[Deployment]:
    dep = Deployment(redis_url, tmp_path)
    try:
        yield dep
    finally:
        dep.close()


def start(url: str, text: str = TEXT, expect: int = 201, model: str | None = None) -> str:
    body: dict[str, Any] = {"chain": "slow", "inputs": {"text": text}}
    if model is not None:
        body["model"] = model
    response = httpx.post(f"{url}/v1/runs", json=body, timeout=10)
    assert response.status_code == expect, response.text
    run_id: str = response.json()["run_id"] if expect < 300 else ""
    return run_id


def read_events(
    url: str, run_id: str, after: int = 0, until: Any = None, timeout: float = 30
) -> list[dict[str, Any]]:
    """The events of one stream, to its end (or until ``until(events)`` is true: then cut)."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    text = ""
    deadline = time.monotonic() + timeout
    with (
        httpx.Client(timeout=timeout) as http,
        http.stream("GET", f"{url}/v1/runs/{run_id}/events", headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        for chunk in response.iter_text():
            text += chunk
            assert time.monotonic() < deadline, f"the stream did not end in {timeout} s: {text}"
            if until is not None and until(events_of(complete(text))):
                break
    return events_of(complete(text))


def tokens(n: int) -> Any:
    return lambda events: sum(e["type"] == "token" for e in events) >= n


def status(url: str, run_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/runs/{run_id}", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_two_servers_and_a_worker_serve_one_deployment(deployment: Deployment) -> None:
    a = deployment.serve(work_runs="false", max_concurrent_runs=2)
    b = deployment.serve(work_runs="false", max_concurrent_runs=2)
    deployment.worker(max_concurrent_runs=2)

    # started through A, streamed through B (cut mid-run), resumed through A
    first = start(a)
    assert status(b, first)["status"] in ("pending", "running")
    head = read_events(b, first, until=tokens(3))
    assert head[0]["type"] == "run-start" and head[0]["run_id"] == first
    rest = read_events(a, first, after=head[-1]["seq"])
    events = head + rest
    check_invariants(events)
    assert events[-1]["status"] == "succeeded"
    done_b, done_a = status(b, first), status(a, first)
    assert done_b["status"] == done_a["status"] == "succeeded"
    assert done_b["last_seq"] == events[-1]["seq"] and done_b["outputs"] == events[-1]["outputs"]
    assert done_b["outputs"]["answer"].startswith("[offline ")
    assert (
        httpx.get(f"{b}/v1/runs/{first}/events", params={"after": events[-1]["seq"]}).status_code
        == 204
    )

    # the limit holds across the deployment: two running (one through each), a third is 429
    second, third = start(a), start(b)
    refused = httpx.post(f"{b}/v1/runs", json={"chain": "slow", "inputs": {"text": TEXT}})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_runs"
    assert refused.headers["Retry-After"] == "1"

    # cancelled through B while A streams it; its slot is free again afterwards
    seen = read_events(a, second, until=tokens(2))
    cancel = httpx.post(f"{b}/v1/runs/{second}/cancel", timeout=10)
    assert cancel.status_code == 202 and cancel.json()["run_id"] == second
    t0 = time.monotonic()
    tail = read_events(a, second, after=seen[-1]["seq"])
    assert time.monotonic() - t0 < 5  # bounded: the owner got the cancel at once
    check_invariants(seen + tail)
    assert tail[-1]["type"] == "run-end" and tail[-1]["status"] == "cancelled"
    assert status(b, second)["status"] == "cancelled"
    assert status(a, second)["status"] == "cancelled"
    fourth = start(b)  # the cancelled run's slot is free
    for run_id in (third, fourth):
        check_invariants(read_events(a, run_id))
        assert status(b, run_id)["status"] == "succeeded"

    # unknown runs: 404 on every process
    for url in (a, b):
        gone = httpx.get(f"{url}/v1/runs/nope/events")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_run"
        assert httpx.get(f"{url}/v1/runs/nope").status_code == 404
        assert httpx.post(f"{url}/v1/runs/nope/cancel").status_code == 404
    assert deployment.redis.zcard("stagecast:admitted") == 0
    assert deployment.redis.xpending("stagecast:queue", "workers")["pending"] == 0


def test_an_input_stage_is_answered_through_another_process(deployment: Deployment) -> None:
    a = deployment.serve(work_runs="false", max_concurrent_runs=1)
    b = deployment.serve(work_runs="false", max_concurrent_runs=1)
    deployment.worker(max_concurrent_runs=1)
    created = httpx.post(f"{a}/v1/runs", json={"chain": "ask"}, timeout=10)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    head = read_events(b, run_id, until=lambda ev: ev and ev[-1]["type"] == "input-required")
    asked = head[-1]
    assert (asked["stage"], asked["path"]) == ("ask", ["ask"])
    deadline = time.monotonic() + 5  # the worker's status snapshot reaches the registry
    while status(a, run_id)["status"] != "waiting_input":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [p["stage"] for p in status(a, run_id)["pending_input"]] == ["ask"]
    # a waiting run holds no slot of the deployment: another run starts (the limit is 1)
    other = start(b)
    check_invariants(read_events(a, other))
    # the owner checks the answer: refused with the field path, through A
    bad = httpx.post(
        f"{a}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 99}}, timeout=10
    )
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"]["code"] == "invalid_answer"
    assert "value.count" in bad.json()["error"]["details"]["fields"]
    wrong = httpx.post(
        f"{a}/v1/runs/{run_id}/input", json={"stage": "after", "value": 1}, timeout=10
    )
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "not_waiting_input"
    assert wrong.json()["error"]["details"]["waiting"] == [{"stage": "ask", "path": ["ask"]}]
    good = httpx.post(
        f"{b}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 3}}, timeout=10
    )
    assert good.status_code == 202, good.text
    assert good.json() == {"run_id": run_id, "status": "running"}
    rest = read_events(a, run_id, after=asked["seq"])
    check_invariants(head + rest)
    assert rest[-1]["status"] == "succeeded" and rest[-1]["outputs"]["points"] == 3
    again = httpx.post(
        f"{b}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 3}}, timeout=10
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_waiting_input"


def settled(deployment: Deployment) -> None:
    """No run holds a slot or a queue entry (bounded: the owner acks just after the run-end)."""
    deadline = time.monotonic() + 5
    while (
        deployment.redis.zcard("stagecast:admitted")
        or deployment.redis.xpending("stagecast:queue", "workers")["pending"]
    ):
        assert time.monotonic() < deadline, "a finished run still holds a slot or queue entry"
        time.sleep(0.05)


def outline(events: list[dict[str, Any]]) -> list[str]:
    """The event sequence, one line per event, a stage's run of tokens as one line."""
    lines: list[str] = []
    for e in events:
        where = ""
        if e.get("path") is not None:
            where = " " + ".".join(str(p) for p in e["path"]) + f"#{e['attempt']}"
        line = e["type"] + where
        if e["type"] == "stage-progress":
            line += f" {e['completed']}/{e['total']}"
        if e["type"] in ("stage-end", "run-end"):
            line += f" {e['status']}"
        if e["type"] == "stage-retry":
            line += f" {e['error']['type']}"
        if not (e["type"] == "token" and lines and lines[-1] == line + " …"):
            lines.append(line + " …" if e["type"] == "token" else line)
    return lines


RELAY_CONTINUED_IN_SECOND = [
    "run-start",
    "stage-start first#1",
    "token first#1 …",
    "stage-end first#1 succeeded",
    "stage-start second#1",
    "token second#1 …",
    "stage-retry second#1 worker_lost",
    "stage-start second#2",
    "token second#2 …",
    "stage-end second#2 succeeded",
    "stage-start parts#1",
    "stage-start parts.0#1",
    "token parts.0#1 …",
    "stage-end parts.0#1 succeeded",
    "stage-progress parts#1 1/2",
    "stage-start parts.1#1",
    "token parts.1#1 …",
    "stage-end parts.1#1 succeeded",
    "stage-progress parts#1 2/2",
    "stage-end parts#1 succeeded",
    "stage-start third#1",
    "token third#1 …",
    "stage-end third#1 succeeded",
    "run-end succeeded",
]
"""A `relay` run whose worker was lost (killed, or shut down) while `second` streamed, as a viewer
across it sees it: `first` had ended and is not sent again, `second` runs again (attempt 2)."""


def relay(url: str) -> str:
    body = {"chain": "relay", "inputs": {"text": TEXT}}
    response = httpx.post(f"{url}/v1/runs", json=body, timeout=10)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def test_a_killed_worker_s_run_is_continued_from_its_ended_stages(deployment: Deployment) -> None:
    timeout = 1.0
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    whole = read_events(a, relay(a))  # the same run, never interrupted: what it ends with
    check_invariants(whole)
    assert whole[-1]["status"] == "succeeded"
    assert status(a, whole[0]["run_id"])["takeovers"] == 0

    run_id = relay(a)
    killed: dict[str, Any] = {}

    def kill_while_second_streams(events: list[dict[str, Any]]) -> bool:
        """One viewer across the kill: the owner dies once it streamed 3 tokens of `second`."""
        streamed = [e for e in events if e["type"] == "token" and e["stage"] == "second"]
        if not killed and len(streamed) >= 3:
            killed["worker"] = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker")
            os.kill(deployment.owner_pid(run_id), signal.SIGKILL)
            killed["at"], killed["seen"] = time.monotonic(), events[-1]["seq"]
        if killed and "retry" not in killed and any(e["type"] == "stage-retry" for e in events):
            killed["retry"] = time.monotonic()
        return False

    events = read_events(a, run_id, until=kill_while_second_streams, timeout=60)
    done = time.monotonic()
    check_invariants(events)  # seq 1..n, no gap, no duplicate, one run-start, one run-end
    lost = killed["worker"].decode()
    assert events[-1]["status"] == "succeeded", outline(events)
    # the exact sequence the viewer saw: `first` ended before the kill and is not sent again;
    # `second` was streaming: stage-retry (worker_lost), stage-start attempt 2, its tokens again
    assert outline(events) == RELAY_CONTINUED_IN_SECOND
    retry = next(e for e in events if e["type"] == "stage-retry")
    assert retry["seq"] > killed["seen"]  # written by the new owner, after what the viewer saw
    owner = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker").decode()
    assert owner != lost
    assert retry["error"] == {
        "type": "worker_lost",
        "message": f"the worker running this run ({lost}) stopped: no heartbeat for 1 s; "
        f"worker {owner} continues the run, and this stage runs again",
        "stage": "second",
    }
    # the lost attempt's tokens are discarded by the client; attempt 2 streams the whole answer
    second = [e for e in events if e["stage"] == "second" and e["type"] == "token"]
    again = "".join(e["text"] for e in second if e["attempt"] == 2)
    assert (
        again
        == next(e for e in events if e["type"] == "stage-end" and e["stage"] == "second")["output"]
    )
    assert killed["retry"] - killed["at"] < timeout + timeout / 2 + 5  # heartbeat + takeover
    assert done - killed["at"] < timeout + timeout / 2 + 20  # and the rest of the run
    # the outputs equal those of the run that was never interrupted
    assert events[-1]["outputs"] == whole[-1]["outputs"]
    ended = {e["stage"]: e["output"] for e in events if e["type"] == "stage-end"}
    assert ended == {e["stage"]: e["output"] for e in whole if e["type"] == "stage-end"}
    final = status(a, run_id)
    assert final["status"] == "succeeded" and final["takeovers"] == 1
    assert final["outputs"] == whole[-1]["outputs"] and final["last_seq"] == events[-1]["seq"]
    assert final["stages"]["first"]["status"] == "succeeded"
    assert final["stages"]["second"]["attempt"] == 2
    # the run's usage counts `first` once (it was not run again) and the lost attempt not at all
    assert final["usage"]["output_tokens"] == whole[-1]["usage"]["output_tokens"]
    # the survivor works the next run; nothing is left pending or holding a slot
    after = relay(a)
    check_invariants(read_events(a, after))
    settled(deployment)


def test_a_worker_that_shuts_down_hands_its_run_over_at_once(deployment: Deployment) -> None:
    timeout = 30.0  # the run must move long before a lost heartbeat would move it
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    first = deployment.worker(heartbeat_timeout=timeout)
    second = deployment.worker(heartbeat_timeout=timeout)
    whole = read_events(a, relay(a))  # the same run, never interrupted: what it ends with
    check_invariants(whole)
    run_id = relay(a)
    stopped: dict[str, Any] = {}

    def terminate_while_second_streams(events: list[dict[str, Any]]) -> bool:
        """One viewer across the shutdown: SIGTERM to the owner once `second` streamed 3."""
        streamed = [e for e in events if e["type"] == "token" and e["stage"] == "second"]
        if not stopped and len(streamed) >= 3:
            stopped["worker"] = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker")
            pid = deployment.owner_pid(run_id)
            stopped["process"] = first if pid == first.pid else second
            stopped["process"].send_signal(signal.SIGTERM)
            stopped["at"], stopped["seen"] = time.monotonic(), events[-1]["seq"]
        if stopped and "retry" not in stopped and any(e["type"] == "stage-retry" for e in events):
            stopped["retry"] = time.monotonic()
        return False

    events = read_events(a, run_id, until=terminate_while_second_streams, timeout=60)
    check_invariants(events)  # seq 1..n, no gap, no duplicate, one run-start, one run-end
    assert stopped["process"].wait(15) == 0  # it exits by itself, cleanly
    assert stopped["retry"] - stopped["at"] < 5  # at once: not after the 30 s heartbeat timeout
    handed = stopped["worker"].decode()
    owner = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker").decode()
    assert owner != handed
    assert events[-1]["status"] == "succeeded", outline(events)
    # nothing cancelled: `first` had ended and is not sent again, `second` runs again
    assert outline(events) == RELAY_CONTINUED_IN_SECOND
    retry = next(e for e in events if e["type"] == "stage-retry")
    assert retry["error"] == {
        "type": "worker_lost",
        "message": f"the worker running this run ({handed}) shut down and handed it over; "
        f"worker {owner} continues the run, and this stage runs again",
        "stage": "second",
    }
    assert events[-1]["outputs"] == whole[-1]["outputs"]
    final = status(a, run_id)
    assert final["status"] == "succeeded" and final["takeovers"] == 1
    assert final["usage"]["output_tokens"] == whole[-1]["usage"]["output_tokens"]
    assert deployment.redis.hget(f"stagecast:runs:{run_id}", "handover") is None
    settled(deployment)


def test_a_serve_process_that_shuts_down_hands_its_run_over(deployment: Deployment) -> None:
    timeout = 30.0  # the run must move long before a lost heartbeat would move it
    b = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    a = deployment.serve(heartbeat_timeout=timeout)  # the only process working runs, for now
    serving = deployment.processes[-1]
    run_id = relay(b)
    head = read_events(b, run_id, until=tokens(3))
    assert deployment.owner_pid(run_id) == serving.pid
    handed = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker").decode()
    deployment.worker(heartbeat_timeout=timeout)
    serving.send_signal(signal.SIGTERM)  # uvicorn's shutdown: the app's lifespan hands over
    stopped = time.monotonic()
    retried: list[float] = []

    def note_retry(events: list[dict[str, Any]]) -> bool:
        if not retried and any(e["type"] == "stage-retry" for e in events):
            retried.append(time.monotonic())
        return False

    rest = read_events(b, run_id, after=head[-1]["seq"], until=note_retry, timeout=60)
    events = head + rest
    check_invariants(events)
    # shut down within the bound (uvicorn re-raises the SIGTERM it handled once it is done)
    assert serving.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in deployment.log(f"serve-{a.rsplit(':', 1)[1]}")
    assert retried[0] - stopped < 5  # at once: not after the 30 s heartbeat timeout
    assert events[-1]["status"] == "succeeded", outline(events)
    assert not [e for e in events if e.get("status") == "cancelled"]
    owner = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker").decode()
    retry = next(e for e in rest if e["type"] == "stage-retry")
    assert retry["error"]["type"] == "worker_lost"
    assert retry["error"]["message"] == (
        f"the worker running this run ({handed}) shut down and handed it over; "
        f"worker {owner} continues the run, and this stage runs again"
    )
    assert status(b, run_id)["takeovers"] == 1
    settled(deployment)


def test_a_worker_whose_run_was_taken_over_stops_its_copy_and_does_not_claim_it_back(
    deployment: Deployment,
) -> None:
    """A worker taken for dead that is not: another took its waiting run over. At its next
    heartbeat it sees the registry's new owner, stops its copy (nothing more written) and
    leaves the queue entry with the new owner instead of re-claiming it."""
    timeout = 1.0
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    created = httpx.post(f"{a}/v1/runs", json={"chain": "ask"}, timeout=10)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    head = read_events(a, run_id, until=lambda ev: ev and ev[-1]["type"] == "input-required")
    r = deployment.redis
    pending = r.xpending_range("stagecast:queue", "workers", "-", "+", 10)
    assert len(pending) == 1
    entry = pending[0]["message_id"]
    # what a takeover by another worker ("ghost", a stand-in) leaves: the log fenced, the
    # registry naming it, the entry claimed (a heartbeat of the old owner between a real
    # taker's claim and its registry write may move the entry back once; the taker's own
    # heartbeat then re-claims it, and the old owner, seeing the registry, lets it be)
    r.set(f"stagecast:run:{run_id}:w", "ghost-token")
    r.hset(f"stagecast:runs:{run_id}", "worker", "ghost")
    r.xclaim("stagecast:queue", "workers", "ghost", 0, [entry], justid=True)
    # the ghost is alive: it re-claims its entry as a heartbeat does (so it never looks idle);
    # the old owner heartbeats every third of a second: a re-claim of its own would show here
    for _ in range(15):
        time.sleep(0.2)
        pending = r.xpending_range("stagecast:queue", "workers", "-", "+", 10)
        assert [(p["message_id"], p["consumer"]) for p in pending] == [(entry, b"ghost")]
        r.xclaim("stagecast:queue", "workers", "ghost", 0, [entry], justid=True)
    # the copy was stopped without a word in the log: no cancelled stage-end, no run-end
    last = r.xrevrange(f"stagecast:run:{run_id}", count=1)
    assert last[0][0].decode() == f"1-{head[-1]['seq']}"
    # an answer is no longer taken by the stopped copy: nobody there answers it in time
    answer = httpx.post(
        f"{a}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 3}}, timeout=15
    )
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "worker_unavailable"


def test_a_killed_worker_s_run_ends_failed_when_lost_runs_is_fail(
    deployment: Deployment,
) -> None:
    timeout = 1.0
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout, lost_runs="fail")
    deployment.worker(heartbeat_timeout=timeout, lost_runs="fail")
    run_id = start(a)
    head = read_events(a, run_id, until=tokens(3))
    pid = deployment.owner_pid(run_id)
    lost = deployment.redis.hget(f"stagecast:runs:{run_id}", "worker").decode()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    rest = read_events(a, run_id, after=head[-1]["seq"])  # the viewer is released
    waited = time.monotonic() - killed
    events = head + rest
    check_invariants(events)
    end = events[-1]
    assert end["status"] == "failed" and end["error"]["type"] == "worker_lost"
    assert end["error"]["message"] == (
        f"the worker running this run ({lost}) stopped: no heartbeat for 1 s; the run could "
        "not be continued (lost_runs is `fail`), so it ended failed (stages that had not ended "
        "are failed). Start a new run to try again"
    )
    # the stage that was streaming ended failed before the run-end, after its last token
    failed = [e for e in rest if e["type"] == "stage-end"]
    assert failed and failed[-1]["stage"] == "first" and failed[-1]["status"] == "failed"
    assert failed[-1]["error"]["type"] == "worker_lost"
    assert not [e for e in rest if e["type"] in ("stage-retry", "stage-start")]
    assert waited < timeout + timeout / 2 + 5, waited  # heartbeat timeout + takeover + bound
    final = status(a, run_id)
    assert final["status"] == "failed" and final["takeovers"] == 1
    assert final["error"]["type"] == "worker_lost"
    # the surviving worker works the next run; nothing is left pending or holding a slot
    after = start(a)
    check_invariants(read_events(a, after))
    assert status(a, after)["status"] == "succeeded"
    settled(deployment)


def test_an_input_stage_that_waited_on_a_killed_worker_asks_again(deployment: Deployment) -> None:
    timeout = 1.0
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    b = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    created = httpx.post(f"{a}/v1/runs", json={"chain": "ask"}, timeout=10)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    killed: list[float] = []

    def kill_while_waiting(events: list[dict[str, Any]]) -> bool:
        asked = [e for e in events if e["type"] == "input-required"]
        if asked and not killed:
            os.kill(deployment.owner_pid(run_id), signal.SIGKILL)
            killed.append(time.monotonic())
        return len(asked) == 2  # asked again by the new owner

    head = read_events(b, run_id, until=kill_while_waiting, timeout=30)
    assert time.monotonic() - killed[0] < timeout + timeout / 2 + 5
    assert outline(head) == [
        "run-start",
        "stage-start ask#1",
        "input-required ask#1",
        "stage-retry ask#1 worker_lost",
        "stage-start ask#2",
        "input-required ask#2",
    ]
    assert head[-1]["prompt"] == head[2]["prompt"] == "How many **points**?"
    deadline = time.monotonic() + 5  # the new owner's snapshot reaches the registry
    while (now := status(a, run_id))["status"] != "waiting_input" or not now["pending_input"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    assert now["takeovers"] == 1 and [p["stage"] for p in now["pending_input"]] == ["ask"]
    # the answer reaches the new owner through the other process
    good = httpx.post(
        f"{a}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 3}}, timeout=10
    )
    assert good.status_code == 202, good.text
    rest = read_events(a, run_id, after=head[-1]["seq"])
    check_invariants(head + rest)
    assert outline(rest) == [
        "stage-end ask#2 succeeded",
        "stage-start after#1",
        "token after#1 …",
        "stage-end after#1 succeeded",
        "run-end succeeded",
    ]
    assert rest[-1]["outputs"] == {"points": 3}
    settled(deployment)


def test_a_lost_run_that_cannot_be_continued_ends_failed_saying_why(
    deployment: Deployment,
) -> None:
    timeout = 1.0
    settings = {"heartbeat_timeout": timeout, "max_events_per_run": 12}
    a = deployment.serve(work_runs="false", **settings)
    first = deployment.worker(max_concurrent_runs=2, **settings)
    bounced, capped = start(a, model="slower"), start(a, model="slower")
    deployment.redis.hset(f"stagecast:runs:{bounced}", "takeovers", 3)  # 3 takeovers already
    deadline = time.monotonic() + 15  # both on the first worker, past the log's cap of 12
    while min(status(a, r)["last_seq"] for r in (bounced, capped)) < 16:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lost = deployment.redis.hget(f"stagecast:runs:{capped}", "worker").decode()
    assert deployment.owner_pid(bounced) == deployment.owner_pid(capped) == first.pid
    deployment.worker(**settings)
    os.kill(first.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout + timeout / 2 + 5
    while {status(a, r)["status"] for r in (bounced, capped)} != {"failed"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    why = {
        bounced: "it was taken over 3 times already",
        capped: r"its log starts at seq \d+: the first events were dropped "
        r"\(max_events_per_run 12\)",
    }
    for run_id, reason in why.items():
        final = status(a, run_id)
        assert final["takeovers"] == (4 if run_id == bounced else 1)
        message = final["error"]["message"]
        assert re.fullmatch(
            re.escape(f"the worker running this run ({lost}) stopped: no heartbeat for 1 s; ")
            + re.escape("the run could not be continued (")
            + reason
            + re.escape("), so it ended failed (stages that had not ended are failed). ")
            + "Start a new run to try again",
            message,
        ), message
        tail = read_events(a, run_id, after=final["last_seq"] - 2)
        assert [e["type"] for e in tail] == ["stage-end", "run-end"]
        assert tail[0]["status"] == "failed" and tail[0]["error"]["type"] == "worker_lost"
        assert tail[1]["error"]["message"] == message
    settled(deployment)


def test_redis_restarted_mid_run_gives_clear_errors_and_the_server_recovers(
    deployment: Deployment, redis_server: RedisServer
) -> None:
    # works its own runs; heartbeats every 1/3 s, so they also run while Redis is away and after
    # it came back empty (the queue entry is gone, the run must go on)
    a = deployment.serve(heartbeat_timeout=1)
    run_id = start(a, model="slower")  # ~5 s
    read_events(a, run_id, until=tokens(3))
    t0 = time.monotonic()
    redis_server.stop()
    # a stream open now ends (no run-end: the client resumes later); new requests get a 503
    with httpx.Client(timeout=15) as http:
        events = http.get(f"{a}/v1/runs/{run_id}/events")
        assert events.status_code == 503, events.text
        error = events.json()["error"]
        assert error["code"] == "event_log_unavailable"
        assert error["message"].startswith("the event log (Redis) is unavailable: ")
        assert events.headers["Retry-After"] == "1"
        create = http.post(f"{a}/v1/runs", json={"chain": "slow", "inputs": {"text": TEXT}})
        assert create.status_code == 503
        assert create.json()["error"]["message"].startswith("the run queue (Redis) is unavailable")
        assert http.get(f"{a}/healthz").status_code == 200  # the server did not crash
    assert time.monotonic() - t0 < 15
    redis_server.start()  # empty: no persistence
    time.sleep(1)  # a few heartbeats with the run's queue entry gone
    assert status(a, run_id)["status"] == "running"
    # the run went on without its log; its first events were lost with Redis: a clear 410
    deadline = time.monotonic() + 20
    while status(a, run_id)["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status(a, run_id)["status"] == "succeeded"
    lost = httpx.get(f"{a}/v1/runs/{run_id}/events", params={"after": "0"})
    assert lost.status_code == 410 and lost.json()["error"]["code"] == "events_expired"
    # and the deployment works again: a new run is queued, worked and streamed
    fresh = start(a)
    events_after = read_events(a, fresh)
    check_invariants(events_after)
    assert events_after[-1]["status"] == "succeeded"
    # the worker heartbeats again in the new Redis
    assert list(deployment.redis.scan_iter("stagecast:worker:*"))


def test_viewers_open_when_redis_stops_are_ended_saying_why(
    deployment: Deployment, redis_server: RedisServer
) -> None:
    a = deployment.serve(heartbeat_timeout=1)  # works the run
    b = deployment.serve(work_runs="false", heartbeat_timeout=1)
    run_id = start(a, model="slower")  # ~5 s
    texts: dict[str, str] = {"owner": "", "other": ""}
    ended: dict[str, float] = {}

    def view(name: str, url: str) -> None:
        """A raw SSE viewer: everything the server sends, to the end of the response."""
        with (
            httpx.Client(timeout=30) as http,
            http.stream("GET", f"{url}/v1/runs/{run_id}/events") as response,
        ):
            assert response.status_code == 200
            for chunk in response.iter_text():
                texts[name] += chunk
        ended[name] = time.monotonic()

    viewers = [
        threading.Thread(target=view, args=("owner", a), daemon=True),
        threading.Thread(target=view, args=("other", b), daemon=True),
    ]
    for viewer in viewers:
        viewer.start()
    deadline = time.monotonic() + 15
    while not all(tokens(3)(events_of(complete(t))) for t in texts.values()):
        assert time.monotonic() < deadline, texts
        time.sleep(0.02)
    stopped = time.monotonic()
    redis_server.stop()
    for viewer in viewers:
        viewer.join(15)
        assert not viewer.is_alive(), "a viewer was not released when Redis stopped"
    seen: dict[str, int] = {}
    for name, text in texts.items():
        assert ended[name] - stopped < 10, name
        events = events_of(complete(text))
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no dup
        assert "run-end" not in [e["type"] for e in events]  # not ended as if finished
        # the last line says why, as a comment every SSE parser skips
        last_line = text.rstrip("\n").rsplit("\n", 1)[-1]
        assert last_line.startswith(
            ": ended event_log_unavailable: the event log (Redis) is unavailable: "
        ), text[-300:]
        seen[name] = events[-1]["seq"]
    # a client that resumes while Redis is away retries, then gives up naming the server's error
    with (
        Client(b, max_reconnects=2, reconnect_delay=0.1) as client,
        pytest.raises(StreamLost) as lost,
    ):
        list(client.events(run_id, after=seen["other"]))
    assert lost.value.message.startswith(
        "the server answered 503 event_log_unavailable: the event log (Redis) is unavailable: "
    ), lost.value.message
    assert lost.value.message.endswith(f" (after event {seen['other']})")
    assert httpx.get(f"{a}/healthz", timeout=5).status_code == 200  # neither process crashed
    assert httpx.get(f"{b}/healthz", timeout=5).status_code == 200
    # Redis back, empty: the run went on meanwhile (its events written while Redis was away are
    # kept, bounded, and sent now). A resume either continues gap-free to the run-end or, when
    # events before the ones kept were lost with Redis, gets a clear 410: never a silent gap.
    redis_server.start()
    for name, url in (("owner", a), ("other", b)):
        with Client(url, max_reconnects=20, reconnect_delay=0.2) as client:
            try:
                rest = list(client.events(run_id, after=seen[name]))
            except StagecastError as exc:
                # 410: the stream is back from the events kept meanwhile; 404: not yet rewritten
                assert (exc.status, exc.code) in ((410, "events_expired"), (404, "unknown_run"))
            else:
                assert [e.seq for e in rest] == list(range(seen[name] + 1, rest[-1].seq + 1))
                assert rest[-1].type == "run-end"


def finished_here(url: str, count: int = 1) -> bool:
    """The process's own count of succeeded runs (its /metrics: read without Redis)."""
    wanted = f'stagecast_runs_finished_total{{status="succeeded"}} {count}'
    return wanted in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()


def test_a_run_that_ends_while_redis_is_away_gives_its_slot_back(
    deployment: Deployment, redis_server: RedisServer
) -> None:
    a = deployment.serve(max_concurrent_runs=1, heartbeat_timeout=1)
    run_id = start(a)
    read_events(a, run_id, until=tokens(3))
    redis_server.stop(keep_data=True)  # it comes back with its data: the slot is still taken
    deadline = time.monotonic() + 20
    while not finished_here(a):  # the run ends while Redis is away
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # away for longer than the owner waits for its log to be written (5 s), and than
    # heartbeat_timeout: the run's queue entry is idle when Redis is back
    time.sleep(6)
    redis_server.start()
    settled(deployment)  # the slot and the queue entry are given back (bounded)
    assert status(a, run_id)["status"] == "succeeded"
    whole = read_events(a, run_id)  # written while Redis was away: kept, sent once it returned
    check_invariants(whole)
    assert whole[-1]["status"] == "succeeded"
    # the deployment's one slot is free: a new run is taken, not refused with 429
    fresh = start(a)
    check_invariants(read_events(a, fresh))
    assert status(a, fresh)["status"] == "succeeded" and status(a, fresh)["takeovers"] == 0
    assert status(a, run_id)["takeovers"] == 0  # its own run, idle meanwhile: not taken over


def test_a_cancel_whose_control_message_was_lost_still_stops_the_run(
    deployment: Deployment,
) -> None:
    a = deployment.serve(heartbeat_timeout=1)  # works the run
    b = deployment.serve(work_runs="false", heartbeat_timeout=1)
    run_id = start(a, model="slower")  # ~5 s
    seen = read_events(b, run_id, until=tokens(3))
    # what a cancel writes when its pub/sub message reaches nobody (the owner's subscription
    # was reconnecting after Redis came back): the registry's flag, and no message
    deployment.redis.hset(f"stagecast:runs:{run_id}", "cancel", 1)
    asked = time.monotonic()
    # the owner reads its runs' cancel flags at each heartbeat (a third of heartbeat_timeout)
    with Client(b, max_reconnects=20, reconnect_delay=0.1) as client:
        rest = list(client.events(run_id, after=seen[-1]["seq"]))
    assert time.monotonic() - asked < 1 / 3 + 5, "the cancel did not reach the owner in time"
    assert rest[-1].type == "run-end" and rest[-1].status == "cancelled"
    assert [e.seq for e in rest] == list(range(seen[-1]["seq"] + 1, rest[-1].seq + 1))
    assert status(a, run_id)["status"] == "cancelled"
    settled(deployment)


def test_an_answer_to_a_run_no_worker_has_taken_yet_is_a_409_at_once(
    deployment: Deployment,
) -> None:
    a = deployment.serve(work_runs="false")  # no worker: the run stays queued
    created = httpx.post(f"{a}/v1/runs", json={"chain": "ask"}, timeout=10)
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    t0 = time.monotonic()
    early = httpx.post(
        f"{a}/v1/runs/{run_id}/input", json={"stage": "ask", "value": {"count": 3}}, timeout=10
    )
    assert time.monotonic() - t0 < 2  # not the 5 s wait for a worker that is not there
    assert early.status_code == 409, early.text
    assert early.json()["error"] == {
        "code": "not_waiting_input",
        "message": f"run {run_id!r} is not waiting for input (status: pending)",
        "details": {"status": "pending", "waiting": []},
    }


def test_a_worker_needs_a_shared_event_log(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGECAST_")}
    env["STAGECAST_EVENT_LOG"] = "memory"
    done = subprocess.run(
        [sys.executable, "-m", "stagecast.api.cli", "worker"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: stagecast worker needs a shared event log: set STAGECAST_EVENT_LOG (or "
        "event_log: in configs/server.yaml) to a Redis URL, e.g. redis://127.0.0.1:6379/0"
    )


def test_serve_with_workers_shares_the_runs_between_its_processes(deployment: Deployment) -> None:
    url = deployment.serve("--workers", "2")
    runs = [start(url) for _ in range(4)]
    for run_id in runs:  # each request on a new connection: any of the two processes answers
        events = read_events(url, run_id)
        check_invariants(events)
        assert events[-1]["status"] == "succeeded"
        assert status(url, run_id)["status"] == "succeeded"
    deadline = time.monotonic() + 10  # both processes heartbeat: two workers in the registry
    while len(list(deployment.redis.scan_iter("stagecast:worker:*"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
