"""YAML text -> Chain. (Minimal first cut: full line-aware validation lands in validation.py.)"""

from __future__ import annotations

from pathlib import Path

import yaml

from engine.chain import Chain
from engine.spec import ChainSpec

__all__ = ["CHAINS_DIR", "PROJECT_ROOT", "find_chain", "load_chain"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHAINS_DIR = PROJECT_ROOT / "chains"


def find_chain(name: str | Path, chains_dir: Path = CHAINS_DIR) -> Path:
    """A chain file from a path or the id of a chain in ``chains_dir``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return chains_dir / f"{name}.yaml"


def load_chain(source: str | Path) -> Chain:
    """Load and validate a chain file."""
    path = find_chain(source)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec = ChainSpec.model_validate(data)
    return Chain.from_spec(spec, path=path)
