"""Clients nobody here wrote, through a cutting proxy, against a live server: the npm
``eventsource`` and ``@microsoft/fetch-event-source`` (versions pinned in package.json and
package-lock.json beside this file, installed by tests/setup.sh; pytest never installs).

Each must get every event of its run exactly once, no empty message, and no run beyond the one
it meant to start, through repeated cuts mid-frame. Outside CI, a machine without node or the
packages skips with the reason; with CI=true that is a failure.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import ScriptedModel, live_server, make_app
from tests.conformance.cutproxy import CuttingProxy
from tests.setup_needed import node_with

HERE = Path(__file__).resolve().parent
PACKAGES = ("eventsource", "@microsoft/fetch-event-source")
BODY = {"chain": "parallel", "inputs": {"things": [1, 2, 3, 4]}}
CUTS = 6


def node_or_skip() -> str:
    return node_with(HERE, PACKAGES)


def runs_started(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    line = next(x for x in text.splitlines() if x.startswith("stagecast_runs_started_total "))
    return int(line.split()[1])


@pytest.mark.parametrize("client", ["eventsource", "fetch-event-source"])
def test_foreign_client_gets_every_event_once_through_cuts(client: str) -> None:
    node = node_or_skip()
    models = {"fake": ScriptedModel(tokens=[f"w{i} " for i in range(40)], delay_ms=4)}
    # retry_ms: the clients' reconnect delay; a grace period well above it
    app = make_app(models, retry_ms=100, disconnect_grace=10)
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with CuttingProxy(port, cuts=CUTS, low=200, high=6000, seed=16) as proxy:
            before = runs_started(url)
            result = subprocess.run(
                [node, str(HERE / "clients.mjs"), client, url, f"http://127.0.0.1:{proxy.port}"]
                + [json.dumps(BODY)],
                capture_output=True,
                text=True,
                timeout=90,
                cwd=HERE,
            )
            assert result.returncode == 0, result.stderr
            got = json.loads(result.stdout)
            created = runs_started(url) - before
            stats = proxy.stats
    seqs = got["seqs"]
    print(
        f"{client}: {len(seqs)} events, {len(stats.cuts)} cuts at bytes {stats.cuts} "
        f"({stats.shifted} moved off the id-line byte), {stats.connections} connections, "
        f"{created} run(s) created, {got['empty']} empty messages, {got['errors']} errors"
    )
    assert got["outcome"] == "run-end", got
    assert len(stats.cuts) == CUTS  # the run outlasted every planned cut
    assert seqs == list(range(1, len(seqs) + 1))  # every event once, in order
    assert got["types"][0] == "run-start" and got["types"][-1] == "run-end"
    assert got["types"].count("run-end") == 1
    assert got["types"].count("token") == 5 * 40  # 4 items and the merge, 40 tokens each
    assert got["empty"] == 0  # the opener and pings never reach the application
    assert created == 1  # retries re-attached to the same run
