"""Document collections: where a ``retrieve`` stage's passages come from.

A collection is a folder of ``.md``, ``.txt``, ``.pdf`` (one passage group per page), ``.docx``,
``.csv`` and ``.xlsx`` files (each row one passage, the header row naming the fields, every
sheet), or a LangChain retriever named by import path. ``configs/collections.yaml`` names
collections; a chain may also give a folder relative to the chain file.

Long texts are chunked by the split rules (``engine.splitting``). A corrupt PDF, DOCX or XLSX is
skipped with a warning that names it; a file that cannot be read at all (or a text file that is
not UTF-8), a missing folder or a collection with no passages is a ``CollectionError`` naming
the path.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stagecast.engine.errors import CollectionError
from stagecast.engine.resources import config_file
from stagecast.engine.splitting import split_text

__all__ = [
    "COLLECTIONS_FILE",
    "SUPPORTED_SUFFIXES",
    "CollectionEntry",
    "CollectionError",
    "CollectionsConfig",
    "FileLoad",
    "INDEX_DIR_NAME",
    "Passage",
    "load_collections_config",
    "load_file",
    "collection_files",
    "resolve_folder",
]

log = logging.getLogger("stagecast.collections")

COLLECTIONS_FILE = "collections.yaml"
SUPPORTED_SUFFIXES = (".md", ".txt", ".pdf", ".docx", ".csv", ".xlsx")
INDEX_DIR_NAME = ".stagecast-index"


class CollectionEntry(BaseModel):
    """One named collection of configs/collections.yaml."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(None, description="What the collection holds.")
    path: str | None = Field(
        None,
        description="A folder of documents, relative to the folder that holds configs/.",
    )
    retriever: str | None = Field(
        None,
        description=(
            "A LangChain BaseRetriever or VectorStore (or a function returning one) by import "
            "path, `package.module:name`."
        ),
    )
    chunk_size: int = Field(2000, ge=50, description="Most characters in a text passage.")
    overlap: int = Field(200, ge=0, description="Characters shared by consecutive passages.")


class CollectionsConfig(BaseModel):
    """configs/collections.yaml: named collections."""

    model_config = ConfigDict(extra="forbid")

    collections: dict[str, CollectionEntry] = Field(default_factory=dict)
    file: Path | None = Field(None, exclude=True)
    """Where the config was read from (relative entry paths start beside its configs/ folder)."""

    def folder_of(self, name: str) -> Path | None:
        entry = self.collections[name]
        if entry.path is None:
            return None
        base = self.file.parent.parent if self.file is not None else Path.cwd()
        return (base / entry.path).resolve()


def load_collections_config(path: Path | None = None) -> CollectionsConfig:
    """``path``, else configs/collections.yaml of the working directory, else the shipped one."""
    file = path or config_file(COLLECTIONS_FILE)
    if not file.is_file():
        if path is not None:
            raise CollectionError(f"{file}: no such file")
        return CollectionsConfig()
    stat = file.stat()
    return _parse(file.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse(file: Path, mtime_ns: int, size: int) -> CollectionsConfig:
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        config = CollectionsConfig.model_validate(data)
    except yaml.YAMLError as exc:
        raise CollectionError(f"{file}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise CollectionError(f"{file}: {problems}") from None
    config.file = file
    return config


def resolve_folder(value: str, base: Path) -> Path:
    """A collection given as a folder: relative to ``base`` (the chain file's folder)."""
    given = Path(value).expanduser()
    return (given if given.is_absolute() else base / given).resolve()


# -- passages -----------------------------------------------------------------------------------


@dataclass(slots=True)
class Passage:
    """One searchable piece of a document."""

    id: str
    """Stable across runs: the file's path in the collection plus where in the file."""
    title: str
    text: str
    path: str
    """The file, relative to the collection folder (``/`` separated)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """``file`` always; ``page`` (PDF), ``sheet`` and ``row`` (CSV/XLSX), ``heading`` (MD/DOCX)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "path": self.path,
            "metadata": self.metadata,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Passage:
        return cls(data["id"], data["title"], data["text"], data["path"], data["metadata"])


@dataclass(slots=True)
class FileLoad:
    """What one file gave: its passages, or why it was skipped."""

    passages: list[Passage]
    skipped: str | None = None


def collection_files(folder: Path) -> list[Path]:
    """The supported files under ``folder`` (recursively, hidden files and folders excluded)."""
    if not folder.exists():
        raise CollectionError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CollectionError(f"{folder}: not a folder")
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith((".", "~$")) for part in rel.parts):
            continue
        if path.suffix.lower() in SUPPORTED_SUFFIXES and path.is_file():
            found.append(path)
    return found


def load_file(path: Path, rel: str, chunk_size: int = 2000, overlap: int = 200) -> FileLoad:
    """Read one file into passages. A corrupt PDF/DOCX/XLSX is skipped (``skipped`` says why)."""
    suffix = path.suffix.lower()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CollectionError(f"{path}: cannot read: {exc.strerror or exc}") from None
    chunking = (chunk_size, min(overlap, chunk_size - 1))
    if suffix in (".md", ".txt"):
        text = _decode(data, path)
        sections: list[tuple[str | None, str]] = (
            _markdown_sections(text) if suffix == ".md" else [(None, text)]
        )
        return FileLoad(list(_sections(rel, sections, *chunking)))
    if suffix == ".pdf":
        return _load_pdf(data, path, rel, *chunking)
    if suffix == ".docx":
        try:
            sections = _docx_sections(data)
        except Exception as exc:  # python-docx raises zipfile, KeyError, lxml errors …
            return FileLoad([], f"not a readable DOCX file ({type(exc).__name__}: {exc})")
        return FileLoad(list(_sections(rel, sections, *chunking)))
    if suffix == ".csv":
        text = _decode(data, path)
        rows = list(csv.reader(io.StringIO(text)))
        return FileLoad(list(_rows(rel, None, rows)))
    if suffix == ".xlsx":
        return _load_xlsx(data, path, rel)
    raise CollectionError(f"{path}: unsupported file type {suffix!r}")


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CollectionError(f"{path}: cannot read: not UTF-8 text") from None


_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _markdown_sections(text: str) -> list[tuple[str | None, str]]:
    """(heading, body) per section; the body keeps its heading line, so it is searchable."""
    sections: list[tuple[str | None, str]] = []
    heading: str | None = None
    lines: list[str] = []
    fenced = False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else _HEADING.match(line.rstrip("\n"))
        if match is not None:
            if "".join(lines[1 if heading else 0 :]).strip():
                sections.append((heading, "".join(lines)))
            heading, lines = match.group(2), [line]
        else:
            lines.append(line)
    if "".join(lines[1 if heading else 0 :]).strip():
        sections.append((heading, "".join(lines)))
    return sections


def _sections(
    rel: str,
    sections: list[tuple[str | None, str]],
    chunk_size: int,
    overlap: int,
    extra: dict[str, Any] | None = None,
    locator: str = "",
) -> Iterator[Passage]:
    stem = Path(rel).stem
    counter = 0
    for heading, body in sections:
        for chunk in split_text(body, chunk_size, overlap):
            counter += 1
            metadata: dict[str, Any] = {"file": rel, **(extra or {})}
            if heading:
                metadata["heading"] = heading
            title = f"{stem}: {heading}" if heading else stem
            if "page" in metadata:
                title = f"{title}, page {metadata['page']}"
            yield Passage(
                id=f"{rel}#{locator}{counter}",
                title=title,
                text=chunk["text"].strip(),
                path=rel,
                metadata=metadata,
            )


def _load_pdf(data: bytes, path: Path, rel: str, chunk_size: int, overlap: int) -> FileLoad:
    from pypdf import PdfReader

    passages: list[Passage] = []
    try:
        reader = PdfReader(io.BytesIO(data))
        for number, page in enumerate(reader.pages, start=1):
            text = page.extract_text() or ""
            passages.extend(
                _sections(rel, [(None, text)], chunk_size, overlap, {"page": number}, f"p{number}-")
            )
    except Exception as exc:  # pypdf also raises IndexError, AssertionError, zlib.error …
        return FileLoad([], f"not a readable PDF ({type(exc).__name__}: {exc})")
    return FileLoad(passages)


def _docx_sections(data: bytes) -> list[tuple[str | None, str]]:
    import docx

    document = docx.Document(io.BytesIO(data))
    sections: list[tuple[str | None, str]] = []
    heading: str | None = None
    lines: list[str] = []
    for paragraph in document.paragraphs:
        style = paragraph.style.name if paragraph.style is not None else ""
        text = paragraph.text
        if (style or "").lower().startswith(("heading", "title")) and text.strip():
            if "".join(lines[1 if heading else 0 :]).strip():
                sections.append((heading, "\n\n".join(lines)))
            heading, lines = text.strip(), [text]
        elif text.strip():
            lines.append(text)
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text for cell in row.cells))
    if "".join(lines[1 if heading else 0 :]).strip():
        sections.append((heading, "\n\n".join(lines)))
    return sections


def _load_xlsx(data: bytes, path: Path, rel: str) -> FileLoad:
    from openpyxl import load_workbook

    try:
        workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    except Exception as exc:  # openpyxl raises zipfile, KeyError, InvalidFileException …
        return FileLoad([], f"not a readable XLSX file ({type(exc).__name__}: {exc})")
    passages: list[Passage] = []
    try:
        for sheet in workbook.worksheets:
            rows = [
                ["" if cell is None else str(cell) for cell in row]
                for row in sheet.iter_rows(values_only=True)
            ]
            passages.extend(_rows(rel, sheet.title, rows))
    finally:
        workbook.close()
    return FileLoad(passages)


def _rows(rel: str, sheet: str | None, rows: list[list[str]]) -> Iterator[Passage]:
    """One passage per data row; the first non-empty row is the header (the field names)."""
    header: list[str] | None = None
    stem = Path(rel).stem
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells):
            continue
        if header is None:
            header = [c or f"column {i + 1}" for i, c in enumerate(cells)]
            continue
        names = header + [f"column {i + 1}" for i in range(len(header), len(cells))]
        fields = {names[i]: v for i, v in enumerate(cells) if v}
        text = "\n".join(f"{k}: {v}" for k, v in fields.items())
        first = next(iter(fields.values()))
        where = f"{sheet}, row {number}" if sheet else f"row {number}"
        metadata: dict[str, Any] = {"file": rel, "row": number, "fields": fields}
        if sheet is not None:
            metadata["sheet"] = sheet
        locator = f"{sheet}!row{number}" if sheet else f"row{number}"
        yield Passage(
            id=f"{rel}#{locator}",
            title=f"{stem} ({where}): {_short(first)}",
            text=text,
            path=rel,
            metadata=metadata,
        )


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
