"""The chains a server offers: the YAML files of its chains directory, loaded on demand.

A chain is looked up by id only (``[a-z0-9_-]+``), never by a path a client sends. Files are
re-read when they change (by mtime), so editing a chain needs no restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.chain import Chain
from engine.loading import load_chain
from engine.orchestrator import plan_of

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
    """Chains of one directory, by id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
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
        if not self.directory.is_dir():
            return []
        files = sorted(
            p for p in self.directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()
        )
        return [self._load(p) for p in files]

    def find(self, chain_id: str) -> ChainEntry | None:
        """The chain with this id (its ``id:`` or, without one, its file stem)."""
        if not CHAIN_ID.match(chain_id):
            return None
        for name in (f"{chain_id}.yaml", f"{chain_id}.yml"):
            path = self.directory / name
            if path.is_file():
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
