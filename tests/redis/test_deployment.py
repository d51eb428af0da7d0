"""A deployment on Redis, in real processes: `stagecast serve` x2 and `stagecast worker`.

Every process is a subprocess of the installed CLI on 127.0.0.1 (free ports), sharing one real
redis-server (``redis_url``; skipped outside CI without one). No sticky routing: each request
goes to whichever process the test picks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

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


def test_a_killed_worker_s_run_ends_failed_within_the_heartbeat_timeout(
    deployment: Deployment,
) -> None:
    timeout = 1.0
    a = deployment.serve(work_runs="false", heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    deployment.worker(heartbeat_timeout=timeout)
    run_id = start(a)
    head = read_events(a, run_id, until=tokens(3))
    pid = deployment.owner_pid(run_id)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    rest = read_events(a, run_id, after=head[-1]["seq"])  # the viewer is released
    waited = time.monotonic() - killed
    events = head + rest
    check_invariants(events)
    end = events[-1]
    assert end["status"] == "failed" and end["error"]["type"] == "worker_lost"
    assert f"no heartbeat for {timeout:g} s" in end["error"]["message"]
    assert "Start a new run to try again" in end["error"]["message"]
    # the stage that was streaming ended failed before the run-end, after its last token
    failed = [e for e in rest if e["type"] == "stage-end"]
    assert failed and failed[-1]["stage"] == "first" and failed[-1]["status"] == "failed"
    assert failed[-1]["error"]["type"] == "worker_lost"
    assert waited < timeout + timeout / 2 + 5, waited  # heartbeat timeout + takeover + bound
    assert status(a, run_id)["status"] == "failed"
    assert status(a, run_id)["error"]["type"] == "worker_lost"
    # the surviving worker works the next run; nothing is left pending or holding a slot
    after = start(a)
    check_invariants(read_events(a, after))
    assert status(a, after)["status"] == "succeeded"
    assert deployment.redis.zcard("stagecast:admitted") == 0
    assert deployment.redis.xpending("stagecast:queue", "workers")["pending"] == 0


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
