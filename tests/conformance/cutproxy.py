"""A TCP proxy on 127.0.0.1 that cuts connections mid-response, for the conformance test.

Each new connection gets a byte budget for the server-to-client direction (drawn from a seeded
RNG); when the budget runs out, the proxy forwards exactly that many bytes and aborts both
sides, as a network blip does: the client sees a response cut in the middle of a frame. After
``cuts`` cuts it forwards everything, so a run always gets to its end (the test is bounded).

One cut position is moved by one byte: the position right after a frame's ``id:`` line and
before the blank line that ends the frame. No wire order can protect a client that commits the
id on reading the line (fetch-event-source) from a cut there; ``id:`` last leaves it that one
byte (pinned by tests/api/test_sse.py), and ``shifted`` counts the cuts that fell on it.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
from dataclasses import dataclass, field

_ID_LINE_END = re.compile(rb"\nid: [0-9]+\n\Z")


@dataclass
class CutStats:
    connections: int = 0
    cuts: list[int] = field(default_factory=list)
    """Where each cut fell: the bytes forwarded on that connection."""
    shifted: int = 0


class CuttingProxy:
    def __init__(
        self, upstream_port: int, *, cuts: int, low: int, high: int, seed: int = 16
    ) -> None:
        self.upstream_port = upstream_port
        self.cuts_left = cuts
        self.low, self.high = low, high
        self.rng = random.Random(seed)
        self.stats = CutStats()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> CuttingProxy:
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the cutting proxy did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            self._server.close()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        budget: int | None = None
        if self.cuts_left > 0:
            self.cuts_left -= 1
            budget = self.rng.randint(self.low, self.high)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return

        async def upstream() -> None:
            try:
                while chunk := await reader.read(65536):
                    up_writer.write(chunk)
                    await up_writer.drain()
            except (OSError, asyncio.CancelledError):
                pass

        pump = asyncio.ensure_future(upstream())
        sent, tail = 0, b""  # bytes forwarded; the last few of them
        try:
            while chunk := await asyncio.wait_for(up_reader.read(65536), 60):
                if budget is not None and sent + len(chunk) >= budget:
                    keep = budget - sent
                    if _ID_LINE_END.search(tail + chunk[:keep]) and keep < len(chunk):
                        keep += 1  # the one byte no wire order can protect (see above)
                        self.stats.shifted += 1
                    writer.write(chunk[:keep])
                    await writer.drain()
                    self.stats.cuts.append(sent + keep)
                    break
                sent += len(chunk)
                tail = (tail + chunk)[-64:]
                writer.write(chunk)
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            pump.cancel()
            writer.transport.abort()
            up_writer.transport.abort()
