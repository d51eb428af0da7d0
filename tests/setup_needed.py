"""What a test needs from tests/setup.sh (a browser, node packages, redis-server) and is missing:
outside CI the test skips, saying what to run; in CI (``CI=true``) it fails, never a silent skip."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["node_with", "not_set_up", "required"]


def required(also: str | None = None) -> bool:
    """Whether a missing piece is a failure: in CI, or when ``also`` (an env name) is ``1``."""
    return os.environ.get("CI") == "true" or (also is not None and os.environ.get(also) == "1")


def not_set_up(message: str, also: str | None = None) -> NoReturn:
    """Skip the test with ``message``, or fail it when ``required(also)``."""
    if required(also):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def node_with(folder: Path, packages: Iterable[str]) -> str:
    """The path of ``node``, when the npm ``packages`` are installed in ``folder``."""
    node = shutil.which("node")
    absent = [p for p in packages if not (folder / "node_modules" / p / "package.json").is_file()]
    if node is not None and not absent:
        return node
    problem = (
        "node is not installed"
        if node is None
        else f"the npm packages {', '.join(absent)} are not installed in {folder}"
    )
    not_set_up(f"{problem}: run `sh tests/setup.sh` (it installs them with `npm ci`)")
