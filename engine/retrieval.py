"""Retrieval: the embedded BM25 index (bm25s) over a collection, and bring-your-own retrievers.

The tokenizer handles English (lowercase, stopwords, Snowball stemming through PyStemmer) and
Korean. For Korean it uses kiwipiepy's morphological analysis by default — content morphemes
(nouns, verb and adjective stems, roots, numbers, foreign words) without particles and endings —
because it retrieved better than character bigrams on the sample collection (see
docs/authoring.md § retrieve and ``tests/engine/test_retrieval.py``); ``ngram`` stays available.

An index is built on first use and cached on disk in ``.stagecast-index/`` inside the collection
folder (or in ``cache_dir`` when given; in ``~/.cache/stagecast/index`` for the collections
shipped in an installed package; in a temp folder when the folder is read-only), with a manifest
of every file's SHA-256: any edit, addition or deletion rebuilds it; touching a file does not.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from stagecast.engine.collections import (
    COLLECTIONS_FILE,
    INDEX_DIR_NAME,
    SUPPORTED_SUFFIXES,
    CollectionError,
    CollectionsConfig,
    Passage,
    collection_files,
    load_file,
    log,
    resolve_folder,
)
from stagecast.engine.events import Source
from stagecast.engine.resources import SHIPPED_CHAINS

__all__ = [
    "BM25Index",
    "FolderRetriever",
    "collection_problem",
    "resolve_retriever",
    "Hit",
    "IndexStats",
    "LangChainRetriever",
    "Retriever",
    "Tokenizer",
    "open_index",
    "retriever_from_import_path",
    "retriever_from_object",
]

INDEX_FORMAT = 2
"""Bump when passages or terms change for the same files: cached indexes are rebuilt."""
KoreanMode = Literal["kiwi", "ngram"]

_WORDS = re.compile(r"[가-힣ㄱ-ㅎㅏ-ㅣ]+|[^\W_]+", re.UNICODE)
_HANGUL = re.compile(r"[가-힣ㄱ-ㅎㅏ-ㅣ]")
# kiwi tags kept: nouns, pronouns, numerals, verb/adjective stems, roots, foreign words, numbers
_KIWI_KEEP = ("NNG", "NNP", "NR", "NP", "VV", "VA", "XR", "SL", "SN", "SH", "MAG")

_STOPWORDS_EN = frozenset(
    """a an and are as at be but by for if in into is it no not of on or such that the their then
    there these they this to was will with what which who whom how when where why do does did
    can could should would i me my we our you your he she his her its them am been being have
    has had having from about than so very too also just any all""".split()
)


# very common stems and nouns that match almost any Korean question ("어떻게 하나요?")
_STOPWORDS_KO = frozenset(
    "하다 되다 있다 없다 않다 어떻다 이렇다 그렇다 같다 주다 알다 싶다 것 수 등 때 저 나 내 우리 "
    "무엇 뭐 어디 언제 누구 얼마 이".split()
)


class Tokenizer:
    """Text -> search terms, for English and Korean (``korean``: ``kiwi`` or ``ngram``)."""

    _kiwi: Any = None
    _kiwi_lock = threading.Lock()
    _kiwi_calls = threading.Lock()

    def __init__(self, korean: KoreanMode = "kiwi") -> None:
        import Stemmer

        self.korean = korean
        self._stem = Stemmer.Stemmer("english").stemWord
        self._stem_cache: dict[str, str] = {}

    @property
    def name(self) -> str:
        return f"en-snowball+ko-{self.korean}"

    @classmethod
    def kiwi(cls) -> Any:
        with cls._kiwi_lock:
            if cls._kiwi is None:
                from kiwipiepy import Kiwi

                cls._kiwi = Kiwi()
            return cls._kiwi

    def _english(self, word: str, out: list[str]) -> None:
        lowered = word.lower()
        if lowered in _STOPWORDS_EN:
            return
        stem = self._stem_cache.get(lowered)
        if stem is None:
            stem = self._stem_cache[lowered] = self._stem(lowered)
        out.append(stem)

    def _bigrams(self, word: str, out: list[str]) -> None:
        if len(word) == 1:
            out.append(word)
        out.extend(word[i : i + 2] for i in range(len(word) - 1))

    def tokenize(self, text: str) -> list[str]:
        return self.tokenize_many([text])[0]

    def tokenize_many(self, texts: Sequence[str]) -> list[list[str]]:
        results: list[list[str]] = []
        korean = [bool(_HANGUL.search(t)) for t in texts] if self.korean == "kiwi" else []
        analysed: dict[int, Any] = {}
        if any(korean):
            kiwi = self.kiwi()
            indexes = [i for i, k in enumerate(korean) if k]
            with self._kiwi_calls:  # one shared Kiwi; runs search from worker threads
                tokenized = list(kiwi.tokenize([texts[i] for i in indexes]))
            for i, tokens in zip(indexes, tokenized, strict=True):
                analysed[i] = tokens
        for i, text in enumerate(texts):
            out: list[str] = []
            if i in analysed:
                for token in analysed[i]:
                    tag = token.tag.split("-")[0]
                    if tag not in _KIWI_KEEP:
                        continue
                    form = token.form
                    if tag == "SL":
                        self._english(form, out)
                        continue
                    term = form + "다" if tag in ("VV", "VA") else form.lower()
                    if term not in _STOPWORDS_KO:
                        out.append(term)
            else:
                for word in _WORDS.findall(text):
                    if _HANGUL.match(word):
                        self._bigrams(word, out)
                    else:
                        self._english(word, out)
            results.append(out)
        return results


@dataclass(slots=True)
class Hit:
    """One retrieved passage."""

    id: str
    title: str | None
    text: str
    score: float | None
    url: str | None
    metadata: dict[str, Any]

    def source(self) -> Source:
        return Source(
            id=self.id,
            title=self.title,
            text=self.text,
            url=self.url,
            score=self.score,
            metadata=self.metadata,
        )

    def to_output(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "text": self.text,
            "score": self.score,
            "url": self.url,
            "metadata": self.metadata,
        }


class Retriever(Protocol):
    """What a ``retrieve`` stage searches: the embedded index or an adapted LangChain retriever."""

    async def search(self, query: str, top_k: int, min_score: float | None) -> list[Hit]: ...


@dataclass(slots=True)
class IndexStats:
    """What building (or loading) an index found."""

    passages: int
    files: int
    seconds: float
    rebuilt: bool
    location: Path
    skipped: list[tuple[Path, str]]


class BM25Index:
    """A BM25 index over a collection's passages (bm25s, Lucene scoring)."""

    def __init__(self, passages: list[Passage], tokenizer: Tokenizer, bm25: Any) -> None:
        self.passages = passages
        self.tokenizer = tokenizer
        self.bm25 = bm25
        self.stats: IndexStats | None = None

    @classmethod
    def build(cls, passages: list[Passage], tokenizer: Tokenizer) -> BM25Index:
        import bm25s

        # the text only: a title repeats the file name, which would weigh in every passage of it
        corpus = tokenizer.tokenize_many([p.text for p in passages])
        bm25 = bm25s.BM25()
        bm25.index(corpus, show_progress=False)
        return cls(passages, tokenizer, bm25)

    def scores(self, query: str, top_k: int) -> list[tuple[int, float]]:
        """(passage index, score) of the ``top_k`` best passages scoring above 0, best first."""
        import numpy as np

        vocab = self.bm25.vocab_dict
        terms = [t for t in self.tokenizer.tokenize(query) if t in vocab]
        if not terms or not self.passages:
            return []
        scores = self.bm25.get_scores(terms)
        k = min(top_k, len(scores))
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        best = np.flatnonzero(scores >= max(kth, np.float32(1e-9)))  # ties at the k-th included
        # equal scores in passage order, so the same query always gives the same hits
        best = best[np.lexsort((best, -scores[best]))][:k]
        return [(int(i), float(scores[i])) for i in best]

    def search_sync(self, query: str, top_k: int, min_score: float | None = None) -> list[Hit]:
        if not query.strip():
            return []
        hits: list[Hit] = []
        for index, raw in self.scores(query, top_k):
            score = round(raw, 4)  # what the source event shows is what min_score compares
            if min_score is not None and score < min_score:
                break
            passage = self.passages[index]
            hits.append(
                Hit(
                    id=passage.id,
                    title=passage.title,
                    text=passage.text,
                    score=score,
                    url=passage.path,
                    metadata=dict(passage.metadata),
                )
            )
        return hits

    async def search(self, query: str, top_k: int, min_score: float | None) -> list[Hit]:
        return self.search_sync(query, top_k, min_score)


# -- the on-disk cache ----------------------------------------------------------------------------

_memory: dict[tuple[str, str], BM25Index] = {}
_build_lock = threading.Lock()


def _user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stagecast" / "index"


def _index_dir(folder: Path, cache_dir: Path | None) -> Path:
    shipped = SHIPPED_CHAINS.resolve()
    installed = not (shipped.parent / "pyproject.toml").exists()  # not a source checkout
    if cache_dir is None and installed and folder.resolve().is_relative_to(shipped):
        cache_dir = _user_cache_dir()  # a shipped collection: never write into site-packages
    if cache_dir is not None:
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        return cache_dir / f"{folder.name}-{digest}"
    return folder / INDEX_DIR_NAME


def _manifest(folder: Path, tokenizer: Tokenizer, chunk_size: int, overlap: int) -> dict[str, Any]:
    files: dict[str, str] = {}
    for path in collection_files(folder):
        try:
            files[path.relative_to(folder).as_posix()] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
        except OSError as exc:
            raise CollectionError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return {
        "format": INDEX_FORMAT,
        "tokenizer": tokenizer.name,
        "chunk_size": chunk_size,
        "overlap": overlap,
        "files": files,
    }


def open_index(
    folder: Path,
    *,
    tokenizer: Tokenizer | None = None,
    chunk_size: int = 2000,
    overlap: int = 200,
    cache_dir: Path | None = None,
    on_file: Callable[[Path, int, int], None] | None = None,
    force: bool = False,
) -> BM25Index:
    """The index of ``folder``: from memory, from the disk cache, or built (and cached).

    ``on_file(path, done, total)`` is called as each file is read during a build.
    """
    import bm25s

    started = time.monotonic()
    folder = folder.resolve()
    tokenizer = tokenizer or Tokenizer()
    manifest = _manifest(folder, tokenizer, chunk_size, overlap)
    if not manifest["files"]:
        raise CollectionError(
            f"{folder}: empty collection: no {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    signature = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    key = (str(folder), signature)
    with _build_lock:
        if not force and key in _memory:
            return _memory[key]
        location = _index_dir(folder, cache_dir)
        index = None if force else _load_cached(location, signature, tokenizer, bm25s)
        rebuilt = index is None
        skipped: list[tuple[Path, str]] = []
        if index is None:
            passages, skipped = _read_passages(folder, manifest, chunk_size, overlap, on_file)
            if not passages:
                raise CollectionError(f"{folder}: empty collection: the files hold no text")
            index = BM25Index.build(passages, tokenizer)
            location = _save(index, location, folder, signature, manifest, skipped)
        files = len(manifest["files"])
        index.stats = IndexStats(
            passages=len(index.passages),
            files=files,
            seconds=time.monotonic() - started,
            rebuilt=rebuilt,
            location=location,
            skipped=skipped,
        )
        for old in [k for k in _memory if k[0] == key[0] and k != key]:
            del _memory[old]  # an edited collection: only its latest version stays in memory
        _memory[key] = index
        return index


def _read_passages(
    folder: Path,
    manifest: dict[str, Any],
    chunk_size: int,
    overlap: int,
    on_file: Callable[[Path, int, int], None] | None,
) -> tuple[list[Passage], list[tuple[Path, str]]]:
    passages: list[Passage] = []
    skipped: list[tuple[Path, str]] = []
    names = list(manifest["files"])
    for done, rel in enumerate(names, start=1):
        path = folder / rel
        loaded = load_file(path, rel, chunk_size, overlap)
        if loaded.skipped is not None:
            log.warning("%s: skipped: %s", path, loaded.skipped)
            skipped.append((path, loaded.skipped))
        passages.extend(loaded.passages)
        if on_file is not None:
            on_file(path, done, len(names))
    return passages, skipped


def _load_cached(location: Path, signature: str, tokenizer: Tokenizer, bm25s: Any) -> Any:
    try:
        meta = json.loads((location / "manifest.json").read_text(encoding="utf-8"))
        if meta.get("signature") != signature:
            return None
        data = json.loads((location / "passages.json").read_text(encoding="utf-8"))
        bm25 = bm25s.BM25.load(str(location / "bm25"))
        index = BM25Index([Passage.from_json(p) for p in data], tokenizer, bm25)
    except Exception:  # a cache that does not read back is rebuilt, never an error
        return None
    return index


def _save(
    index: BM25Index,
    location: Path,
    folder: Path,
    signature: str,
    manifest: dict[str, Any],
    skipped: list[tuple[Path, str]],
) -> Path:
    """Write the index atomically (a temporary folder renamed into place); best effort."""
    for target in (location, _index_dir(folder, Path(tempfile.gettempdir()) / "stagecast-index")):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
            index.bm25.save(str(work / "bm25"))
            (work / "passages.json").write_text(
                json.dumps([p.to_json() for p in index.passages], ensure_ascii=False),
                encoding="utf-8",
            )
            meta = {
                "signature": signature,
                **manifest,
                "skipped": [[str(p), why] for p, why in skipped],
            }
            (work / "manifest.json").write_text(
                json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8"
            )
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
            return target
        except OSError:
            continue  # a read-only collection: try the temporary cache, else keep it in memory
    return location


# -- bring your own retriever ---------------------------------------------------------------------


class LangChainRetriever:
    """A LangChain ``BaseRetriever`` (or ``VectorStore``) as a Stagecast retriever.

    Documents map to hits: ``page_content`` is the text, ``metadata`` is kept; the id is the
    document's ``id`` (or ``metadata["id"]``), else a hash of its source and text, so it is stable
    across runs; the score is ``metadata["score"]`` / ``["relevance_score"]`` when present.
    """

    def __init__(self, retriever: Any, name: str = "retriever") -> None:
        self.retriever = retriever
        self.name = name

    async def search(self, query: str, top_k: int, min_score: float | None) -> list[Hit]:
        if not query.strip():
            return []
        target = self.retriever
        if _is_vector_store(target):
            target = target.as_retriever(search_kwargs={"k": top_k})
        documents = await target.ainvoke(query)
        hits: list[Hit] = []
        for document in list(documents)[:top_k]:
            hit = _document_hit(document)
            if min_score is not None and hit.score is not None and hit.score < min_score:
                continue
            hits.append(hit)
        return hits


def _is_vector_store(value: Any) -> bool:
    try:
        from langchain_core.vectorstores import VectorStore
    except ImportError:  # pragma: no cover - langchain-core is a dependency
        return False
    return isinstance(value, VectorStore)


def _document_hit(document: Any) -> Hit:
    metadata = dict(getattr(document, "metadata", None) or {})
    text = str(getattr(document, "page_content", ""))
    doc_id = getattr(document, "id", None) or metadata.get("id")
    where = metadata.get("source") or metadata.get("url") or metadata.get("path")
    if not doc_id:
        doc_id = "doc-" + hashlib.sha256(f"{where}\n{text}".encode()).hexdigest()[:12]
    score = metadata.get("score", metadata.get("relevance_score"))
    title = metadata.get("title") or (Path(str(where)).name if where else None)
    return Hit(
        id=str(doc_id),
        title=str(title) if title is not None else None,
        text=text,
        score=float(score) if isinstance(score, int | float) else None,
        url=str(where) if where is not None else None,
        metadata=metadata,
    )


def retriever_from_object(value: Any, name: str) -> Retriever:
    """A ``Retriever`` from a LangChain retriever, a vector store, or a Stagecast retriever."""
    from langchain_core.retrievers import BaseRetriever

    if isinstance(value, BaseRetriever) or _is_vector_store(value):
        return LangChainRetriever(value, name)
    if callable(getattr(value, "search", None)):
        return value  # type: ignore[no-any-return]
    raise CollectionError(
        f"collection '{name}': {type(value).__name__} is not a LangChain BaseRetriever or "
        "VectorStore"
    )


def retriever_from_import_path(spec: str, name: str) -> Retriever:
    """Import ``package.module:attr`` (or ``package.module.attr``); call it if it is a factory."""
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise CollectionError(
            f"collection '{name}': retriever {spec!r} is not an import path like "
            "`package.module:name`"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CollectionError(
            f"collection '{name}': cannot import {module_name!r} ({exc})"
        ) from None
    try:
        value = getattr(module, attr)
    except AttributeError:
        raise CollectionError(f"collection '{name}': {module_name!r} has no {attr!r}") from None
    if isinstance(value, type) or (callable(value) and not _looks_like_retriever(value)):
        value = value()
    return retriever_from_object(value, name)


def _looks_like_retriever(value: Any) -> bool:
    return hasattr(value, "ainvoke") or hasattr(value, "as_retriever")


# -- from a stage's `collection` to a retriever ---------------------------------------------------


class FolderRetriever:
    """A folder collection: the BM25 index is opened (built or loaded) off the event loop."""

    def __init__(
        self,
        folder: Path,
        *,
        chunk_size: int = 2000,
        overlap: int = 200,
        cache_dir: Path | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.folder = folder
        self.chunk_size = chunk_size
        self.overlap = overlap
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self.tokenizer = tokenizer
        self._index: BM25Index | None = None

    def index(self) -> BM25Index:
        """Opened (files hashed, built or loaded) once per retriever, i.e. once per run: every
        retrieval of a run, map items included, searches the same version of the collection."""
        with self._lock:  # map items searching at once open it once, not once each
            if self._index is None:
                self._index = open_index(
                    self.folder,
                    tokenizer=self.tokenizer,
                    chunk_size=self.chunk_size,
                    overlap=self.overlap,
                    cache_dir=self.cache_dir,
                )
            return self._index

    def search_sync(self, query: str, top_k: int, min_score: float | None) -> list[Hit]:
        if not query.strip():
            return []
        return self.index().search_sync(query, top_k, min_score)

    async def search(self, query: str, top_k: int, min_score: float | None) -> list[Hit]:
        if not query.strip():
            return []
        return await asyncio.to_thread(self.search_sync, query, top_k, min_score)


def collection_problem(value: str, base: Path, config: CollectionsConfig) -> tuple[str, str] | None:
    """Why a stage's ``collection`` cannot be found before the run: (problem, hint), or None."""
    if value in config.collections:
        folder = config.folder_of(value)
        if folder is not None and not folder.is_dir():
            where = f" ({config.file})" if config.file else ""
            what = "not a folder" if folder.exists() else "no such folder"
            return f"collection '{value}'{where}: {folder}: {what}", ""
        return None
    folder = resolve_folder(value, base)
    if folder.is_dir():
        return None
    names = sorted(config.collections)
    known = f"collections are: {', '.join(names)}" if names else "no collections are configured"
    if folder.exists():
        return f"collection {value!r}: {folder}: not a folder", known
    if "/" in value or "\\" in value or value.startswith("."):
        return f"collection {value!r}: {folder}: no such folder", known
    close = difflib.get_close_matches(value, names, n=1)
    hint = (f"did you mean '{close[0]}'? " if close else "") + known
    return (
        f"unknown collection '{value}': not a name in configs/{COLLECTIONS_FILE} and no folder "
        f"{folder}",
        hint + "; or give a folder relative to the chain file",
    )


def resolve_retriever(
    value: str,
    *,
    base: Path,
    config: CollectionsConfig,
    retrievers: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
) -> Retriever:
    """The retriever a stage's ``collection`` names: given from Python, configured, or a folder."""
    if retrievers and value in retrievers:
        return retriever_from_object(retrievers[value], value)
    entry = config.collections.get(value)
    if entry is not None:
        if entry.retriever is not None:
            return retriever_from_import_path(entry.retriever, value)
        folder = config.folder_of(value)
        if folder is None:
            raise CollectionError(
                f"collection '{value}' has no `path` or `retriever` in {config.file}; pass it "
                f"from Python: run_chain(..., retrievers={{'{value}': my_retriever}})"
            )
        return FolderRetriever(
            folder, chunk_size=entry.chunk_size, overlap=entry.overlap, cache_dir=cache_dir
        )
    problem = collection_problem(value, base, config)
    if problem is not None:
        raise CollectionError(problem[0])
    return FolderRetriever(resolve_folder(value, base), cache_dir=cache_dir)
