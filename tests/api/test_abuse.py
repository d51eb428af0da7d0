"""HTTP abuse over real loopback HTTP: malformed and hostile requests get a clear 4xx, never a 5xx
or a traceback; every protected route needs the key; nothing leaks a secret.

``STAGECAST_FUZZ_EXAMPLES`` sets the fuzzed requests per test (120 by default).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagecast.api.app import create_app
from stagecast.api.settings import ServerSettings
from stagecast.engine.model_config import ModelEntry, ModelsConfig
from stagecast.engine.providers import ModelRegistry
from tests.api.conftest import CHAINS, live_server

EXAMPLES = int(os.environ.get("STAGECAST_FUZZ_EXAMPLES", "120"))
KEY = "sk-test-abuse-0123456789"
SECRET = "sk-live-do-not-leak-987654321"

TYPED = """\
id: typed
inputs:
  s: {type: string, max_length: 40, min_length: 1}
  e: {type: string, enum: [en, ko], default: en}
  n: {type: integer, minimum: 1, maximum: 9, default: 3}
  f: {type: number, default: 0.5}
  b: {type: boolean, default: false}
  xs: {type: array, default: []}
  o: {type: object, default: {}}
stages:
  - id: echo
    kind: template
    text: "{{ inputs.s }} {{ inputs.e }} {{ inputs.n }} {{ inputs.f }} {{ inputs.b }}"
"""


class Seen:
    """Every response the test got: none may be a 5xx or show a traceback."""

    def __init__(self) -> None:
        self.responses: list[tuple[str, int, str]] = []

    def add(self, what: str, status: int, body: str) -> None:
        self.responses.append((what, status, body))
        assert status < 500, (what, status, body[:500])
        assert "Traceback" not in body, (what, body[:500])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    chains = tmp_path_factory.mktemp("chains")
    (chains / "typed.yaml").write_text(TYPED, encoding="utf-8")
    for name in ("parallel.yaml", "broken.yaml"):
        (chains / name).write_text((CHAINS / name).read_text(encoding="utf-8"))
    registry = ModelRegistry(
        ModelsConfig(
            default="offline",
            models={
                "offline": ModelEntry(provider="offline"),
                "fake": ModelEntry(provider="offline"),
                "remote": ModelEntry(
                    provider="openai",
                    model="gpt-x",
                    base_url="http://user:hunter2pass@127.0.0.1:9/v1?token=tok-secret-1",
                    api_key_env="ABUSE_KEY",
                ),
            },
        ),
        environ={"ABUSE_KEY": SECRET},
    )
    app = create_app(
        ServerSettings(chains_dir=chains, max_body_bytes=200_000, cors_origins=["*"]),
        models=registry,
    )
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    app = create_app(ServerSettings(chains_dir=CHAINS, api_keys=[KEY]))
    with live_server(app) as url:
        yield url


@pytest.fixture
def seen() -> Seen:
    return Seen()


def raw(url: str, request: bytes) -> tuple[int, bytes, bytes]:
    """Send bytes as they are (headers httpx would refuse); returns status, headers, body."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 1:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if data.startswith(b"HTTP/1.1 4") or data.startswith(b"HTTP/1.1 2"):
                    head, _, rest = data.partition(b"\r\n\r\n")
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length:")
                        ),
                        None,
                    )
                    if length is not None and len(rest) >= length:
                        break
                    if length is None and b"event: run-end" in rest:
                        break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, head, body


# -- malformed bodies -------------------------------------------------------------------------


def test_malformed_bodies_get_a_clear_4xx(server: str, seen: Seen) -> None:
    post = "/v1/runs"
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (
            "not json",
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            422,
            "invalid_request",
        ),
        (
            "text/plain",
            {"content": b'{"chain": "typed"}', "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        ("form", {"data": {"chain": "typed"}}, 415, "unsupported_media_type"),
        ("a list", {"json": [1, 2]}, 422, "invalid_request"),
        ("no chain", {"json": {"inputs": {}}}, 422, "invalid_request"),
        ("chain not a string", {"json": {"chain": {"x": 1}}}, 422, "invalid_request"),
        (
            "inputs not an object",
            {"json": {"chain": "typed", "inputs": [1]}},
            422,
            "invalid_request",
        ),
        (
            "unknown field",
            {"json": {"chain": "typed", "inputs": {"s": "a"}, "evil": 1}},
            422,
            "invalid_request",
        ),
        (
            "deeply nested",
            {
                "content": b"[" * 100_000 + b"]" * 100_000,
                "headers": {"content-type": "application/json"},
            },
            422,
            "invalid_request",
        ),
        (
            "nested objects",
            {
                "content": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
                "headers": {"content-type": "application/json"},
            },
            422,
            "invalid_request",
        ),
        (
            "over the limit",
            {
                "content": b'{"chain": "' + b"x" * 300_000 + b'"}',
                "headers": {"content-type": "application/json"},
            },
            413,
            "body_too_large",
        ),
        (
            "lone surrogate chain id",
            {"content": b'{"chain": "\\ud800"}', "headers": {"content-type": "application/json"}},
            404,
            "unknown_chain",
        ),
        ("NUL in chain id", {"json": {"chain": "typed\x00"}}, 404, "unknown_chain"),
        (
            "bad on_disconnect",
            {"json": {"chain": "typed", "inputs": {"s": "a"}, "on_disconnect": "explode"}},
            422,
            "invalid_request",
        ),
        (
            "negative coalesce",
            {"json": {"chain": "typed", "inputs": {"s": "a"}, "coalesce_ms": -5}},
            422,
            "invalid_request",
        ),
        (
            "model with CRLF",
            {"json": {"chain": "typed", "inputs": {"s": "a"}, "model": "x\r\nSet-Cookie: a=b"}},
            422,
            "invalid_model",
        ),
    ]
    with httpx.Client(base_url=server, timeout=10) as http:
        for name, request, status, code in cases:
            response = http.post(post, **request)
            seen.add(name, response.status_code, response.text)
            assert (response.status_code, response.json()["error"]["code"]) == (status, code), name
            assert "set-cookie" not in response.headers
    assert len(seen.responses) == len(cases)


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(server: str, seen: Seen) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"chain": "'
        for _ in range(40):
            yield b"x" * 10_000
        yield b'"}'

    with httpx.Client(base_url=server, timeout=10) as http:
        response = http.post(
            "/v1/runs", content=chunks(), headers={"content-type": "application/json"}
        )
    seen.add("chunked", response.status_code, response.text)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


# -- ids, cursors and headers -----------------------------------------------------------------


def test_path_traversal_in_chain_ids_finds_no_file(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        for path in (
            "/v1/chains/..%2F..%2Fetc%2Fpasswd",
            "/v1/chains/%2e%2e%2fconfigs%2fmodels",
            "/v1/chains/typed.yaml",
            "/v1/chains/TYPED",
            "/v1/chains/..",
        ):
            response = http.get(path)
            seen.add(path, response.status_code, response.text)
            assert response.status_code == 404, path
            assert "root:" not in response.text and "provider" not in response.text
        for chain in ("../../etc/passwd", "/etc/passwd", "..", "typed/../typed", "chains/typed"):
            response = http.post("/v1/runs", json={"chain": chain, "inputs": {"s": "a"}})
            seen.add(chain, response.status_code, response.text)
            assert (response.status_code, response.json()["error"]["code"]) == (
                404,
                "unknown_chain",
            ), chain


def test_bad_cursors_get_400_naming_the_field(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        run = http.post("/v1/runs", json={"chain": "typed", "inputs": {"s": "a"}}).json()
        url = f"/v1/runs/{run['run_id']}/events"
        for value in ("-1", "abc", "1e3", "9" * 30, "0x10", "+5", "5.0", "1,2"):
            response = http.get(url, params={"after": value})
            seen.add(f"after={value}", response.status_code, response.text)
            assert response.status_code == 400
            assert response.json()["error"]["message"].startswith(f"after: {value!r}")
            response = http.get(url, headers={"Last-Event-ID": value})
            seen.add(f"Last-Event-ID={value}", response.status_code, response.text)
            assert response.status_code == 400
            assert response.json()["error"]["message"].startswith(f"Last-Event-ID: {value!r}")
        past = http.get(url, params={"after": "999999"})
        seen.add("past", past.status_code, past.text)
        assert past.json()["error"]["code"] == "cursor_past_end"
    # values httpx will not send: non-ASCII bytes, and a second header after a bare LF (h11
    # reads it as a header of the request, httptools (uvicorn[standard]) refuses the request
    # with 400; either way it must never come back in the response)
    for value, status_wanted in (
        ("\u0663".encode(), (400,)),
        (b"\xff\xfe", (400,)),
        (b"1\nX-Injected: 1", (200, 400)),
    ):
        status, head, body = raw(
            server,
            b"GET " + url.encode() + b" HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + value + b"\r\n"
            b"Connection: close\r\n\r\n",
        )
        seen.add(f"raw {value!r}", status, body.decode("utf-8", "replace"))
        assert status in status_wanted, (value, head)
        assert b"x-injected" not in head.lower()


def test_ids_cannot_inject_headers(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        for run_id in ("run_x%0d%0aSet-Cookie:%20a=b", "run_%0aLocation:%20http://evil", "%00"):
            for path in (f"/v1/runs/{run_id}", f"/v1/runs/{run_id}/events"):
                response = http.get(path)
                seen.add(path, response.status_code, response.text)
                assert response.status_code == 404
                assert "set-cookie" not in response.headers
                assert "location" not in response.headers
                assert response.json()["error"]["code"] in ("unknown_run", "not_found")
            response = http.post(f"/v1/runs/{run_id}/cancel")
            seen.add("cancel " + run_id, response.status_code, response.text)
            assert response.status_code == 404


def test_cors_preflight_is_answered(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        response = http.options(
            "/v1/runs",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type, last-event-id, x-api-key",
            },
        )
    seen.add("preflight", response.status_code, response.text)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://app.example")
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert all(h in allowed for h in ("content-type", "last-event-id", "x-api-key"))


# -- keys and secrets ---------------------------------------------------------------------------


def _routes(url: str) -> list[tuple[str, str]]:
    spec = httpx.get(url + "/openapi.json", timeout=10).json()
    routes = []
    for path, operations in spec["paths"].items():
        concrete = path.replace("{chain_id}", "parallel").replace("{run_id}", "run_missing")
        routes += [(method.upper(), concrete) for method in operations]
    return routes + [("GET", "/static/stagecast.js"), ("GET", "/docs"), ("GET", "/openapi.json")]


def test_every_protected_route_needs_the_key_and_none_other_does(keyed: str, seen: Seen) -> None:
    routes = _routes(keyed)
    assert len(routes) >= 15
    protected = [r for r in routes if r[1].startswith("/v1/") or r[1] == "/metrics"]
    with httpx.Client(base_url=keyed, timeout=10) as http:
        for method, path in routes:
            body = {"json": {}} if method == "POST" else {}
            bare = http.request(method, path, **body)
            seen.add(f"{method} {path} (no key)", bare.status_code, bare.text)
            if (method, path) in protected:
                assert bare.status_code == 401, (method, path)
                assert bare.json()["error"]["code"] == "unauthorized"
                assert bare.headers["www-authenticate"] == "Bearer"
                wrong = http.request(method, path, headers={"X-API-Key": KEY + "x"}, **body)
                assert wrong.status_code == 401, (method, path)
                for auth in (
                    {"headers": {"Authorization": f"Bearer {KEY}"}},
                    {"headers": {"X-API-Key": KEY}},
                    {"params": {"api_key": KEY}},
                ):
                    ok = http.request(method, path, **auth, **body)
                    seen.add(f"{method} {path} (key)", ok.status_code, ok.text)
                    assert ok.status_code != 401, (method, path, auth)
            else:
                assert bare.status_code == 200, (method, path)


def test_models_and_metrics_leak_no_secret(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        for path in ("/v1/models", "/metrics", "/v1/chains", "/openapi.json"):
            response = http.get(path)
            seen.add(path, response.status_code, response.text)
            for secret in (SECRET, "hunter2pass", "tok-secret-1", "user:"):
                assert secret not in response.text, (path, secret)
        models = http.get("/v1/models").json()["models"]
    remote = next(m for m in models if m["name"] == "remote")
    assert remote["usable"] is True and remote["model"] == "gpt-x"


# -- fuzzed inputs ------------------------------------------------------------------------------

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=60),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=4),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=30, max_size=300),
    st.sampled_from(["", "en", "ko", "3", "true", "[1]", '{"a": 1}', "\x00", "x" * 50_000]),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def _nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


DEEP = st.builds(_nested, st.integers(min_value=1, max_value=900), st.sampled_from(["list", "obj"]))
INPUTS = st.dictionaries(
    st.sampled_from(["s", "e", "n", "f", "b", "xs", "o", "zz", "", "S", "\ud800"]),
    JSON_VALUES | DEEP,
    max_size=8,
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(inputs=INPUTS, model=st.sampled_from([None, "offline", "nope", "", 3]))
def test_fuzzed_inputs_get_201_or_a_4xx_with_field_paths(
    server: str, inputs: dict[str, Any], model: Any
) -> None:
    body: dict[str, Any] = {"chain": "typed", "inputs": inputs}
    if model is not None:
        body["model"] = model
    data = json.dumps(body).encode()  # ASCII: lone surrogates go as \\ud800 escapes
    response = httpx.post(
        server + "/v1/runs",
        content=data,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    Seen().add("fuzz", response.status_code, response.text)
    if response.status_code == 201:
        return
    error = response.json()["error"]
    assert response.status_code in (413, 422), error
    if response.status_code == 422:
        assert error["code"] in ("invalid_inputs", "invalid_model", "invalid_request"), error
        fields = error["details"]["fields"]
        assert fields and all(isinstance(v, str) and v for v in fields.values())
        if error["code"] == "invalid_inputs":
            assert all(key.startswith("inputs.") for key in fields), fields


def test_deeply_nested_inputs_are_refused_with_422(server: str, seen: Seen) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        for depth in (65, 500, 950):
            for kind, name in (("obj", "o"), ("list", "xs")):
                body = json.dumps(
                    {"chain": "typed", "inputs": {"s": "a", name: _nested(depth, kind)}}
                )
                response = http.post(
                    "/v1/runs", content=body, headers={"content-type": "application/json"}
                )
                seen.add(f"{kind} {depth}", response.status_code, response.text)
                assert response.status_code == 422, (kind, depth)
                assert response.json()["error"]["details"]["fields"] == {
                    f"inputs.{name}": "nested more than 64 levels deep"
                }
        ok = http.post(
            "/v1/runs", json={"chain": "typed", "inputs": {"s": "a", "o": _nested(60, "obj")}}
        )
        assert ok.status_code == 201
        text = http.post(
            "/v1/runs", json={"chain": "typed", "inputs": {"s": "a", "xs": "[" * 50_000}}
        )
        seen.add("deep text", text.status_code, text.text)
        assert text.json()["error"]["details"]["fields"] == {
            "inputs.xs": "expected array, got string"
        }


def test_the_typed_chain_accepts_good_inputs_and_names_each_bad_one(server: str) -> None:
    with httpx.Client(base_url=server, timeout=10) as http:
        good = http.post("/v1/runs", json={"chain": "typed", "inputs": {"s": "hi", "n": "4"}})
        assert good.status_code == 201
        bad = http.post(
            "/v1/runs",
            json={"chain": "typed", "inputs": {"s": "", "n": 10, "e": "de", "b": "maybe", "q": 1}},
        )
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["fields"] == {
        "inputs.q": "unknown input (inputs are: s, e, n, f, b, xs, o)",
        "inputs.s": "must have at least 1 characters (has 0)",
        "inputs.e": "must be one of 'en', 'ko'",
        "inputs.n": "must be <= 9",
        "inputs.b": "expected boolean, got string",
    }
