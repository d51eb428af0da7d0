"""Every benchmark still runs and prints its table (``--smoke``: tiny workloads, no timing asserts).

Each script runs in its own subprocess, as a user would run it; the whole module takes ~25 s.
``bench_faults.py`` is not here: tests/api/test_faults.py runs it in smoke mode and asserts on it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_server import REDIS_SERVER, unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench"

SCRIPTS = {
    "bench_inprocess.py": "Stagecast run_chain",
    "bench_memory.py": "per run: RSS growth",
    "bench_http.py": "sse-starlette, pre-built events",
    "bench_ttfe.py": "Stagecast POST /v1/runs?stream=true",
    "bench_concurrency.py": "lateness p50 ms",
    "bench_retrieval.py": "Stagecast (bm25s)",
    "bench_openai.py": "fast path, bare",
    "bench_redis.py": "Redis Streams log",
    "bench_reuse.py": "reuse, merge prompt edited",
    "bench_waiting.py": "RSS per waiting run",
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_runs_in_smoke_mode(script: str) -> None:
    if script == "bench_redis.py" and shutil.which(REDIS_SERVER) is None:
        unavailable("bench_redis.py needs redis-server")
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCH.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert SCRIPTS[script] in out.stdout
    assert "| " in out.stdout  # a table was printed
    assert "target:" in out.stdout or script == "bench_memory.py"
