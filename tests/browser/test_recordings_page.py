"""The demo page plays a recording: ``stagecast serve --recordings DIR``, pick one, watch it.

A real recorded run of advanced_summary (offline model) is served by its own server with a
recordings folder; the page offers it, plays it as a new run, and every stage ends as recorded.
A server without recordings shows no such control.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from stagecast.api.app import create_app
from stagecast.api.settings import ServerSettings
from stagecast.engine.events import event_to_json
from stagecast.engine.loading import load_chain
from stagecast.engine.offline import OfflineChatModel
from stagecast.engine.orchestrator import run_chain
from stagecast.engine.resources import SHIPPED_CHAINS
from tests.api.conftest import live_server
from tests.browser.conftest import TIMEOUT_MS

pytestmark = pytest.mark.browser


def record(path: Path) -> list[list[Any]]:
    """Record a run into ``path``; returns [stage, status] of its top-level stage-ends."""
    chain = load_chain(SHIPPED_CHAINS / "advanced_summary.yaml")
    document = (SHIPPED_CHAINS / "examples" / "quarterly_report.md").read_text(encoding="utf-8")

    async def collect() -> list[Any]:
        model = OfflineChatModel(delay_ms=1)
        return [e async for e in run_chain(chain, {"document": document}, model=model)]

    with ThreadPoolExecutor(1) as pool:  # playwright keeps a loop running on this thread
        events = pool.submit(asyncio.run, collect()).result(timeout=60)
    path.write_text("".join(event_to_json(e) + "\n" for e in events), encoding="utf-8")
    return [[e.stage, e.status] for e in events if e.type == "stage-end" and len(e.path) == 1]


@pytest.fixture(scope="module")
def recorded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    folder = tmp_path_factory.mktemp("recordings")
    events = record(folder / "quarterly-summary.ndjson")
    settings = ServerSettings(chains_dir=SHIPPED_CHAINS, recordings_dir=folder, retry_ms=500)
    with live_server(create_app(settings)) as url:
        yield url, events


def new_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    context = browser.new_context(base_url=url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def test_the_demo_page_plays_a_recording(browser: Any, recorded_server: tuple[str, Any]) -> None:
    url, recorded = recorded_server
    page, errors = new_page(browser, url)
    page.goto("/")
    page.wait_for_selector("body[data-ready] #recordings")
    options = page.locator("#recording option").all_inner_texts()
    assert options == ["quarterly-summary · Advanced summary"]
    page.select_option("#recording-speed", "4")
    page.click("#play-recording")
    page.wait_for_selector("#run[data-run-id]")
    run_id = page.evaluate("new URLSearchParams(location.search).get('run')")
    assert run_id == page.get_attribute("#run", "data-run-id")
    page.wait_for_selector('#run[data-run-status="succeeded"]')
    statuses = page.eval_on_selector_all(
        "#run [data-stage]", "rows => rows.map(r => [r.dataset.stage, r.dataset.status])"
    )
    assert statuses == recorded  # every stage row, as the recorded run ended it
    assert [s for s, _ in recorded] == ["sections", "section_summaries", "merge", "polish"]
    # the replay is a run of the server: its status route knows it, and says it succeeded
    status = page.evaluate(f"fetch('/v1/runs/{run_id}').then(r => r.json())")
    assert status["status"] == "succeeded"
    assert status["chain"]["id"] == "advanced_summary"
    # a reload resumes it like any run (replay of the log, then the end)
    page.reload()
    page.wait_for_selector(f'#run[data-run-id="{run_id}"][data-run-status="succeeded"]')
    page.context.close()
    assert not errors, errors


def test_no_recordings_no_control(browser: Any) -> None:
    settings = ServerSettings(chains_dir=SHIPPED_CHAINS)
    with live_server(create_app(settings)) as url:
        page, errors = new_page(browser, url)
        page.goto("/")
        page.wait_for_selector("body[data-ready]")
        assert page.locator("#recordings").count() == 0
        page.context.close()
    assert not errors, errors
