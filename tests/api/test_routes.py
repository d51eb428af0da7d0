"""Routes through TestClient: errors of one shape, limits, auth, chains, docs, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stagecast.api.catalog import plan_of
from stagecast.engine.loading import load_chain
from tests.api.conftest import CHAINS, ScriptedModel, make_app
from tests.api.sse_parse import events_of

THINGS = {"things": [1, 2]}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert "Traceback" not in response.text
    result: dict[str, Any] = body["error"]
    return result


def test_chains_list_and_detail(client: TestClient) -> None:
    chains = client.get("/v1/chains").json()["chains"]
    assert [c["id"] for c in chains] == ["ask", "broken", "endless", "parallel"]
    broken = chains[1]
    assert broken["error"] is not None and "broken.yaml" in broken["error"]
    detail = client.get("/v1/chains/parallel").json()
    assert detail["inputs_schema"]["required"] == ["things"]
    assert detail["inputs_schema"]["properties"]["topic"]["maxLength"] == 50
    assert [s["stage"] for s in detail["plan"]] == ["intro", "pieces", "merge"]
    assert detail["plan"][1] == {
        "stage": "pieces",
        "label": "Items",
        "kind": "map",
        "needs": ["intro"],
        "weight": 1.0,
        "fan_out": True,
    }


def test_chain_plan_matches_the_run_start_plan(client: TestClient) -> None:
    detail = client.get("/v1/chains/parallel").json()
    run = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS}).json()
    events = events_of(client.get(run["events_url"]).text)
    assert events[0]["plan"] == detail["plan"]
    assert [asdict(s) for s in plan_of(load_chain(CHAINS / "parallel.yaml"))] == detail["plan"]


def test_create_run_answers_201_with_location(client: TestClient) -> None:
    response = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS})
    assert response.status_code == 201
    body = response.json()
    run_id = body["run_id"]
    assert body == {
        "run_id": run_id,
        "status": "running",
        "events_url": f"/v1/runs/{run_id}/events",
        "status_url": f"/v1/runs/{run_id}",
        "cancel_url": f"/v1/runs/{run_id}/cancel",
    }
    assert response.headers["location"] == f"/v1/runs/{run_id}"
    events = events_of(client.get(body["events_url"]).text)
    status = client.get(f"/v1/runs/{run_id}").json()
    assert status["status"] == "succeeded"
    assert status["last_seq"] == events[-1]["seq"]
    assert status["stages"]["pieces"]["completed"] == 2
    assert status["stages"]["merge"]["status"] == "succeeded"
    assert status["outputs"] == {"merged": "alpha beta gamma"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (
            {"chain": "parallel", "inputs": {}},
            {"inputs.things": "required (One llm call per item)"},
        ),
        (
            {"chain": "parallel", "inputs": {"things": 3, "topik": "x"}},
            {
                "inputs.topik": "unknown input (did you mean 'topic'?)",
                "inputs.things": "expected array, got integer",
            },
        ),
        (
            {"chain": "parallel", "inputs": {"things": [], "topic": "x" * 51}},
            {"inputs.topic": "must have at most 50 characters (has 51)"},
        ),
    ],
)
def test_invalid_inputs_are_422_with_field_paths(
    client: TestClient, body: dict[str, Any], fields: dict[str, str]
) -> None:
    err = error(client.post("/v1/runs", json=body), 422)
    assert err["code"] == "invalid_inputs"
    assert err["details"] == {"fields": fields}


def test_malformed_request_is_422_with_field_paths(client: TestClient) -> None:
    err = error(client.post("/v1/runs", json={"inputs": [], "extra": 1}), 422)
    assert err["code"] == "invalid_request"
    assert set(err["details"]["fields"]) == {"chain", "inputs", "extra"}  # same scheme as inputs
    err = error(
        client.post("/v1/runs", content=b"{not json", headers={"content-type": "application/json"}),
        422,
    )
    assert err["code"] == "invalid_request"


def test_unknown_model_is_422(client: TestClient) -> None:
    err = error(
        client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS, "model": "nope"}), 422
    )
    assert err["code"] == "invalid_model"
    assert err["message"].startswith("unknown model 'nope'; models are: ")
    assert list(err["details"]["fields"]) == ["model"]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [
        ("GET", "/v1/chains/nope", "unknown_chain"),
        ("POST", "/v1/runs", "unknown_chain"),
        ("GET", "/v1/runs/run_nope", "unknown_run"),
        ("GET", "/v1/runs/run_nope/events", "unknown_run"),
        ("POST", "/v1/runs/run_nope/cancel", "unknown_run"),
        ("GET", "/v2/nothing", "not_found"),
    ],
)
def test_unknown_things_are_404(client: TestClient, method: str, path: str, code: str) -> None:
    body = {"chain": "nope", "inputs": {}} if method == "POST" and path == "/v1/runs" else None
    err = error(client.request(method, path, json=body), 404)
    assert err["code"] == code
    if code == "unknown_chain":
        assert err["message"].endswith("chains are: ask, broken, endless, parallel")


def test_chain_is_looked_up_by_id_never_by_path(client: TestClient) -> None:
    path = str(CHAINS / "parallel.yaml")  # exists on disk: still unknown to the API
    err = error(client.post("/v1/runs", json={"chain": path, "inputs": THINGS}), 404)
    assert err["code"] == "unknown_chain"
    assert err["details"]["chain"] == path


def test_broken_chain_is_a_clear_500(client: TestClient) -> None:
    err = error(client.post("/v1/runs", json={"chain": "broken"}), 500)
    assert err["code"] == "chain_invalid"
    assert err["message"].startswith("chain 'broken' does not load: ")


def test_body_over_the_limit_is_413() -> None:
    with TestClient(make_app(max_body_bytes=200)) as client:
        body = {"chain": "parallel", "inputs": {"things": ["x" * 300]}}
        err = error(client.post("/v1/runs", json=body), 413)
        assert err["code"] == "body_too_large"
        assert err["details"] == {"limit": 200}

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"chain": "parallel", "inputs": {"things": ["'
            yield b"y" * 300
            yield b'"]}}'

        err = error(
            client.post("/v1/runs", content=chunks(), headers={"content-type": "application/json"}),
            413,
        )
        assert err["code"] == "body_too_large"
        ok = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS})
        assert ok.status_code == 201


def test_api_keys_401_unless_given() -> None:
    with TestClient(make_app(api_keys=["k1", "k2"])) as client:
        err = error(client.get("/v1/chains"), 401)
        assert err["code"] == "unauthorized"
        assert err["message"].startswith("an API key is required")
        err = error(client.get("/v1/chains", headers={"Authorization": "Bearer bad"}), 401)
        assert err["message"] == "the API key is not valid"
        assert error(client.get("/metrics"), 401)["code"] == "unauthorized"
        assert client.get("/v1/chains", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert client.get("/v1/chains", headers={"X-API-Key": "k1"}).status_code == 200
        assert client.get("/v1/chains?api_key=k1").status_code == 200  # EventSource's way
        assert client.get("/healthz").status_code == 200


def test_concurrent_run_limit_is_429() -> None:
    app = make_app({"endless": ScriptedModel(forever=True, delay_ms=5)}, max_concurrent_runs=1)
    with TestClient(app) as client:
        first = client.post("/v1/runs", json={"chain": "endless"})
        assert first.status_code == 201
        response = client.post("/v1/runs", json={"chain": "endless"})
        err = error(response, 429)
        assert err["code"] == "too_many_runs"
        assert response.headers["retry-after"] == "1"
        client.post(first.json()["cancel_url"])
        client.get(first.json()["events_url"])  # ends with run-end cancelled
        assert client.post("/v1/runs", json={"chain": "endless"}).status_code == 201
        metrics = client.get("/metrics").text
        assert 'stagecast_runs_rejected_total{reason="limit"} 1\n' in metrics


def test_input_on_a_run_not_waiting_is_409(client: TestClient) -> None:
    run = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS}).json()
    client.get(run["events_url"])
    answer = {"stage": "ask", "path": ["ask"], "value": "x"}
    err = error(client.post(f"/v1/runs/{run['run_id']}/input", json=answer), 409)
    assert err["code"] == "not_waiting_input"
    assert err["message"] == (
        f"run {run['run_id']!r}: ask is not waiting for input; the run is not waiting for any "
        "(status: succeeded)"
    )
    assert err["details"] == {"status": "succeeded", "waiting": []}


def test_unexpected_errors_are_a_json_500_without_traceback(client: TestClient) -> None:
    def boom() -> None:
        raise RuntimeError("secret internals")

    client.app.state.stagecast.catalog.entries = boom  # type: ignore[attr-defined]
    response = client.get("/v1/chains")
    err = error(response, 500)
    assert err == {
        "code": "internal",
        "message": "internal server error (logged on the server)",
        "details": {},
    }
    assert "secret" not in response.text


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    run = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS}).json()
    events = events_of(client.get(run["events_url"]).text)
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = response.text
    for line in [
        "stagecast_runs_started_total 1",
        'stagecast_runs_finished_total{status="succeeded"} 1',
        "stagecast_runs_active 0",
        "stagecast_streams_active 0",
        f"stagecast_events_sent_total {len(events)}",
        'stagecast_stage_duration_seconds_count{kind="map",status="succeeded"} 1',
        'stagecast_stage_duration_seconds_bucket{kind="llm",status="succeeded",le="+Inf"} 1',
    ]:
        assert line + "\n" in text, line
    for line in text.splitlines():
        assert line.startswith("#") or line.startswith("stagecast_"), line


def test_openapi_documents_every_route_and_the_event_stream(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {
        "/",
        "/healthz",
        "/metrics",
        "/v1/chains",
        "/v1/chains/{chain_id}",
        "/v1/models",
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/events",
        "/v1/runs/{run_id}/cancel",
        "/v1/runs/{run_id}/input",
        "/v1/schema/events",
        "/v1/recordings",
        "/v1/replays",
    }
    events = spec["paths"]["/v1/runs/{run_id}/events"]["get"]["responses"]
    assert events["200"]["content"]["text/event-stream"]["itemSchema"] == {
        "$ref": "#/components/schemas/RunEvent"
    }
    assert set(events) >= {"200", "204", "400", "404", "410"}
    schemas = spec["components"]["schemas"]
    assert schemas["RunEvent"]["discriminator"]["propertyName"] == "type"
    assert "StageEnded" in schemas and "Token" in schemas
    served = client.get("/v1/schema/events").json()
    assert served["discriminator"]["mapping"]["run-end"] == "#/$defs/RunEnded"


def test_healthz_and_index(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "runs_active": 0}
    page = client.get("/?run=run_x")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/stagecast.js").headers["content-type"].startswith("text/javascript")


def test_cors_allows_every_origin_by_default(client: TestClient) -> None:
    response = client.options(
        "/v1/runs",
        headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    simple = client.get("/v1/chains", headers={"Origin": "http://example.test"})
    assert simple.headers["access-control-allow-origin"] == "*"
    assert "Location" in simple.headers["access-control-expose-headers"]


def test_an_event_stream_to_another_origin_has_the_cors_headers_and_every_event(
    client: TestClient,
) -> None:
    # the stream's body bypasses the middleware's send wrappers (DIRECT_SEND); its start must not
    origin = {"Origin": "http://example.test"}
    created = client.post("/v1/runs", json={"chain": "parallel", "inputs": THINGS}, headers=origin)
    response = client.get(created.json()["events_url"], headers=origin)
    assert response.headers["access-control-allow-origin"] == "*"
    assert "X-Stagecast-Run-Id".lower() in response.headers["access-control-expose-headers"].lower()
    events = events_of(response.text)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert (events[0]["type"], events[-1]["type"]) == ("run-start", "run-end")
    assert events[-1]["status"] == "succeeded"


def test_models_route_lists_entries_and_says_which_are_usable(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert {"endless", "fake", "offline"} == set(models)  # the test app's models file
    assert models["offline"]["usable"] is True and models["offline"]["provider"] == "offline"
    assert set(models["offline"]) == {
        "name",
        "provider",
        "model",
        "description",
        "usable",
        "why_not",
        "default",
    }


def test_unknown_run_is_404_even_with_a_malformed_cursor(client: TestClient) -> None:
    err = error(client.get("/v1/runs/run_nope/events?after=abc"), 404)
    assert err["code"] == "unknown_run"


def test_an_empty_last_event_id_means_no_id(client: TestClient) -> None:
    run = client.post("/v1/runs", json={"chain": "parallel", "inputs": {"things": []}}).json()
    response = client.get(f"/v1/runs/{run['run_id']}/events", headers={"Last-Event-ID": " "})
    assert response.status_code == 200 and "id: 1\n" in response.text


def test_a_lone_surrogate_in_inputs_does_not_break_the_run(client: TestClient) -> None:
    body = '{"chain": "parallel", "inputs": {"things": ["x\\ud800y"]}}'
    created = client.post("/v1/runs", content=body, headers={"content-type": "application/json"})
    assert created.status_code == 201, created.text
    events = client.get(f"/v1/runs/{created.json()['run_id']}/events").text
    assert '"status":"succeeded"' in events.rsplit("event: run-end", 1)[1]
    status = client.get(f"/v1/runs/{created.json()['run_id']}")
    assert status.status_code == 200 and status.json()["status"] == "succeeded"
