"""Stagecast's own HTTP/1.1 client for the chat completion streams of the fast path.

At 1,000 concurrent streams of ~20 tokens/s each, every SSE event arrives in its own read, and
through the SDK's client (httpx2 over httpcore2) each read costs more than everything Stagecast
does with the token: h11 parses the chunk, anyio opens a timeout scope, sniffio looks up the
async library, and each request builds its options, headers and URL anew and competes for a
keep-alive pool of 100. Here one ``asyncio.Protocol`` per connection de-chunks the body and
splits the SSE lines as the bytes arrive (``data_received``) and wakes the reader once per read;
the request's head is built once per SDK client, the body once per call (orjson); connections
are kept alive in a pool with no cap but the SDK's keep-alive expiry, so it holds what the
concurrent streams need.

What the SDK would send and how it fails is kept:

* the URL and every header come from the SDK client itself (``_build_request`` of an empty
  request, once): auth, organization/project, ``default_headers``, ``default_query``, the
  ``x-stainless-*`` set; only ``Accept-Encoding`` asks for ``identity`` (a compressed stream is
  still decoded if a server sends one);
* timeouts are the client's: ``connect`` bounds the connect, ``read`` the time between two
  reads (one timer per stream, re-armed only when it fires, not one scope per read);
* failures are httpx2's exceptions (``ConnectError``, ``ConnectTimeout``, ``ReadTimeout``,
  ``RemoteProtocolError``), which ``openai_stream`` maps as the SDK does; an HTTP error status
  is the SDK's own ``APIStatusError`` (``_make_status_error_from_response`` of the status, the
  headers and the body read to the end);
* a connection taken from the pool that the server closed before answering is retried once on a
  new connection (nothing was received, so nothing was processed);
* a redirect (the SDK follows them) is handed back to the SDK (``WireFallback``).

Which clients it serves (``wire_target``): an ``AsyncOpenAI`` with a plain key, over ``http://``
or ``https://`` (TLS through asyncio with the SDK client's own SSL context, so the same CA set
and ``SSL_CERT_FILE``), HTTP/1.1, with no proxy (``HTTP_PROXY`` and the like: the SDK's client
mounts them), no custom auth, event hooks or transport. Anything else goes through the SDK's
client.
"""

from __future__ import annotations

import asyncio
import weakref
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

__all__ = ["WireFallback", "WireTarget", "aclose_wire", "wire_target"]

_CHUNKED, _LENGTH, _CLOSE = 1, 2, 3
_SIZE, _CRLF, _TRAILER = -1, -2, -3  # chunked states (>= 0: bytes left in the chunk)
_MAX_HEAD = 64 * 1024
_PAUSE_AT = 512  # payloads buffered and not yet read: stop reading the socket
_IDLE_CAP = 4096

_targets: weakref.WeakKeyDictionary[Any, WireTarget | None] = weakref.WeakKeyDictionary()


class WireFallback(Exception):
    """This call must go through the SDK's client (raised before anything was yielded)."""


def wire_target(client: Any) -> WireTarget | None:
    """The wire target of an SDK client (built once, in the running loop), or None when the
    client needs its own machinery (https, a proxy, custom auth, ...)."""
    try:
        return _targets[client]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: not an SDK client
        return None
    target = _build_target(client)
    _targets[client] = target
    return target


async def aclose_wire(client: Any) -> None:
    """Close the idle connections kept for ``client`` (``ModelRegistry.aclose``)."""
    try:
        target = _targets.pop(client, None)
    except TypeError:
        return
    if target is not None:
        target.close_idle()


def _build_target(client: Any) -> WireTarget | None:
    import httpx2
    import openai
    from openai._models import FinalRequestOptions

    if type(client) is not openai.AsyncOpenAI:
        return None
    for name in ("_provider_runtime", "_api_key_provider", "workload_identity"):
        if getattr(client, name, None) is not None:
            return None
    if client.custom_auth is not None or not isinstance(client.api_key, str):
        return None
    http = client._client
    if not isinstance(http, httpx2.AsyncClient) or http.auth is not None:
        return None
    hooks = http.event_hooks
    if hooks.get("request") or hooks.get("response") or http.params or http.cookies:
        return None
    options = FinalRequestOptions.construct(  # what create() asks for, less the body
        method="post",
        url="/chat/completions",
        json_data={},
        headers={"X-Stainless-Raw-Response": "stream"},
    )
    request = client._build_request(options)
    url = request.url
    if url.scheme not in ("http", "https") or not url.host:
        return None
    transport = http._transport_for_url(url)
    if type(transport) is not httpx2.AsyncHTTPTransport:  # a proxy, a mock, a custom one
        return None
    pool = getattr(transport, "_pool", None)
    for name in ("_proxy", "_uds", "_local_address"):
        if getattr(pool, name, None) is not None:
            return None
    if getattr(pool, "_http2", False) or not getattr(pool, "_http1", True):
        return None
    ssl_context = None
    if url.scheme == "https":
        ssl_context = getattr(pool, "_ssl_context", None)
        if ssl_context is None:
            return None
    socket_options = list(getattr(pool, "_socket_options", None) or ())
    lines = [b"POST " + url.raw_path + b" HTTP/1.1"]
    for key, value in request.headers.raw:
        lowered = key.lower()
        if lowered == b"content-length":
            continue
        if lowered == b"accept-encoding":
            value = b"identity"
        lines.append(key + b": " + value)
    timeout = client.timeout
    if isinstance(timeout, httpx2.Timeout):
        connect, read = timeout.connect, timeout.read
    else:
        connect = read = timeout
    keepalive = getattr(pool, "_keepalive_expiry", 5.0)
    return WireTarget(
        client,
        url.host,
        url.port or (443 if ssl_context is not None else 80),
        b"\r\n".join(lines) + b"\r\nContent-Length: ",
        str(url),
        connect,
        read,
        5.0 if keepalive is None else float(keepalive),
        socket_options,
        ssl_context,
    )


class WireTarget:
    """One SDK client's endpoint: the request head, the timeouts, the idle connections."""

    def __init__(
        self,
        client: Any,
        host: str,
        port: int,
        head: bytes,
        url: str,
        connect_timeout: float | None,
        read_timeout: float | None,
        keepalive: float,
        socket_options: list[Any],
        ssl_context: Any = None,
    ) -> None:
        self.client = weakref.proxy(client)
        self.host, self.port, self.head, self.url = host, port, head, url
        self.connect_timeout, self.read_timeout, self.keepalive = (
            connect_timeout,
            read_timeout,
            keepalive,
        )
        self.ssl = ssl_context
        """https: the SDK client's own SSL context (its CA set, ``SSL_CERT_FILE``, ...)."""
        self.socket_options = socket_options
        """The SDK's (TCP keep-alive probes, TCP_USER_TIMEOUT): set on each socket too."""
        self.idle: deque[_Conn] = deque()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- the pool -------------------------------------------------------------------------------

    def _take(self, loop: asyncio.AbstractEventLoop) -> _Conn | None:
        if loop is not self.loop:  # another loop (tests, a restarted server): start afresh
            self.idle.clear()
            self.loop = loop
            return None
        idle, now = self.idle, loop.time()
        while idle:
            conn = idle.pop()
            if conn.lost or now - conn.idle_since >= self.keepalive:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def _release(self, conn: _Conn) -> None:
        if conn.lost or conn.loop is not self.loop:
            conn.abort()
            return
        conn.reset()
        now = conn.loop.time()
        conn.idle_since = now
        idle = self.idle
        idle.append(conn)
        while idle and (idle[0].lost or now - idle[0].idle_since >= self.keepalive):
            idle.popleft().abort()
        if len(idle) > _IDLE_CAP:
            idle.popleft().abort()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, deque()
        for conn in idle:
            conn.abort()

    # -- one call -------------------------------------------------------------------------------

    def request(self) -> Any:
        """The httpx2 request this target sends (for the exceptions; built only for them)."""
        import httpx2

        return httpx2.Request("POST", self.url)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Conn:
        import httpx2

        conn = _Conn(self, loop)
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout("timed out connecting") from exc
        except OSError as exc:  # ssl.SSLError (a certificate refused) too, as httpcore2 maps it
            raise httpx2.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in self.socket_options:
                try:
                    sock.setsockopt(*option)
                except OSError:  # an option this system lacks: the SDK's client skips it too
                    pass
        return conn

    async def stream(self, body: bytes) -> AsyncGenerator[bytes, None]:
        """The ``data`` of each SSE event of the answer to ``body`` (JSON), in order.

        Raises httpx2's exceptions for transport failures, the SDK's ``APIStatusError`` for an
        HTTP error status, ``WireFallback`` for a redirect.
        """
        loop = asyncio.get_running_loop()
        message = self.head + str(len(body)).encode() + b"\r\n\r\n" + body
        conn: _Conn | None = None
        try:
            for _ in range(2):
                conn = self._take(loop)
                if conn is None:
                    conn = await self._connect(loop)
                conn.send(message)
                while not conn.status and conn.error is None:
                    await conn.wait()
                if conn.error is not None and conn.reused and not conn.got_bytes:
                    conn.abort()  # the server closed it while it was idle: once more, anew
                    conn = None
                    continue
                break
            assert conn is not None
            if conn.error is not None:
                raise conn.error
            status = conn.status
            if 300 <= status < 400:
                raise WireFallback(status)
            if status >= 400 or status < 200:
                while not conn.done and conn.error is None:
                    await conn.wait()
                if conn.error is not None:
                    raise conn.error
                error = self._status_error(conn)
                conn = None
                raise error
            while True:
                payloads = conn.payloads
                if payloads:
                    conn.payloads = []
                    if conn.paused:
                        conn.resume()
                    for payload in payloads:
                        if payload[:6] == b"[DONE]":
                            if conn.done:
                                self._finish(conn)
                            else:  # the body's end is on its way: pool it when it arrives
                                conn.release_when_done = True
                            conn = None
                            return
                        yield payload
                elif conn.error is not None:
                    raise conn.error
                elif conn.done:
                    self._finish(conn)
                    conn = None
                    return
                else:
                    await conn.wait()
        finally:
            if conn is not None:  # failed, cancelled or abandoned mid-answer
                conn.abort()

    def _finish(self, conn: _Conn) -> None:
        if conn.keep_alive and conn.error is None:
            self._release(conn)
        else:
            conn.abort()

    def _status_error(self, conn: _Conn) -> Exception:
        import httpx2

        response = httpx2.Response(
            conn.status,
            headers=[(k, v) for k, v in conn.headers],
            content=bytes(conn.raw or b""),
            request=self.request(),
        )
        error: Exception = self.client._make_status_error_from_response(response)
        if conn.keep_alive:
            self._release(conn)
        else:
            conn.abort()
        return error


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection: parses the response as it arrives, one request at a time."""

    def __init__(self, target: WireTarget, loop: asyncio.AbstractEventLoop) -> None:
        self.target = target
        self.loop = loop
        self.transport: Any = None
        self.lost = False
        self.reused = False
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = b""
        self.mode = 0
        self.left = 0
        self.buf = b""
        self.parser: Any = None
        self.raw: bytearray | None = None
        self.decoder: Any = None
        self.payloads: list[bytes] = []
        self.done = False
        self.error: BaseException | None = None
        self.got_bytes = False
        self.keep_alive = True
        self.paused = False
        self.release_when_done = False
        self.last_read = 0.0
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- used by the reader ---------------------------------------------------------------------

    def send(self, message: bytes) -> None:
        self.active = True
        self.last_read = self.loop.time()
        if self.lost:
            self._fail_lost(None)
            return
        self.transport.write(message)
        read = self.target.read_timeout
        if read is not None:
            self.timer = self.loop.call_at(self.last_read + read, self._on_timer)

    async def wait(self) -> None:
        waiter = self.waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    def resume(self) -> None:
        self.paused = False
        self.last_read = self.loop.time()
        if not self.lost:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.active = False
        if not self.lost and self.transport is not None:
            self.lost = True
            self.transport.abort()

    # -- protocol callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.active or self.done:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        self.got_bytes = True
        self.last_read = self.loop.time()
        try:
            if not self.status:
                rest = self._head(data)
                if rest is None:
                    return
                data = rest
            if data:
                if self.mode == _CHUNKED:
                    self._chunked(data)
                elif self.mode == _LENGTH:
                    self._length(data)
                else:
                    self._body(data)
        except Exception as exc:  # a protocol violation: fail the call, drop the connection
            self._fail(_protocol_error(str(exc)))
            return
        if self.payloads and not self.paused and len(self.payloads) >= _PAUSE_AT:
            self.paused = True
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.active or self.done or self.error is not None:
            return
        if self.status and self.mode == _CLOSE and exc is None:
            try:
                self._end()
            except Exception as error:
                self._fail(_protocol_error(str(error)))
                return
            self._wake()
            return
        self._fail_lost(exc)

    # -- parsing --------------------------------------------------------------------------------

    def _head(self, data: bytes) -> bytes | None:
        head = self.head + data if self.head else data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_HEAD:
                raise ValueError("the response head is too long")
            self.head = head
            return None
        self.head = b""
        lines = head[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        status = int(rest[:3])
        rest_data = head[end + 4 :]
        if 100 <= status < 200:  # informational: the real answer follows
            return self._head(rest_data) if rest_data else None
        headers = self.headers = []
        te = cl = encoding = b""
        connection = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            if name == b"transfer-encoding":
                te = value.lower()
            elif name == b"content-length":
                cl = value
            elif name == b"connection":
                connection = value.lower()
            elif name == b"content-encoding":
                encoding = value.lower()
        if version == b"HTTP/1.1":
            self.keep_alive = b"close" not in connection
        else:
            self.keep_alive = b"keep-alive" in connection
        if encoding in (b"gzip", b"deflate", b"x-gzip"):
            self.decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib
        elif encoding not in (b"", b"identity"):
            raise ValueError(f"unsupported content-encoding {encoding.decode('latin-1')!r}")
        if 200 <= status < 300:
            from stagecast.engine.openai_stream import EventParser

            self.parser = EventParser()
        else:
            self.raw = bytearray()
        self.status = status
        if b"chunked" in te:
            self.mode, self.left = _CHUNKED, _SIZE
        elif cl:
            self.mode, self.left = _LENGTH, int(cl)
            if self.left == 0:
                self._end()
        else:
            self.mode, self.keep_alive = _CLOSE, False
        return rest_data

    def _chunked(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, size, left = 0, len(buf), self.left
        parts: list[bytes] = []
        ended = False
        while pos < size:
            if left > 0:
                stop = pos + left
                if stop <= size:
                    parts.append(buf[pos:stop])
                    pos, left = stop, _CRLF
                else:
                    parts.append(buf[pos:])
                    left -= size - pos
                    pos = size
            elif left == _CRLF:
                if size - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("a chunk does not end with CRLF")
                pos, left = pos + 2, _SIZE
            elif left == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if size - pos > 1024:
                        raise ValueError("a chunk size line is too long")
                    break
                length = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                left = length if length else _TRAILER
            else:  # trailers, up to an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    ended = True
                    break
        self.buf = buf[pos:] if pos < size else b""
        self.left = left
        for part in parts:
            self._body(part)
        if ended:
            if self.buf:
                raise ValueError("bytes after the end of the body")
            self._end()

    def _length(self, data: bytes) -> None:
        left = self.left
        if len(data) > left:
            raise ValueError("more bytes than Content-Length")
        self.left = left - len(data)
        self._body(data)
        if not self.left:
            self._end()

    def _body(self, data: bytes) -> None:
        if self.decoder is not None:
            data = self.decoder.decompress(data)
        if self.raw is not None:
            self.raw += data
        elif data:
            self.payloads.extend(self.parser.feed(data))

    def _end(self) -> None:
        if self.decoder is not None:
            tail = self.decoder.flush()
            self.decoder = None
            if tail:
                self._body(tail)
        if self.parser is not None:
            self.payloads.extend(self.parser.finish())
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.release_when_done:
            self.target._finish(self)

    # -- failures -------------------------------------------------------------------------------

    def _on_timer(self) -> None:
        self.timer = None
        read = self.target.read_timeout
        if not self.active or self.done or self.error is not None or read is None:
            return
        due = self.last_read + read
        if self.paused or self.loop.time() < due - 0.001:
            self.timer = self.loop.call_at(due, self._on_timer)
            return
        import httpx2

        if self.release_when_done:  # nobody is reading any more: just drop it
            self.abort()
            return
        self._fail(httpx2.ReadTimeout("timed out waiting for the next read"))

    def _fail_lost(self, exc: Exception | None) -> None:
        import httpx2

        error: Exception
        if exc is not None:
            error = httpx2.ReadError(str(exc) or type(exc).__name__)
            error.__cause__ = exc
        elif not self.got_bytes:
            error = httpx2.RemoteProtocolError("Server disconnected without sending a response.")
        else:
            error = httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        if self.release_when_done:
            self.abort()
            return
        if not self.lost and self.transport is not None:
            self.lost = True
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _protocol_error(message: str) -> Exception:
    import httpx2

    return httpx2.RemoteProtocolError(message)
