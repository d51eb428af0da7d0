"""A TCP proxy on 127.0.0.1 in front of the test server that cuts the runs' event streams on demand.

The demo page is loaded through it, so its EventSource goes through it too. ``cut()`` aborts every
connection that carries a ``GET /v1/runs/{id}/events`` request (the browser sees the stream end
mid-flight, as in a network blip) and, with ``hold=True``, keeps the browser's reconnect waiting
(the request is not forwarded) until ``release()``: the cut lasts as long as the test needs to
look at the page. Everything else is forwarded as it is.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

_EVENTS_REQUEST = re.compile(rb"^GET /v1/runs/[^ /]+/events[ ?]", re.MULTILINE)


class StreamCutter:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.event_requests = 0
        """How many event-stream requests reached the proxy (the first, then each resume)."""
        self.cuts = 0
        """How many stream connections ``cut`` aborted."""
        self._streams: dict[asyncio.StreamWriter, asyncio.StreamWriter] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._open: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-cutter", daemon=True)

    def __enter__(self) -> StreamCutter:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the stream-cutting proxy did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def cut(self, *, hold: bool) -> int:
        """Abort the open event streams; with ``hold``, stall reconnects until ``release``."""
        return self._call(self._cut(hold))

    def release(self) -> None:
        self._call(self._release())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _cut(self, hold: bool) -> int:
        assert self._open is not None
        if hold:
            self._open.clear()
        streams = list(self._streams.items())
        for client, upstream in streams:
            client.transport.abort()
            upstream.transport.abort()
        self.cuts += len(streams)
        return len(streams)

    async def _shutdown(self) -> None:
        assert self._server is not None and self._open is not None
        self._server.close()
        self._open.set()
        await asyncio.sleep(0.05)  # connections accepted last get their handler started
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _release(self) -> None:
        assert self._open is not None
        self._open.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._open = asyncio.Event()
        self._open.set()
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)

        async def to_server() -> None:
            assert self._open is not None
            while chunk := await reader.read(65536):
                if _EVENTS_REQUEST.search(chunk):
                    self.event_requests += 1
                    await self._open.wait()  # a held cut: the reconnect waits here
                    self._streams[writer] = up_writer
                up_writer.write(chunk)
                await up_writer.drain()

        async def to_client() -> None:
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()

        tasks = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._streams.pop(writer, None)
            writer.transport.abort()
            up_writer.transport.abort()
            self._writers.difference_update((writer, up_writer))
