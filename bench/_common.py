"""Shared pieces of the benchmarks: the fake streaming model, statistics, /proc readers, tables.

Every script imports this file by path (``bench/`` is not a package), so it must import nothing
heavy at module level except what every script needs.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# The fake model: one ChatGenerationChunk per token, a native async stream, no sleeps


def make_fake_model(tokens: int) -> Any:
    """A chat model streaming ``tokens`` tokens, one chunk each, with a native ``_astream``.

    langchain-core's stock fakes stream per character (FakeListChatModel) or per whitespace with
    a thread hop per chunk (GenericFakeChatModel has no async stream); either would measure the
    fake, not the code under test. Every contender gets the same instance.
    """
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

    words = [f"w{i % 997} " for i in range(tokens)]

    class TokenStreamModel(BaseChatModel):
        n_tokens: int = tokens

        @property
        def _llm_type(self) -> str:
            return "bench-token-stream"

        def _generate(
            self,
            messages: list[BaseMessage],
            stop: Any = None,
            run_manager: Any = None,
            **kwargs: Any,
        ) -> ChatResult:
            return ChatResult(generations=[ChatGeneration(message=AIMessage("".join(words)))])

        def _stream(
            self,
            messages: list[BaseMessage],
            stop: Any = None,
            run_manager: Any = None,
            **kwargs: Any,
        ) -> Iterator[ChatGenerationChunk]:
            for word in words:
                yield ChatGenerationChunk(message=AIMessageChunk(content=word))

        async def _astream(
            self,
            messages: list[BaseMessage],
            stop: Any = None,
            run_manager: Any = None,
            **kwargs: Any,
        ) -> AsyncIterator[ChatGenerationChunk]:
            for word in words:
                # BaseChatModel.astream/ainvoke report each chunk to the callbacks themselves.
                yield ChatGenerationChunk(message=AIMessageChunk(content=word))

    return TokenStreamModel()


# --------------------------------------------------------------------------------------------
# Statistics and tables


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float]) -> str:
    """min–max as a percentage around the median: the noise of one figure."""
    if len(values) < 2:
        return "-"
    m = median(values)
    if not m:
        return "-"
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f}%"


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (it reads fine in a terminal too)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # nan
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------
# /proc readers (Linux)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: current and peak resident set size."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


# --------------------------------------------------------------------------------------------
# Machine info


PACKAGES = [
    "langchain-core",
    "langgraph",
    "pydantic",
    "starlette",
    "fastapi",
    "sse-starlette",
    "uvicorn",
    "uvloop",
    "httpx",
    "httpx-sse",
]


def missing(module: str) -> bool:
    """True (and a note on stdout) when an optional contender's package is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return False
    print(
        f"note: {module} is not installed, so its contender is skipped "
        "(pip install -e '.[bench]' adds every contender)\n"
    )
    return True


def run_async(main: Any, *, uvloop: bool = True) -> None:
    """Run ``main`` (a coroutine) on uvloop when asked and installed, else on asyncio."""
    import asyncio

    if uvloop and not missing("uvloop"):
        import uvloop as _uvloop

        _uvloop.run(main)
    else:
        asyncio.run(main)


def machine_info() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = ""
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; {load}\n" + ", ".join(versions)
    )


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except Exception:
        return "?"


def header(title: str, argv: Sequence[str] | None = None) -> None:
    args = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {title}\n")
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    print(f"command: python {shown} {args}".rstrip())
    print(f"commit {git_head()}; {machine_info()}\n")


def ensure_root_on_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------------------------
# Server subprocesses (loopback only)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A ``bench/_servers.py`` process on 127.0.0.1; stopped (by its own pid) on exit."""

    def __init__(self, kind: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        cmd = [
            sys.executable,
            str(ROOT / "bench" / "_servers.py"),
            kind,
            "--port",
            str(self.port),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.kind = kind

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> Server:
        import socket
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise SystemExit(f"server {self.kind} exited:\n{err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise SystemExit(f"server {self.kind} did not listen within {timeout} s")

    def cpu(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Server:
        return self.wait_ready()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
