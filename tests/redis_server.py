"""A real redis-server for the tests: Debian's package (tests/redis/install_redis.sh installs it
from tests/setup.sh), started on 127.0.0.1 at a free port, no persistence, in a temp dir.

Outside CI a missing or broken redis-server skips the Redis tests with the reason; with
``CI=true`` (or ``STAGECAST_REQUIRE_REDIS=1``) it is a failure, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

import redis

from tests.setup_needed import not_set_up, required

__all__ = ["RedisServer", "redis_required", "unavailable"]

REDIS_SERVER = os.environ.get("STAGECAST_REDIS_SERVER", "redis-server")


def redis_required() -> bool:
    return required("STAGECAST_REQUIRE_REDIS")


def unavailable(message: str) -> NoReturn:
    """Skip (or, in CI, fail) a test that needs Redis, saying why."""
    not_set_up(
        f"{message} (tests/setup.sh installs Debian's redis-server)", also="STAGECAST_REQUIRE_REDIS"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process; ``stop``/``start`` restart it on the same port (data lost)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            raise FileNotFoundError(f"{REDIS_SERVER} is not installed")
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--protected-mode",
                    "yes",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:  # bounded wait for the server to answer PING
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "redis.log").read_text(errors="replace")[-400:]
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, keep_data: bool = False) -> None:
        """Kill the server; with ``keep_data`` it SAVEs first, and the next ``start`` loads it
        (a Redis restarted with its data); without, the next start is empty."""
        dump = self.workdir / "dump.rdb"
        if self.process is not None:
            if keep_data:
                client = redis.Redis.from_url(self.url)
                try:
                    client.save()
                finally:
                    client.close()
            self.process.kill()
            self.process.wait(10)
            self.process = None
        if not keep_data:
            dump.unlink(missing_ok=True)

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        try:
            client.flushall()
        finally:
            client.close()
