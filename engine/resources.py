"""Where the chains and configuration files are, installed or not.

The shipped chains and configs are package data (``stagecast.chains``, ``stagecast.configs``),
read through ``importlib.resources``, so a wheel installed anywhere finds them. An author's own
``./chains`` and ``./configs`` in the working directory come first: a chain id or a config file
found there wins over the shipped one of the same name.

A relative path that starts with ``chains/`` or ``configs/`` and does not exist in the working
directory is looked up in the package data too (``data_path``), so the README's commands
(``--inputs chains/examples/advanced_summary.json``) work outside a checkout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = [
    "CHAIN_SUFFIXES",
    "SHIPPED_CHAINS",
    "SHIPPED_CONFIGS",
    "chain_dirs",
    "chain_files",
    "config_file",
    "data_glob",
    "data_path",
]

CHAIN_SUFFIXES = (".yaml", ".yml")


def _package_dir(package: str) -> Path:
    found = importlib.resources.files(package)
    # pip installs wheels unpacked, so package data is a real directory
    if not isinstance(found, Path):  # pragma: no cover - a zipped install
        raise RuntimeError(f"{package} is not installed as a directory ({found})")
    return found


SHIPPED_CHAINS = _package_dir("stagecast.chains")
"""The chains installed with Stagecast (``chains/`` of the source tree)."""
SHIPPED_CONFIGS = _package_dir("stagecast.configs")
"""The configuration files installed with Stagecast (``configs/`` of the source tree)."""


def chain_dirs(cwd: Path | None = None) -> tuple[Path, ...]:
    """``./chains`` of the working directory (when it exists), then the shipped chains."""
    here = (cwd or Path.cwd()) / "chains"
    dirs = [here] if here.is_dir() else []
    if not any(d.resolve() == SHIPPED_CHAINS.resolve() for d in dirs):
        dirs.append(SHIPPED_CHAINS)
    return tuple(dirs)


def chain_files(dirs: tuple[Path, ...] | None = None) -> dict[str, Path]:
    """Chain files by file stem across ``dirs`` (default ``chain_dirs()``); earlier dirs win."""
    found: dict[str, Path] = {}
    for directory in dirs if dirs is not None else chain_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in CHAIN_SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def config_file(name: str, cwd: Path | None = None) -> Path:
    """``./configs/<name>`` when it exists, else the shipped one (which may not exist either)."""
    local = (cwd or Path.cwd()) / "configs" / name
    return local if local.is_file() else SHIPPED_CONFIGS / name


def data_glob(pattern: str, cwd: Path | None = None) -> list[Path]:
    """The files a glob matches in the working directory, else in the shipped chains/configs.

    For a shell that passed ``chains/*.yaml`` through unexpanded (no ./chains here).
    """
    base = cwd or Path.cwd()
    found = sorted(base.glob(pattern)) if not Path(pattern).is_absolute() else []
    if found or Path(pattern).is_absolute():
        return found
    parts = Path(pattern).parts
    shipped = {"chains": SHIPPED_CHAINS, "configs": SHIPPED_CONFIGS}.get(parts[0])
    if shipped is None or len(parts) < 2:
        return []
    return sorted(shipped.glob(str(Path(*parts[1:]))))


def data_path(path: str | Path, cwd: Path | None = None) -> Path:
    """``path`` as given, or its shipped copy when it is ``chains/…`` or ``configs/…`` and absent.

    Anything else (absolute paths, other folders, files that exist) comes back unchanged, so the
    caller's own "no such file" error still names what the user typed.
    """
    given = Path(path)
    if given.is_absolute() or given.exists():
        return given
    base = cwd or Path.cwd()
    if (base / given).exists() or len(given.parts) < 2:
        return given
    shipped = {"chains": SHIPPED_CHAINS, "configs": SHIPPED_CONFIGS}.get(given.parts[0])
    if shipped is None:
        return given
    candidate = shipped.joinpath(*given.parts[1:])
    return candidate if candidate.exists() else given
