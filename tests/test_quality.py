"""ruff and mypy are part of the suite, so `pytest` alone is the whole check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_ruff_lint_is_clean() -> None:
    result = run("ruff", "check", "--output-format", "concise", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_strict_on_engine_and_api(tmp_path: Path) -> None:
    # mypy cannot follow setuptools' editable finder: give it the installed layout as symlinks
    view = tmp_path / "stagecast"
    view.mkdir()
    for package in ("engine", "api"):
        (view / package).symlink_to(ROOT / package, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        + [str(view / "engine"), str(view / "api")],
        cwd=tmp_path,  # not ROOT: there, engine/ would also be found as a module named engine
        env={**os.environ, "MYPYPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "no issues found in" in result.stdout


def ruff_probe(path: str, source: str) -> subprocess.CompletedProcess[str]:
    """``ruff check --select TID251`` of ``source`` as if it were the file ``path``."""
    return subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", "--select", "TID251"]
        + ["--stdin-filename", path, "-"],
        cwd=ROOT,
        input=source,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("source", "banned"),
    [
        ("import fastapi\n", "fastapi"),
        ("from starlette.responses import Response\n", "starlette"),
        ("import sse_starlette.sse\n", "sse_starlette"),
        ("def f() -> None:\n    import uvicorn\n", "uvicorn"),
        ("from stagecast.api.sse import PING\n", "stagecast.api"),
        ("from stagecast import api\n", "stagecast.api"),
        ("from engine.spec import ChainSpec\n", "engine"),
    ],
)
def test_the_engine_boundary_is_checked_statically(source: str, banned: str) -> None:
    # engine/ruff.toml bans the web stack and the api package inside engine/ (api -> engine only)
    result = ruff_probe("engine/probe.py", source)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"TID251 `{banned}` is banned" in result.stdout


def test_the_api_may_import_the_engine_but_not_bare_names() -> None:
    allowed = "from stagecast.engine.spec import ChainSpec\nimport fastapi\n"
    assert ruff_probe("api/probe.py", allowed).returncode == 0
    bare = ruff_probe("api/probe.py", "from engine.spec import ChainSpec\n")
    assert bare.returncode == 1 and "TID251 `engine` is banned" in bare.stdout
