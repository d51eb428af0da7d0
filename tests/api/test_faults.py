"""Load with faults, small enough for CI: ``bench/bench_faults.py --smoke`` against a real
``stagecast serve`` process (40 runs, a cancel storm on half, expiry after the TTL, SIGKILL with
and without a restart). The full-size figures come from the same script without ``--smoke``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_faults.py"


def test_cancel_storm_expiry_and_sigkill_have_clear_outcomes() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(result.stdout)
    print(json.dumps({k: v for k, v in report.items() if k != "broken"}, indent=1))
    assert report["failures"] == [], report["failures"]
    assert result.returncode == 0, result.stderr[-2000:]
    assert (report["runs"], report["cancelled"]) == (40, 20)
    assert report["broken"] == {}
    assert report["cancel_answers"] == [202]
    assert report["runs_kept_after_ttl"] == 0 and report["events_kept_after_ttl"] == 0
    # nothing accumulates: a second storm ends (after its TTL) where the first one did
    assert report["second_after_ttl_kib"] - report["after_ttl_kib"] < 8 * 1024
    assert report["after_ttl_kib"] <= report["peak_kib"]
    restarted, down = report["kills"]
    assert restarted["outcome"].startswith("StagecastError 404 unknown_run: no run ")
    assert down["outcome"].startswith("StreamLost: ")
    assert restarted["seconds_after_kill"] < 30 and down["seconds_after_kill"] < 30
