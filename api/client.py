"""A Python client for the Stagecast HTTP API, sync and async (httpx + httpx-sse).

    with Client("http://127.0.0.1:8000") as client:
        for event in client.stream("advanced_summary", {"document": text}, model="offline"):
            if event.type == "token":
                print(event.text, end="")

    async with AsyncClient(url) as client:
        run = await client.start_run("advanced_summary", {"document": text})
        async for event in client.events(run.run_id):
            ...

``events()`` yields typed events (``engine.events``) in ``seq`` order, each exactly once: when
the connection drops it reconnects by itself with ``Last-Event-ID`` and skips anything it already
has. It gives up after ``max_reconnects`` attempts in a row that bring no new event
(``StreamLost``). Event types this version does not know are skipped, as the protocol asks.
Error answers raise ``StagecastError`` with the server's ``code``, ``message`` and ``details``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import anyio
import httpx
from httpx_sse import aconnect_sse, connect_sse
from pydantic import ValidationError

from stagecast.engine.events import RunEvent, event_from_json

__all__ = ["AsyncClient", "Client", "RunHandle", "StagecastError", "StreamLost"]

KNOWN_TYPES = frozenset(
    cls.__dataclass_fields__["type"].default for cls in get_args(get_args(RunEvent)[0])
)


class StagecastError(Exception):
    """The server answered with an error (or something that is not the API)."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.details = dict(details or {})


class _ServerHiccup(Exception):
    """A 5xx to a resume: retried; its code and message end up in ``StreamLost`` if it lasts."""

    def __init__(self, error: StagecastError) -> None:
        super().__init__(f"the server answered {error}")


class StreamLost(StagecastError):
    """The event stream dropped and could not be resumed."""


@dataclass(frozen=True)
class RunHandle:
    run_id: str
    status: str
    events_url: str
    status_url: str
    cancel_url: str


def _error(response: httpx.Response) -> StagecastError:
    try:
        body = response.json()["error"]
        return StagecastError(response.status_code, body["code"], body["message"], body["details"])
    except (ValueError, KeyError, TypeError):
        text = response.text[:200] if response.is_stream_consumed else ""
        return StagecastError(response.status_code, "http_error", text or response.reason_phrase)


def _decode(data: str) -> RunEvent | None:
    """An event, or None for a type this client does not know."""
    try:
        return event_from_json(data)
    except ValidationError:
        try:
            kind = json.loads(data).get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind in KNOWN_TYPES:
            raise
        return None


def _run_body(
    chain: str,
    inputs: Mapping[str, Any] | None,
    model: str | None,
    on_disconnect: str | None,
    reuse: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"chain": chain, "inputs": dict(inputs or {})}
    if model is not None:
        body["model"] = model
    if on_disconnect is not None:
        body["on_disconnect"] = on_disconnect
    if reuse is not None:
        body["reuse"] = dict(reuse)
    return body


def _replay_body(recording: str, speed: float | str | None) -> dict[str, Any]:
    return {"recording": recording} if speed is None else {"recording": recording, "speed": speed}


def _handle(data: dict[str, Any]) -> RunHandle:
    return RunHandle(
        data["run_id"], data["status"], data["events_url"], data["status_url"], data["cancel_url"]
    )


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        read_timeout: float,
        max_reconnects: int,
        reconnect_delay: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Reads wait for pings (every 15 s by default); a longer silence means a dead link.
        self.timeout = httpx.Timeout(10.0, read=read_timeout)
        self.max_reconnects = max_reconnects
        self.reconnect_delay = reconnect_delay


class Client(_Base):
    """Synchronous client. ``transport`` is for tests (any httpx transport)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        read_timeout: float = 60.0,
        max_reconnects: int = 5,
        reconnect_delay: float = 0.25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            read_timeout=read_timeout,
            max_reconnects=max_reconnects,
            reconnect_delay=reconnect_delay,
        )
        self.http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def chains(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._json("GET", "/v1/chains")["chains"]
        return result

    def chain(self, chain_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/chains/{chain_id}")
        return result

    def start_run(
        self,
        chain: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        on_disconnect: str | None = None,
        reuse: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Start a run; ``reuse={"run_id" or "recording": ..., "from": STAGE}`` re-runs one."""
        body = _run_body(chain, inputs, model, on_disconnect, reuse)
        return _handle(self._json("POST", "/v1/runs", json=body))

    def start_replay(self, recording: str, *, speed: float | str | None = None) -> RunHandle:
        """Serve a recording of the server's recordings folder as a new run (``events()``)."""
        return _handle(self._json("POST", "/v1/replays", json=_replay_body(recording, speed)))

    def status(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", f"/v1/runs/{run_id}")
        return result

    def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._json("POST", f"/v1/runs/{run_id}/cancel")
        return result

    def answer(
        self, run_id: str, stage: str, path: list[str | int] | None, value: Any
    ) -> dict[str, Any]:
        """Answer a pending input-required (202). A refused answer raises ``StagecastError``
        422 ``invalid_answer`` with ``details["fields"]``; a stage/path not waiting, 409."""
        body = {"stage": stage, "path": path, "value": value}
        result: dict[str, Any] = self._json("POST", f"/v1/runs/{run_id}/input", json=body)
        return result

    def events(self, run_id: str, *, after: int = 0) -> Iterator[RunEvent]:
        """The run's events after ``after``, live, resuming by itself; ends after run-end."""
        last, failures = after, 0
        url = f"/v1/runs/{run_id}/events"
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                with connect_sse(self.http, "GET", url, headers=headers) as source:
                    response = source.response
                    if response.status_code == 204:
                        return
                    if response.status_code >= 500:  # a proxy or a restarting worker: retry
                        response.read()
                        raise _ServerHiccup(_error(response))
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue
                        event = _decode(sse.data)
                        if event is None or event.seq <= last:
                            continue
                        last, failures = event.seq, 0
                        yield event
                        if event.type == "run-end":
                            return
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except _ServerHiccup as exc:
                reason = str(exc)
            else:
                reason = "the stream ended before run-end"
            failures += 1
            if failures > self.max_reconnects:
                raise StreamLost(0, "stream_lost", f"{reason} (after event {last})")
            time.sleep(self.reconnect_delay * failures)

    def stream(
        self,
        chain: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        on_disconnect: str | None = None,
    ) -> Iterator[RunEvent]:
        """Start a run and follow it to its end."""
        run = self.start_run(chain, inputs, model=model, on_disconnect=on_disconnect)
        yield from self.events(run.run_id)


class AsyncClient(_Base):
    """Asynchronous client (asyncio or trio through anyio)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        read_timeout: float = 60.0,
        max_reconnects: int = 5,
        reconnect_delay: float = 0.25,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            read_timeout=read_timeout,
            max_reconnects=max_reconnects,
            reconnect_delay=reconnect_delay,
        )
        self.http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    async def chains(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._json("GET", "/v1/chains"))["chains"]
        return result

    async def chain(self, chain_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", f"/v1/chains/{chain_id}")
        return result

    async def start_run(
        self,
        chain: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        on_disconnect: str | None = None,
        reuse: Mapping[str, Any] | None = None,
    ) -> RunHandle:
        """Start a run; ``reuse={"run_id" or "recording": ..., "from": STAGE}`` re-runs one."""
        body = _run_body(chain, inputs, model, on_disconnect, reuse)
        return _handle(await self._json("POST", "/v1/runs", json=body))

    async def start_replay(self, recording: str, *, speed: float | str | None = None) -> RunHandle:
        """Serve a recording of the server's recordings folder as a new run (``events()``)."""
        body = _replay_body(recording, speed)
        return _handle(await self._json("POST", "/v1/replays", json=body))

    async def status(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("GET", f"/v1/runs/{run_id}")
        return result

    async def cancel(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._json("POST", f"/v1/runs/{run_id}/cancel")
        return result

    async def answer(
        self, run_id: str, stage: str, path: list[str | int] | None, value: Any
    ) -> dict[str, Any]:
        """Answer a pending input-required (see ``Client.answer``)."""
        body = {"stage": stage, "path": path, "value": value}
        result: dict[str, Any] = await self._json("POST", f"/v1/runs/{run_id}/input", json=body)
        return result

    async def events(self, run_id: str, *, after: int = 0) -> AsyncIterator[RunEvent]:
        """The run's events after ``after``, live, resuming by itself; ends after run-end."""
        last, failures = after, 0
        url = f"/v1/runs/{run_id}/events"
        while True:
            headers = {"Last-Event-ID": str(last)} if last else {}
            try:
                async with aconnect_sse(self.http, "GET", url, headers=headers) as source:
                    response = source.response
                    if response.status_code == 204:
                        return
                    if response.status_code >= 500:  # a proxy or a restarting worker: retry
                        await response.aread()
                        raise _ServerHiccup(_error(response))
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error(response)
                    async for sse in source.aiter_sse():
                        if not sse.data:
                            continue
                        event = _decode(sse.data)
                        if event is None or event.seq <= last:
                            continue
                        last, failures = event.seq, 0
                        yield event
                        if event.type == "run-end":
                            return
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except _ServerHiccup as exc:
                reason = str(exc)
            else:
                reason = "the stream ended before run-end"
            failures += 1
            if failures > self.max_reconnects:
                raise StreamLost(0, "stream_lost", f"{reason} (after event {last})")
            await anyio.sleep(self.reconnect_delay * failures)

    async def stream(
        self,
        chain: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        model: str | None = None,
        on_disconnect: str | None = None,
    ) -> AsyncIterator[RunEvent]:
        """Start a run and follow it to its end."""
        run = await self.start_run(chain, inputs, model=model, on_disconnect=on_disconnect)
        async for event in self.events(run.run_id):
            yield event
