"""The chains a server offers: the YAML files of its chains directories, loaded on demand.

The directories are searched in order and the first file of an id wins: by default
``./chains`` of the working directory, then the shipped chains.

A chain is looked up by id only (``[a-z0-9_-]+``), never by a path a client sends. Files are
re-read when they change (by mtime), so editing a chain needs no restart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stagecast.engine.chain import Chain
from stagecast.engine.loading import load_chain
from stagecast.engine.orchestrator import plan_of
from stagecast.engine.resources import chain_files

__all__ = ["CHAIN_ID", "ChainCatalog", "ChainEntry", "plan_of"]

CHAIN_ID = re.compile(r"^[a-z0-9_-]+$")


@dataclass
class ChainEntry:
    """One chain file: the loaded chain, or why it did not load."""

    id: str
    path: Path
    chain: Chain | None
    error: str | None


def _error_text(exc: Exception, path: Path) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if str(path) in text else f"{path.name}: {text}"


class ChainCatalog:
    """Chains of one or more directories, by id (earlier directories win)."""

    def __init__(self, directories: Path | Sequence[Path]) -> None:
        self.directories = (directories,) if isinstance(directories, Path) else tuple(directories)
        self._cache: dict[Path, tuple[float, ChainEntry]] = {}

    def _load(self, path: Path) -> ChainEntry:
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            chain = load_chain(path)
            entry = ChainEntry(chain.id, path, chain, None)
        except Exception as exc:  # a broken file is reported, never fatal for the server
            entry = ChainEntry(path.stem, path, None, _error_text(exc, path))
        self._cache[path] = (mtime, entry)
        return entry

    def entries(self) -> list[ChainEntry]:
        return [self._load(p) for p in chain_files(self.directories).values()]

    def find(self, chain_id: str) -> ChainEntry | None:
        """The chain with this id (its ``id:`` or, without one, its file stem)."""
        if not CHAIN_ID.match(chain_id):
            return None
        path = chain_files(self.directories).get(chain_id)
        if path is not None:
            entry = self._load(path)
            if entry.id == chain_id or entry.chain is None:
                return entry
        for entry in self.entries():
            if entry.id == chain_id:
                return entry
        return None

    @staticmethod
    def summary(entry: ChainEntry) -> dict[str, Any]:
        chain = entry.chain
        spec = chain.spec if chain is not None else None
        return {
            "id": entry.id,
            "title": chain.title if chain is not None else None,
            "description": spec.description if spec is not None else None,
            "version": spec.version if spec is not None else None,
            "file": entry.path.name,
            "error": entry.error,
        }
