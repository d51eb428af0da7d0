"""The Python client's resume loop against scripted transports (no server)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from stagecast.api.client import Client, StagecastError, StreamLost
from stagecast.engine.events import RunEnded, Token, event_to_json

TOKEN = event_to_json(Token(run_id="r", seq=1, ts=1, stage="a", path=["a"], attempt=1, text="hi"))
END = event_to_json(RunEnded(run_id="r", seq=2, ts=2, status="succeeded"))


def sse(*frames: str) -> httpx.Response:
    body = "".join(f"event: x\ndata: {f}\nid: {i}\n\n" for i, f in enumerate(frames, 1))
    return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})


def scripted(*responses: httpx.Response) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return queue.pop(0)

    return httpx.MockTransport(handler), seen


def test_a_5xx_while_resuming_is_retried_with_the_cursor() -> None:
    transport, seen = scripted(
        sse(TOKEN),  # the stream ends before run-end: resume
        httpx.Response(503, text="upstream restarting"),
        sse(TOKEN, END),  # the server replays from the cursor; the duplicate is dropped
    )
    client = Client("http://stagecast.test", transport=transport, reconnect_delay=0)
    events = list(client.events("r"))
    assert [(e.type, e.seq) for e in events] == [("token", 1), ("run-end", 2)]
    assert [r.headers.get("last-event-id") for r in seen] == [None, "1", "1"]


def test_a_4xx_is_an_error_at_once_and_endless_5xx_gives_up() -> None:
    body = {"error": {"code": "unknown_run", "message": "no run 'r'", "details": {}}}
    transport, seen = scripted(httpx.Response(404, json=body))
    with pytest.raises(StagecastError, match="no run 'r'"):
        list(Client("http://s.test", transport=transport).events("r"))
    assert len(seen) == 1
    transport, seen = scripted(*[httpx.Response(502) for _ in range(3)])
    client = Client("http://s.test", transport=transport, max_reconnects=2, reconnect_delay=0)
    with pytest.raises(StreamLost) as lost:
        list(client.events("r"))
    assert str(lost.value) == (
        "0 stream_lost: the server answered 502 http_error: Bad Gateway (after event 0)"
    )
    assert len(seen) == 3
    # an API error body is quoted: what the server said is what the caller reads
    away = {
        "error": {
            "code": "event_log_unavailable",
            "message": "the event log (Redis) is unavailable: Connection refused",
            "details": {},
        }
    }
    transport, seen = scripted(sse(TOKEN), *[httpx.Response(503, json=away) for _ in range(2)])
    client = Client("http://s.test", transport=transport, max_reconnects=2, reconnect_delay=0)
    with pytest.raises(StreamLost) as lost:
        list(client.events("r"))
    assert lost.value.message == (
        "the server answered 503 event_log_unavailable: the event log (Redis) is unavailable: "
        "Connection refused (after event 1)"
    )
    assert [r.headers.get("last-event-id") for r in seen] == [None, "1", "1"]


def test_unreported_usage_reaches_a_client_and_the_status_as_reported_false(serve: Any) -> None:
    # the test server's scripted models stream no usage, like a local server that reports none
    url = serve()
    with Client(url) as client:
        handle = client.start_run("parallel", {"things": ["a", "b"]})
        events = list(client.events(handle.run_id))
        status = client.status(handle.run_id)
    ends = {(e.stage, len(e.path or [])): e for e in events if e.type == "stage-end"}
    assert (ends[("intro", 1)].usage.input_tokens, ends[("intro", 1)].usage.output_tokens) == (
        0,
        0,
    )  # a template calls no model: known to be zero
    assert ends[("intro", 1)].usage.reported
    item = ends[("pieces", 2)].usage
    assert (item.input_tokens, item.output_tokens, item.cost, item.reported) == (0, 0, None, False)
    assert ends[("pieces", 1)].usage.reported is False  # the map's sum over its items
    end = events[-1]
    assert isinstance(end, RunEnded) and end.status == "succeeded"
    assert end.usage.reported is False and end.usage.cost is None
    assert status["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cost": None,
        "reported": False,
    }
