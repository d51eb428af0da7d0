"""Viewers that stop reading: bounded server memory, other runs undisturbed, dropped after
``viewer_send_timeout``, and able to resume with ``Last-Event-ID`` — over real loopback HTTP."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import httpx

from tests.api.conftest import ScriptedModel, live_server, make_app
from tests.api.sse_parse import complete, events_of, parse_frames

BIG_TOKEN = "stagecast " * 100  # 1 KB of text per token
BIG_TOKENS = 20_000  # ~20 MB of frames per viewer if nothing pushed back


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stalled_viewer(url: str, path: str) -> socket.socket:
    """A client that asks for the stream, reads the headers, and then never reads again."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel stops taking data early
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    sock.settimeout(5)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    return sock


def read_rest(sock: socket.socket, limit_s: float = 20) -> bytes:
    data = b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP body, as far as it arrived (a cut chunk is kept whole)."""
    out, rest = b"", body
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        try:
            size = int(size_line, 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        rest = rest[size + 2 :]
    return out


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_stalled_viewers_are_bounded_dropped_and_resume_while_others_flow() -> None:
    models = {
        "big": ScriptedModel(tokens=[BIG_TOKEN] * BIG_TOKENS),
        "ticker": ScriptedModel(tokens=[f"t{i} " for i in range(300)], delay_ms=5),
    }
    app = make_app(models, viewer_send_timeout=4, ping_interval=0.5)
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:

        def big_run(viewers: int) -> tuple[str, int, list[socket.socket]]:
            """A run of ~20 MB of frames; its RSS cost, with ``viewers`` that never read."""
            before_kib = rss_kib()
            created = http.post("/v1/runs", json={"chain": "endless", "inputs": {}, "model": "big"})
            run_id = created.json()["run_id"]
            socks = [stalled_viewer(url, f"/v1/runs/{run_id}/events") for _ in range(viewers)]
            deadline = time.monotonic() + 30
            while (status := http.get(f"/v1/runs/{run_id}").json())["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # the run never waited for its viewers
            assert status["status"] == "succeeded" and status["last_seq"] == BIG_TOKENS + 4
            time.sleep(0.3)  # what the stalled streams could still take, they have taken
            return run_id, rss_kib() - before_kib, socks

        # a live run with a viewer that never reads still runs at full speed
        _, _, live = big_run(1)
        # three viewers that never read replay a finished run: what do they cost?
        run_id, _, _ = big_run(0)
        before_kib = rss_kib()
        viewers = [stalled_viewer(url, f"/v1/runs/{run_id}/events") for _ in range(3)]
        time.sleep(0.5)  # each stream writes until the socket and transport push back
        stalled_kib = rss_kib() - before_kib

        # while they are stalled, a healthy viewer of another run reads as fast as it can
        arrivals: list[float] = []
        ticker_events: list[dict[str, Any]] = []

        def follow_ticker() -> None:
            tick = http.post("/v1/runs", json={"chain": "endless", "inputs": {}, "model": "ticker"})
            with http.stream("GET", f"/v1/runs/{tick.json()['run_id']}/events") as response:
                buffer = ""
                for text in response.iter_text():
                    buffer += text
                    whole = complete(buffer)
                    buffer = buffer[len(whole) :]
                    for event in events_of(whole):
                        if event["type"] == "token":
                            arrivals.append(time.monotonic())
                        ticker_events.append(event)

        ticker = threading.Thread(target=follow_ticker)
        ticker.start()
        ticker.join(60)
        assert not ticker.is_alive()
        # the three replaying viewers are not dropped yet (4 s); the live one may be
        assert metric(url, "stagecast_streams_dropped_total") <= 1

        # the stalled viewers are dropped after viewer_send_timeout (+ one sweep)
        deadline = time.monotonic() + 15
        while metric(url, "stagecast_streams_dropped_total") < 4:
            assert time.monotonic() < deadline, "stalled viewers were not dropped"
            time.sleep(0.1)
        assert metric(url, "stagecast_streams_active") == 0

        live[0].close()
        # each resumes from the last complete event it got: every event exactly once
        for sock in viewers:
            got = dechunk(read_rest(sock))
            sock.close()
            text = got.decode("utf-8", "replace")
            text = complete(text)  # a frame cut mid-way is not received
            seqs = [int(f["id"]) for f in parse_frames(text) if "id" in f]
            assert seqs == list(range(1, len(seqs) + 1))
            assert 0 < len(seqs) < BIG_TOKENS  # it was cut off, not served the whole run
            with http.stream(
                "GET", f"/v1/runs/{run_id}/events", headers={"Last-Event-ID": str(seqs[-1])}
            ) as response:
                rest = parse_frames(response.read().decode())
            resumed = [int(f["id"]) for f in rest if "id" in f]
            assert seqs + resumed == list(range(1, BIG_TOKENS + 5))

    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    print(
        f"3 viewers that never read replaying a {BIG_TOKENS:,}-token run (~20 MB of frames "
        f"each): server RSS +{stalled_kib} KiB; meanwhile another run's viewer got "
        f"{len(arrivals)} tokens, largest gap {max(gaps) * 1000:.1f} ms"
    )
    assert [e["type"] for e in ticker_events].count("token") == 300
    assert ticker_events[-1]["type"] == "run-end"
    assert stalled_kib < 10_000  # ~1 write each, nothing like 3 x 20 MB of frames
    assert max(gaps) < 0.25  # (a GC pause of the 20 MB runs can take ~0.1 s)
