"""Load with faults against a real ``stagecast serve`` process on 127.0.0.1.

1. **Cancel storm**: N concurrent runs (500 by default), each followed over SSE; once every run
   has streamed its first token, half of them are cancelled at the same moment. Every run must
   end with exactly one ``run-end``, last, with gap-free ``seq``: ``cancelled`` for the cancelled
   half, ``succeeded`` for the rest.
2. **Memory after the TTL**: the server's RSS before the load, at its peak, and once the
   finished runs have expired (``finished_run_ttl``), with the runs and events it still keeps;
   then the same storm again: what the first left behind is reused, nothing accumulates.
3. **SIGKILL mid-run**: the server is killed with SIGKILL while the Python client
   (``stagecast.api.client``) follows a run, then restarted on the same port: the client must
   end with an error it can show (the run is unknown to the new process), within a bound. A
   second client follows a server that stays down: it must give up (``StreamLost``), bounded.

    python bench/bench_faults.py               # 500 runs
    python bench/bench_faults.py --runs 100    # lighter
    python bench/bench_faults.py --smoke       # 40 runs (CI runs this through the test suite)

Exits non-zero when any run breaks a rule, so it doubles as a test (tests/api/test_faults.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

CHAIN = """\
id: storm
stages:
  - {id: first, kind: llm, prompt: "Write about storms and weather."}
  - {id: second, kind: llm, prompt: "Continue: {{ stages.first.output }}"}
  - {id: third, kind: llm, prompt: "Finish: {{ stages.second.output }}"}
"""
MODELS = """\
default: tick
models:
  tick: {{provider: offline, delay_ms: {delay_ms}}}
"""


STORM = """
import asyncio, json, sys, time
import httpx

async def main():
    ids = json.loads(sys.stdin.read())
    async with httpx.AsyncClient(base_url=sys.argv[1], timeout=60) as http:
        await http.get("/healthz")
        started = time.monotonic()
        answers = await asyncio.gather(*(http.post(f"/v1/runs/{i}/cancel") for i in ids))
        seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "statuses": sorted({a.status_code for a in answers})}))

asyncio.run(main())
"""


class ServeProcess:
    """``python -m stagecast.api.cli serve`` configured through STAGECAST_* variables."""

    def __init__(
        self, workdir: Path, port: int, ttl: float, env: dict[str, str] | None = None
    ) -> None:
        self.workdir, self.port, self.ttl = workdir, port, ttl
        self.extra_env = env or {}
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> ServeProcess:
        env = {
            **os.environ,
            "STAGECAST_CHAINS_DIR": str(self.workdir / "chains"),
            "STAGECAST_MODELS": str(self.workdir / "models.yaml"),
            "STAGECAST_MAX_CONCURRENT_RUNS": "5000",
            "STAGECAST_FINISHED_RUN_TTL": str(self.ttl),
            "STAGECAST_PING_INTERVAL": "5",
            **self.extra_env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stagecast.api.cli", "serve", "--port", str(self.port)],
            cwd=self.workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"stagecast serve exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise SystemExit("stagecast serve did not listen in time")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Follow:
    run_id: str
    cancel: bool
    seqs: list[int] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    end_status: str | None = None
    first_token: asyncio.Event = field(default_factory=asyncio.Event)

    def problems(self) -> list[str]:
        out = []
        if self.seqs != list(range(1, len(self.seqs) + 1)):
            out.append("seq has gaps or repeats")
        if self.types.count("run-end") != 1 or self.types[-1:] != ["run-end"]:
            out.append(f"{self.types.count('run-end')} run-end(s), last {self.types[-1:]}")
        wanted = "cancelled" if self.cancel else "succeeded"
        if self.end_status != wanted:
            out.append(f"ended {self.end_status}, expected {wanted}")
        return out


async def follow(http: Any, run: Follow) -> None:
    async with http.stream("GET", f"/v1/runs/{run.run_id}/events") as response:
        buffer = ""
        async for text in response.aiter_text():
            buffer += text
            cut = buffer.rfind("\n\n") + 2
            complete, buffer = buffer[:cut], buffer[cut:]
            for block in complete.split("\n\n"):
                data = next((ln[6:] for ln in block.split("\n") if ln.startswith("data: ")), None)
                if data is None:
                    continue
                event = json.loads(data)
                run.seqs.append(event["seq"])
                run.types.append(event["type"])
                if event["type"] == "token":
                    run.first_token.set()
                if event["type"] == "run-end":
                    run.end_status = event["status"]
                    run.first_token.set()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


async def storm(server: ServeProcess, runs: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=runs + 50, max_keepalive_connections=runs + 50)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
        # warm-up, then the baseline once the warm-up runs have expired
        warm = [
            Follow((await http.post("/v1/runs", json={"chain": "storm"})).json()["run_id"], False)
        ]
        await follow(http, warm[0])
        await asyncio.sleep(2 * server.ttl + 1.5)
        baseline_kib = C.proc_rss_kib(server.pid)[0]

        started = time.monotonic()
        created = await asyncio.gather(
            *(http.post("/v1/runs", json={"chain": "storm"}) for _ in range(runs))
        )
        follows = [Follow(r.json()["run_id"], i % 2 == 0) for i, r in enumerate(created)]
        tasks = [asyncio.create_task(follow(http, f)) for f in follows]
        await asyncio.wait_for(asyncio.gather(*(f.first_token.wait() for f in follows)), 120)
        # the storm comes from a process of its own: this one is busy reading N streams
        ids = [f.run_id for f in follows if f.cancel]
        storm_proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STORM,
            server.url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await storm_proc.communicate(json.dumps(ids).encode())
        storm_report = json.loads(out)
        cancel_s = storm_report["seconds"]
        peak_kib = C.proc_rss_kib(server.pid)[0]
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        elapsed = time.monotonic() - started
        ended_kib = C.proc_rss_kib(server.pid)[0]

        await asyncio.sleep(2 * server.ttl + 1.5)  # expired, and a sweep after that
        text = (await http.get("/metrics")).text
        after_kib = C.proc_rss_kib(server.pid)[0]
    broken = {f.run_id: f.problems() for f in follows if f.problems()}
    return {
        "runs": runs,
        "cancelled": sum(f.cancel for f in follows),
        "cancel_answers": storm_report["statuses"],
        "cancel_storm_s": cancel_s,
        "elapsed_s": elapsed,
        "events": sum(len(f.seqs) for f in follows),
        "broken": broken,
        "baseline_kib": baseline_kib,
        "peak_kib": max(peak_kib, ended_kib),
        "after_ttl_kib": after_kib,
        "runs_kept_after_ttl": metric(text, "stagecast_runs_kept"),
        "events_kept_after_ttl": metric(text, "stagecast_eventlog_events"),
    }


async def kill_mid_run(server: ServeProcess, restart: bool) -> dict[str, Any]:
    from stagecast.api.client import AsyncClient, StagecastError, StreamLost

    seen = 0
    outcome = "hung"
    started = time.monotonic()
    async with AsyncClient(server.url, reconnect_delay=0.2) as client:
        handle = await client.start_run("storm", {})
        try:
            async for _event in client.events(handle.run_id):
                seen += 1
                if seen == 20:
                    server.kill()
                    killed = time.monotonic()
                    if restart:
                        server.start()
            outcome = "ended normally (impossible: the process that ran it is gone)"
        except StreamLost as exc:
            outcome = f"StreamLost: {exc.message}"
        except StagecastError as exc:
            outcome = f"StagecastError {exc.status} {exc.code}: {exc.message}"
    return {
        "restart": restart,
        "events_before_kill": seen,
        "outcome": outcome,
        "seconds_after_kill": time.monotonic() - killed,
        "total_s": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--ttl", type=float, default=3.0, help="finished_run_ttl of the server")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=250,
        help="offline model delay per token (runs last ~34 tokens x this: long enough for "
        "every follower to connect before the storm)",
    )
    parser.add_argument("--smoke", action="store_true", help="40 runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON only")
    args = parser.parse_args()
    if args.smoke:  # 40 followers connect at once: shorter runs and a shorter TTL will do
        args.runs, args.delay_ms, args.ttl = 40, 60, 1.5
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "chains").mkdir()
        (workdir / "chains" / "storm.yaml").write_text(CHAIN)
        (workdir / "models.yaml").write_text(MODELS.format(delay_ms=args.delay_ms))
        server = ServeProcess(workdir, C.free_port(), args.ttl).start()
        try:
            report = asyncio.run(storm(server, args.runs))
            again = asyncio.run(storm(server, args.runs))  # a second storm: is anything kept?
            report["broken"].update(again["broken"])
            report["second_after_ttl_kib"] = again["after_ttl_kib"]
            report["second_peak_kib"] = again["peak_kib"]
            kills = [asyncio.run(kill_mid_run(server, restart=True))]
            kills.append(asyncio.run(kill_mid_run(server, restart=False)))
        finally:
            server.stop()
    report["kills"] = kills
    failures = [f"{rid}: {', '.join(p)}" for rid, p in report["broken"].items()]
    restarted, down = kills
    if not restarted["outcome"].startswith("StagecastError 404 unknown_run"):
        failures.append(f"after a restart the client got: {restarted['outcome']}")
    if not down["outcome"].startswith("StreamLost"):
        failures.append(f"with the server down the client got: {down['outcome']}")
    if report["second_after_ttl_kib"] - report["after_ttl_kib"] > 8 * 1024:
        failures.append("the second storm left more memory behind than the first (a leak?)")
    if report["runs_kept_after_ttl"] != 0 or report["events_kept_after_ttl"] != 0:
        failures.append("finished runs were not forgotten after their TTL")
    if args.json:
        print(json.dumps({**report, "failures": failures}))
    else:
        C.header(f"Load with faults: {args.runs} runs through `stagecast serve`, cancel storm")
        mib = 1024
        print(
            C.table(
                ["what", "figure"],
                [
                    ["runs (cancelled at once)", f"{report['runs']} ({report['cancelled']})"],
                    ["cancel storm answered in", f"{report['cancel_storm_s'] * 1000:.0f} ms"],
                    ["events received", f"{report['events']:,}"],
                    ["runs breaking a rule", str(len(report["broken"]))],
                    ["server RSS before", f"{report['baseline_kib'] / mib:.1f} MiB"],
                    ["server RSS at peak", f"{report['peak_kib'] / mib:.1f} MiB"],
                    ["server RSS after the TTL", f"{report['after_ttl_kib'] / mib:.1f} MiB"],
                    [
                        "second storm: RSS at peak / after the TTL",
                        f"{report['second_peak_kib'] / mib:.1f} / "
                        f"{report['second_after_ttl_kib'] / mib:.1f} MiB",
                    ],
                    [
                        "runs / events kept after the TTL",
                        f"{report['runs_kept_after_ttl']:g} / {report['events_kept_after_ttl']:g}",
                    ],
                    [
                        "SIGKILL + restart: client outcome",
                        f"{restarted['outcome'][:60]} after "
                        f"{restarted['seconds_after_kill']:.1f} s",
                    ],
                    [
                        "SIGKILL, server down: client outcome",
                        f"{down['outcome'][:60]} after {down['seconds_after_kill']:.1f} s",
                    ],
                ],
            )
        )
        print(
            "\ntarget: every run exactly one run-end with the right status; nothing kept after "
            f"the TTL; a clear client outcome after SIGKILL → {'met' if not failures else 'MISSED'}"
        )
        for failure in failures[:20]:
            print("  " + failure)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
