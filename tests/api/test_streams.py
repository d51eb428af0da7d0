"""Event streams over real HTTP: uvicorn on 127.0.0.1, a free port, httpx clients.

Every test runs over both event logs (``serve`` below): the in-memory one and Redis Streams on a
real redis-server (skipped outside CI when there is none), so resume, no gap, no duplicate,
cancel and the cursor errors hold the same on both.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from stagecast.api.client import AsyncClient, Client
from tests.api.conftest import ScriptedModel
from tests.api.sse_parse import complete, events_of, parse_frames

pytestmark = pytest.mark.anyio

Serve = Callable[..., str]
THINGS = {"things": [1, 2, 3, 4, 5]}


@pytest.fixture
def serve(serve_on_both_logs: Serve) -> Serve:
    return serve_on_both_logs


def start(
    url: str, chain: str = "parallel", inputs: dict[str, Any] | None = None, **extra: Any
) -> str:
    body = {"chain": chain, "inputs": THINGS if inputs is None else inputs, **extra}
    response = httpx.post(f"{url}/v1/runs", json=body, timeout=5)
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def read_all(
    url: str,
    run_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> str:
    with httpx.Client(timeout=10) as http:
        response = http.get(f"{url}/v1/runs/{run_id}/events", headers=headers, params=params)
    assert response.status_code == 200, response.text
    return response.text


def check_invariants(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run-start"
    assert [e["type"] for e in events].count("run-end") == 1
    assert events[-1]["type"] == "run-end"


def test_finished_run_replays_whole_and_closes(serve: Serve) -> None:
    url = serve()
    run_id = start(url)
    text = read_all(url, run_id)  # follows live to the end, then the response ends
    frames = parse_frames(text)
    # the opener is lines, not a message: they share the first event's block
    assert text.startswith("retry: 2000\n: stagecast event stream v1\nevent: run-start\ndata: ")
    assert frames[0]["retry"] == "2000" and frames[0]["comment"] == ["stagecast event stream v1"]
    assert all("data" in f for f in frames)  # no block without data: no empty message
    events = events_of(text)
    check_invariants(events)
    assert events[-1]["status"] == "succeeded"
    # items ran in parallel: item tokens interleave (item 1 streams before item 0 ends)
    paths = [tuple(e["path"] or ()) for e in events]
    first_end_0 = paths.index(("pieces", 0), paths.index(("pieces", 0)) + 4)
    assert ("pieces", 1) in paths[:first_end_0]
    # a late replay of the finished run is byte-identical in its events, and closes
    again = read_all(url, run_id)
    assert events_of(again) == events
    last = events[-1]["seq"]
    response = httpx.get(f"{url}/v1/runs/{run_id}/events", params={"after": str(last)})
    assert response.status_code == 204  # at the end: EventSource stops reconnecting


def test_resume_after_drop_at_every_k_gives_each_event_once(serve: Serve) -> None:
    url = serve()
    run_id = start(url)
    full = events_of(read_all(url, run_id))
    n = len(full)
    assert n > 30
    with httpx.Client(timeout=10) as http:
        for k in range(0, n):
            # read k events, drop the connection, resume with Last-Event-ID
            got: list[dict[str, Any]] = []
            with http.stream("GET", f"{url}/v1/runs/{run_id}/events") as response:
                buffer = ""
                for chunk in response.iter_text():
                    buffer += chunk
                    got = events_of(complete(buffer))[:k]
                    if len(got) >= k:
                        break
            got = got[:k]
            headers = {"Last-Event-ID": str(k)} if k else {}
            rest = http.get(f"{url}/v1/runs/{run_id}/events", headers=headers)
            assert rest.status_code == 200
            assert got + events_of(rest.text) == full, k


class DropAfter(httpx.BaseTransport):
    """A real HTTP transport whose event streams break after every ``every`` SSE frames."""

    def __init__(self, every: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.every = every
        self.drops = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if not request.url.path.endswith("/events") or response.status_code != 200:
            return response
        transport = self

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                frames, buffer = 0, b""
                for chunk in response.stream:
                    buffer += chunk
                    *whole, buffer = buffer.split(b"\n\n")
                    for frame in whole:
                        yield frame + b"\n\n"
                        if b"\nid: " in frame:
                            frames += 1
                            if frames % transport.every == 0:
                                transport.drops += 1
                                raise httpx.ReadError("dropped by the test")

            def close(self) -> None:
                response.close()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Cut(), request=request
        )


@pytest.mark.parametrize("every", [1, 2, 3, 7, 13])
def test_client_resumes_live_run_by_itself(serve: Serve, every: int) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=2)})
    transport = DropAfter(every)
    with Client(url, transport=transport, reconnect_delay=0.0, max_reconnects=3) as client:
        run = client.start_run("parallel", THINGS)
        seen = [e.seq for e in client.events(run.run_id)]
    full = events_of(read_all(url, run.run_id))
    assert seen == [e["seq"] for e in full]
    assert transport.drops >= len(full) // every - 1


async def test_two_viewers_see_identical_streams(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=3)})
    run_id = start(url)
    texts: list[str] = ["", ""]

    async def view(i: int) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(f"{url}/v1/runs/{run_id}/events")
            texts[i] = response.text

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(view, 0)
            group.start_soon(view, 1)
    assert events_of(texts[0]) == events_of(texts[1])
    check_invariants(events_of(texts[0]))


async def test_cancel_mid_stream_ends_cancelled_and_closes_the_model(serve: Serve) -> None:
    record: list[str] = []
    url = serve(models={"endless": ScriptedModel(forever=True, delay_ms=2, record=record)})
    async with AsyncClient(url) as client:
        run = await client.start_run("endless")
        types: list[str] = []
        with anyio.fail_after(5):
            async for event in client.events(run.run_id):
                types.append(event.type)
                if types.count("token") == 3:
                    answer = await client.cancel(run.run_id)
                    assert answer["run_id"] == run.run_id
                if event.type == "run-end":
                    assert event.status == "cancelled"
        # the cancel is idempotent on a finished run
        again = await client.http.post(f"/v1/runs/{run.run_id}/cancel")
        assert again.status_code == 202 and again.json()["status"] == "cancelled"
        status = await client.status(run.run_id)
    assert types[:3] == ["run-start", "stage-start", "token"]
    assert types[-2:] == ["stage-end", "run-end"]
    assert status["status"] == "cancelled"
    assert status["stages"]["talk"]["status"] == "cancelled"
    assert record == ["open", "closed"]  # the model's stream was closed, not finished


async def test_stream_true_cancels_on_disconnect(serve: Serve) -> None:
    record: list[str] = []
    url = serve(
        models={"endless": ScriptedModel(forever=True, delay_ms=2, record=record)},
        disconnect_grace=0,  # the grace period has its own tests (test_idempotency.py)
    )
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        with anyio.fail_after(5):
            async with http.stream(
                "POST",
                "/v1/runs",
                params={"stream": "true"},
                json={"chain": "endless", "inputs": {}},
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
                run_id = response.headers["x-stagecast-run-id"]
                assert response.headers["content-location"] == f"/v1/runs/{run_id}/events"
                text = ""
                async for chunk in response.aiter_text():
                    text += chunk
                    if "event: token" in text:
                        break
            # the connection is closed: the server cancels the run. Wait for that before
            # replaying: a viewer attached before the server saw the disconnect would (rightly)
            # keep the run going, since it is cancelled only when its last viewer leaves.
            while (await http.get(f"/v1/runs/{run_id}")).json()["status"] == "running":
                await anyio.sleep(0.01)
            replay = await http.get(f"/v1/runs/{run_id}/events")
        events = events_of(replay.text)
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "cancelled"
    assert record == ["open", "closed"]


async def test_stream_true_with_continue_survives_disconnect(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=3)})
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        with anyio.fail_after(10):
            async with http.stream(
                "POST",
                "/v1/runs?stream=true",
                json={"chain": "parallel", "inputs": THINGS, "on_disconnect": "continue"},
            ) as response:
                run_id = response.headers["x-stagecast-run-id"]
                async for chunk in response.aiter_text():
                    if "event: token" in chunk:
                        break
            replay = await http.get(f"/v1/runs/{run_id}/events")
    events = events_of(replay.text)
    check_invariants(events)
    assert events[-1]["status"] == "succeeded"


def test_run_outlives_its_viewers_and_a_late_viewer_replays_all(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(delay_ms=3)})
    run_id = start(url)
    with httpx.Client(timeout=5) as http:
        with http.stream("GET", f"{url}/v1/runs/{run_id}/events") as response:
            first = next(response.iter_text())  # the viewer leaves early
        assert "retry: 2000" in first
        late = http.get(f"{url}/v1/runs/{run_id}/events")  # follows to the end
        # the server lets a viewer go just after its last write: allow it that moment
        deadline = time.monotonic() + 2
        status = http.get(f"{url}/v1/runs/{run_id}").json()
        while status["viewers"] and time.monotonic() < deadline:
            time.sleep(0.01)
            status = http.get(f"{url}/v1/runs/{run_id}").json()
    events = events_of(late.text)
    check_invariants(events)
    assert events[-1]["status"] == "succeeded"
    assert status["status"] == "succeeded" and status["viewers"] == 0
    assert status["outputs"] == events[-1]["outputs"]


def test_heartbeat_pings_an_idle_stream(serve: Serve) -> None:
    url = serve(models={"endless": ScriptedModel(forever=True, delay_ms=400)}, ping_interval=0.05)
    run_id = start(url, "endless", {})
    with httpx.Client(timeout=5) as http:
        with http.stream("GET", f"{url}/v1/runs/{run_id}/events") as response:
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            assert "content-encoding" not in response.headers
            text = ""
            for chunk in response.iter_text():
                text += chunk
                if text.count(": ping\n") >= 2:
                    break
        http.post(f"{url}/v1/runs/{run_id}/cancel")
    assert ": ping\n\n" not in text  # a ping is a comment line: never a message of its own
    assert text.endswith(": ping\n")
    frames = parse_frames(complete(text))
    assert frames[0]["retry"] == "2000"
    assert all("data" in f for f in frames)  # every dispatched block is an event


def test_raw_socket_disconnect_frees_the_stream(serve: Serve) -> None:
    # no grace period: the replay below would otherwise be a viewer back in time (it keeps the
    # run going, test_idempotency.py)
    url = serve(models={"endless": ScriptedModel(forever=True, delay_ms=5)}, disconnect_grace=0)
    run_id = start(url, "endless", {}, on_disconnect="cancel")
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET /v1/runs/{run_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        received = b""
        while b"event: token" not in received:
            received += sock.recv(65536)
    # the last viewer of an on_disconnect=cancel run left: the run ends cancelled
    events = events_of(read_all(url, run_id))
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "cancelled"
    metrics = httpx.get(f"{url}/metrics").text
    assert "stagecast_streams_active 0\n" in metrics
    assert 'stagecast_runs_finished_total{status="cancelled"} 1\n' in metrics


@pytest.mark.parametrize(
    ("where", "value", "status", "code"),
    [
        ("header", "abc", 400, "invalid_cursor"),
        ("query", "-1", 400, "invalid_cursor"),
        ("query", "1.5", 400, "invalid_cursor"),
        ("query", "999999", 400, "cursor_past_end"),
        ("header", "100000", 400, "cursor_past_end"),
    ],
)
def test_bad_cursors_get_a_clear_4xx(
    serve: Serve, where: str, value: str, status: int, code: str
) -> None:
    url = serve()
    run_id = start(url)
    read_all(url, run_id)
    kwargs: dict[str, Any] = (
        {"headers": {"Last-Event-ID": value}} if where == "header" else {"params": {"after": value}}
    )
    response = httpx.get(f"{url}/v1/runs/{run_id}/events", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    if code == "invalid_cursor":
        name = "Last-Event-ID" if where == "header" else "after"
        assert error["message"].startswith(f"{name}: {value!r} is not an event id")
    else:
        assert "is past the end of run" in error["message"]


def test_coalesce_ms_per_request_merges_tokens_and_is_bounded(serve: Serve) -> None:
    url = serve(models={"fake": ScriptedModel(tokens=["a", "b", "c", "d", "e", "f"], delay_ms=2)})

    def tokens_by_path(events: list[dict[str, Any]]) -> dict[tuple[Any, ...], str]:
        texts: dict[tuple[Any, ...], str] = {}
        for e in events:
            if e["type"] == "token":
                key = tuple(e["path"])
                texts[key] = texts.get(key, "") + e["text"]
        return texts

    plain = events_of(read_all(url, start(url)))
    merged = events_of(read_all(url, start(url, coalesce_ms=500)))
    check_invariants(merged)
    count = [sum(e["type"] == "token" for e in events) for events in (plain, merged)]
    assert count[1] < count[0]
    assert tokens_by_path(merged) == tokens_by_path(plain)
    response = httpx.post(
        f"{url}/v1/runs", json={"chain": "parallel", "inputs": THINGS, "coalesce_ms": 5000}
    )
    assert response.status_code == 422
    assert "coalesce_ms" in str(response.json()["error"]["details"])
