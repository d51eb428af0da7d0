"""Runs waiting for input: what 1,000 paused runs cost a real ``stagecast serve`` process.

Each run of the chain below streams a short intro, then pauses at an ``input`` stage. The
server runs with ``max_concurrent_runs`` = 8: the N runs are all accepted because a waiting run
holds no slot. Measured in the same run, side by side:

1. RSS per run while N runs wait (``input-required`` emitted, nothing running), against the
   baseline of the same server before the load;
2. the same N runs once answered and finished (still kept, within ``finished_run_ttl``): the
   cost of a waiting run beside that of a finished one;
3. ``GET /healthz`` latency while N runs wait (the event loop stays free), the latency of
   ``POST /v1/runs/{id}/input`` for 50 answers one at a time, and how long the other N - 50
   take to finish when they are all answered at once.

    python bench/bench_waiting.py              # 1,000 runs
    python bench/bench_waiting.py --runs 200
    python bench/bench_waiting.py --smoke      # 50 runs (tests/test_bench_smoke.py)

Target: < 100 KiB of RSS per waiting run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C
from bench_faults import ServeProcess

CHAIN = """\
id: wait
stages:
  - {id: intro, kind: llm, prompt: "Introduce the question about weather and storms."}
  - id: ask
    kind: input
    prompt: "{{ stages.intro.output }}"
    schema: {type: object, required: [score], properties: {score: {type: integer, minimum: 1}}}
  - {id: after, kind: llm, prompt: "Comment on {{ stages.ask.output.score }}"}
"""
MODELS = """\
default: quick
models:
  quick: {provider: offline}
"""
TARGET_KIB = 100


async def metric(http: Any, name: str) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SystemExit(f"no metric {name}")


async def until(http: Any, name: str, value: float, timeout: float) -> float:
    started = time.monotonic()
    while await metric(http, name) != value:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{name} never reached {value} (now {await metric(http, name)})")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def measure(server: ServeProcess, runs: int) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
        warm = (await http.post("/v1/runs", json={"chain": "wait"})).json()["run_id"]
        await until(http, "stagecast_runs_waiting_input", 1, 30)
        answer = {"stage": "ask", "path": ["ask"], "value": {"score": 1}}
        await http.post(f"/v1/runs/{warm}/input", json=answer)
        await until(http, "stagecast_runs_active", 0, 30)
        await asyncio.sleep(1.0)
        baseline_kib = C.proc_rss_kib(server.pid)[0]

        started = time.monotonic()
        ids: list[str] = []
        refused = 0
        for at in range(0, runs, 8):  # 8 at a time: each runs (a slot) until it pauses
            batch = await asyncio.gather(
                *(http.post("/v1/runs", json={"chain": "wait"}) for _ in range(min(8, runs - at)))
            )
            for response in batch:
                if response.status_code == 201:
                    ids.append(response.json()["run_id"])
                else:
                    refused += 1
            await until(http, "stagecast_runs_waiting_input", len(ids), 120)
        paused_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        waiting_kib = C.proc_rss_kib(server.pid)[0]
        health = []
        for _ in range(50):
            t0 = time.perf_counter()
            await http.get("/healthz")
            health.append((time.perf_counter() - t0) * 1000)

        answer_ms: list[float] = []

        async def answer_one(run_id: str) -> int:
            t0 = time.perf_counter()
            response = await http.post(f"/v1/runs/{run_id}/input", json=answer)
            answer_ms.append((time.perf_counter() - t0) * 1000)
            return response.status_code

        codes = [await answer_one(i) for i in ids[:50]]  # one at a time: the latency
        lone_ms, answer_ms[:] = list(answer_ms), []
        started = time.monotonic()
        codes += await asyncio.gather(*(answer_one(i) for i in ids[50:]))  # the rest at once
        await until(http, "stagecast_runs_active", 0, 120)
        finish_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        finished_kib = C.proc_rss_kib(server.pid)[0]
        statuses = await asyncio.gather(*(http.get(f"/v1/runs/{i}") for i in ids[:50]))
        ended = sorted({s.json()["status"] for s in statuses})
    n = max(len(ids), 1)
    return {
        "runs": runs,
        "accepted": len(ids),
        "refused": refused,
        "paused_in_s": paused_s,
        "baseline_kib": baseline_kib,
        "waiting_kib": waiting_kib,
        "finished_kib": finished_kib,
        "per_waiting_run_kib": (waiting_kib - baseline_kib) / n,
        "per_finished_run_kib": (finished_kib - baseline_kib) / n,
        "healthz_p50_ms": C.percentile(health, 50),
        "healthz_p99_ms": C.percentile(health, 99),
        "answer_p50_ms": C.percentile(lone_ms, 50),
        "answer_p99_ms": C.percentile(lone_ms, 99),
        "burst_answers": len(answer_ms),
        "answers_202": sum(1 for c in codes if c == 202),
        "all_finished_in_s": finish_s,
        "statuses": ended,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="50 runs")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 50
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "chains").mkdir()
        (workdir / "chains" / "wait.yaml").write_text(CHAIN)
        (workdir / "models.yaml").write_text(MODELS)
        env = {
            "STAGECAST_MAX_CONCURRENT_RUNS": "8",
            "STAGECAST_MAX_WAITING_RUNS": str(args.runs + 10),
        }
        server = ServeProcess(workdir, C.free_port(), ttl=600, env=env).start()
        try:
            report = asyncio.run(measure(server, args.runs))
        finally:
            server.stop()
    failures = []
    if report["accepted"] != args.runs:
        failures.append(f"{report['refused']} runs refused: waiting runs held slots?")
    if report["answers_202"] != report["accepted"] or report["statuses"] != ["succeeded"]:
        failures.append(f"answers: {report['answers_202']} accepted, statuses {report['statuses']}")
    if args.json:
        print(json.dumps({**report, "failures": failures}))
    else:
        C.header(f"Runs waiting for input: {args.runs} paused runs in one `stagecast serve`")
        mib = 1024
        print(
            C.table(
                ["what", "figure"],
                [
                    [
                        "runs accepted, 8 at a time (max_concurrent_runs = 8)",
                        f"{report['accepted']} of {args.runs}",
                    ],
                    ["all paused after", f"{report['paused_in_s']:.1f} s"],
                    ["server RSS before", f"{report['baseline_kib'] / mib:.1f} MiB"],
                    ["server RSS, all waiting", f"{report['waiting_kib'] / mib:.1f} MiB"],
                    [
                        "server RSS, all answered and finished",
                        f"{report['finished_kib'] / mib:.1f} MiB",
                    ],
                    ["RSS per waiting run", f"{report['per_waiting_run_kib']:.1f} KiB"],
                    [
                        "RSS per finished run (kept in its TTL)",
                        f"{report['per_finished_run_kib']:.1f} KiB",
                    ],
                    [
                        "GET /healthz while all wait, p50 / p99",
                        f"{report['healthz_p50_ms']:.1f} / {report['healthz_p99_ms']:.1f} ms",
                    ],
                    [
                        "POST …/input while the others wait, p50 / p99",
                        f"{report['answer_p50_ms']:.1f} / {report['answer_p99_ms']:.1f} ms",
                    ],
                    [
                        f"the other {report['burst_answers']} answered at once: all ended in",
                        f"{report['all_finished_in_s']:.1f} s",
                    ],
                ],
            )
        )
        verdict = "met" if report["per_waiting_run_kib"] < TARGET_KIB else "MISSED"
        print(
            f"\ntarget: < {TARGET_KIB} KiB RSS per waiting run: {verdict} "
            f"({report['per_waiting_run_kib']:.1f} KiB)"
        )
        for failure in failures:
            print(f"FAILED: {failure}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
