"""YAML text -> Chain, keeping the line and column of every key so problems point at the file.

Loading is three passes over one parse:

1. ``yaml.compose`` (SafeLoader) gives nodes with marks; a walk records, for every key path
   (``("stages", 0, "prompt", "user")``), where its key and its value start (a ``SourceMap``).
2. The nodes become plain data and ``ChainSpec.model_validate`` checks shapes and types; each
   pydantic error's ``loc`` is mapped back to the nearest key path that exists in the file.
3. ``engine.validation.check_chain`` runs the cross-stage checks (references, cycles, template
   variables, model names …) on the spec.

Every problem is collected and raised together as one ``ChainSpecError``; nothing here lets a
traceback reach a chain author.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import yaml
from pydantic import TypeAdapter, ValidationError

from stagecast.engine.chain import Chain
from stagecast.engine.errors import ChainSpecError, Problem
from stagecast.engine.resources import CHAIN_SUFFIXES, chain_dirs, chain_files, data_path
from stagecast.engine.sourcemap import KeyPath, SourceMap, Span
from stagecast.engine.spec import (
    ID_PATTERN,
    ChainSpec,
    StageSpec,
)
from stagecast.engine.spec_problems import partial_spec, pydantic_problems, with_guessed_kinds
from stagecast.engine.validation import check_chain

__all__ = [
    "find_chain",
    "load_chain",
    "load_chain_text",
    "parse_chain_text",
    "validate_chain_file",
]


_STAGE_ADAPTER: TypeAdapter[StageSpec] = TypeAdapter(StageSpec)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------------------------
# Public API


def find_chain(name: str | Path, chains_dir: Path | Sequence[Path] | None = None) -> Path:
    """A chain file from a path, or from the id of a chain (its file stem) in the chain dirs.

    The dirs are ``chains_dir`` when given, else ``./chains`` of the working directory and then
    the shipped chains (``resources.chain_dirs``). Raises ChainSpecError naming the chains that
    exist when there is no such chain.
    """
    path = data_path(name) if chains_dir is None else Path(name)
    if path.is_file():
        return path
    if chains_dir is None:
        dirs = chain_dirs()
    elif isinstance(chains_dir, Path):
        dirs = (chains_dir,)
    else:
        dirs = tuple(chains_dir)
    has_suffix = path.suffix in CHAIN_SUFFIXES
    names = [path] if has_suffix else [Path(f"{name}{suffix}") for suffix in CHAIN_SUFFIXES]
    for directory in dirs:
        for candidate in names:
            if (directory / candidate).is_file():
                return directory / candidate
    if has_suffix or len(path.parts) > 1:
        raise ChainSpecError([Problem(str(path), None, None, "", "no such chain file")])
    where = str(dirs[0]) if len(dirs) == 1 else ""
    available = list(chain_files(dirs))
    if not available:
        searched = ", ".join(str(d) for d in dirs)
        problem = (
            f"no chain '{name}': the directory has none"
            if where
            else (f"no chain '{name}': no chains in {searched}")
        )
        raise ChainSpecError([Problem(where, None, None, "", problem)])
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f"did you mean '{close[0]}'?" if close else ""
    problem = f"no chain '{name}'; chains are: {', '.join(available)}"
    raise ChainSpecError([Problem(where, None, None, "", problem, hint)])


def load_chain(source: str | Path, *, model_names: Collection[str] | None = None) -> Chain:
    """Load and validate a chain file (a path, or a chain id in ``chains/``).

    Raises ChainSpecError listing every problem found, each with file, line and column.
    ``model_names`` (the names in configs/models.yaml) turns on the unknown-model check.
    """
    path = find_chain(source)
    text = _read(path)
    spec, problems = parse_chain_text(text, filename=str(path), model_names=model_names)
    if problems or spec is None:
        raise ChainSpecError(problems)
    return Chain.from_spec(spec, path=path)


def load_chain_text(
    text: str, *, filename: str = "<string>", model_names: Collection[str] | None = None
) -> Chain:
    """Load and validate a chain from YAML text; ``filename`` is what problems are reported at."""
    spec, problems = parse_chain_text(text, filename=filename, model_names=model_names)
    if problems or spec is None:
        raise ChainSpecError(problems)
    return Chain.from_spec(spec, id=_default_id(filename))


def validate_chain_file(
    path: str | Path, *, model_names: Collection[str] | None = None
) -> list[Problem]:
    """Every problem of a chain file, in file order (an empty list: the chain is valid)."""
    try:
        text = _read(Path(path))
    except ChainSpecError as exc:
        return exc.problems
    _, problems = parse_chain_text(text, filename=str(path), model_names=model_names)
    return problems


def parse_chain_text(
    text: str, *, filename: str = "<string>", model_names: Collection[str] | None = None
) -> tuple[ChainSpec | None, list[Problem]]:
    """The spec (None if shapes or types are wrong) and every problem found, in file order."""
    source = SourceMap(filename, text)
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        return None, [_yaml_problem(filename, exc)]
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, controls)
        line, col = _line_col(text, exc.position)
        what = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        return None, [
            Problem(filename, line, col, "", f"invalid YAML: the character {what} is not allowed")
        ]
    except RecursionError:
        problem = f"the document is nested too deeply (more than {MAX_DEPTH} levels)"
        return None, [Problem(filename, 1, 1, "", problem)]
    except yaml.YAMLError as exc:  # pragma: no cover - every other PyYAML error has a mark
        return None, [Problem(filename, 1, 1, "", f"invalid YAML: {exc}")]
    if node is not None:
        shape = _shape_problem(node, filename)
        if shape is not None:
            return None, [shape]
    if node is None:
        return None, [
            Problem(filename, 1, 1, "", "the file is empty; a chain is a mapping with `stages`")
        ]
    if not isinstance(node, yaml.MappingNode):
        what = "a list" if isinstance(node, yaml.SequenceNode) else "a single value"
        line, col = node.start_mark.line + 1, node.start_mark.column + 1
        return None, [
            Problem(
                filename,
                line,
                col,
                "",
                f"the top level must be a mapping (id, inputs, stages, …), not {what}",
                "start the file with keys such as `id:` and `stages:`",
            )
        ]
    loader = yaml.SafeLoader("")
    duplicates: list[tuple[KeyPath, Span, int]] = []
    try:
        _walk(node, (), source.spans, duplicates, loader, set())
        source.data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        return None, [_yaml_problem(filename, exc)]
    finally:
        loader.dispose()
    source.spans[()] = Span(1, 1, node.start_mark.line + 1, node.start_mark.column + 1, 1)
    for path, span, first_line in duplicates:
        problems.append(
            Problem(
                filename,
                span.key_line,
                span.key_col,
                source.key(path),
                f"duplicate key (first at line {first_line})",
                "remove one of them; YAML would silently keep the last",
            )
        )

    spec: ChainSpec | None
    broken: set[int] = set()
    try:
        spec = ChainSpec.model_validate(source.data)
    except ValidationError as exc:
        problems.extend(pydantic_problems(exc, source))
        data = source.data
        for _ in range(8):  # a bad `kind:` must not hide the rest of its stage: guess, recheck
            guessed = with_guessed_kinds(data)
            if guessed is None:
                break
            data = guessed
            try:
                ChainSpec.model_validate(guessed)
            except ValidationError as again:
                problems.extend(pydantic_problems(again, replace(source, data=guessed)))
            else:
                break
        spec = partial_spec(data, broken)
    else:
        if spec.id is None and not re.match(ID_PATTERN, _default_id(filename) or "chain"):
            problems.append(
                Problem(
                    filename,
                    1,
                    1,
                    "",
                    f"the file name '{Path(filename).stem}' is not a valid chain id",
                    "rename the file (lowercase letters, digits, `_`, `-`) or set `id:`",
                )
            )
    problems.extend(check_chain(spec, source, model_names=model_names, broken=broken))
    problems = _sorted_unique(problems)
    return (None if problems else spec), problems


# --------------------------------------------------------------------------------------------
# Helpers: reading and YAML


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChainSpecError([Problem(str(path), None, None, "", "no such chain file")]) from None
    except UnicodeDecodeError as exc:
        data = exc.object if isinstance(exc.object, bytes) else b""
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        problem = f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ChainSpecError([Problem(str(path), line, col, "", problem)]) from None
    except OSError as exc:
        problem = f"cannot read the file: {exc.strerror or exc}"
        raise ChainSpecError([Problem(str(path), None, None, "", problem)]) from None


def _default_id(filename: str) -> str | None:
    if filename.startswith("<"):
        return None
    return Path(filename).stem


def _yaml_problem(filename: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    line = mark.line + 1 if mark else None
    col = mark.column + 1 if mark else None
    problem = exc.problem or exc.context or "invalid YAML"
    hint = ""
    if exc.context and exc.problem and exc.context_mark is not None:
        hint = f"{exc.context} (line {exc.context_mark.line + 1})"
    if "found character '\\t'" in problem:
        hint = "YAML indents with spaces, never tabs"
    source_line = _source_line(mark)
    if "{{" in source_line or "{%" in source_line:
        # `text: {{ inputs.x }}` is a YAML mapping inside a mapping, not a template
        hint = 'quote the template: a value that starts with { must be in quotes, e.g. "{{ … }}"'
    return Problem(filename, line, col, "", f"invalid YAML: {problem}", hint)


def _source_line(mark: yaml.Mark | None) -> str:
    """The line of the document a YAML error points at ('' when the mark has no buffer)."""
    buffer = getattr(mark, "buffer", None)
    if mark is None or not isinstance(buffer, str):
        return ""
    start = buffer.rfind("\n", 0, mark.index) + 1
    end = buffer.find("\n", mark.index)
    return buffer[start : end if end >= 0 else len(buffer)]


def _walk(
    node: yaml.Node,
    path: KeyPath,
    spans: dict[KeyPath, Span],
    duplicates: list[tuple[KeyPath, Span, int]],
    loader: yaml.SafeLoader,
    seen: set[int],
) -> None:
    if id(node) in seen:  # an alias: the anchor's positions are already recorded
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str | int, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = _key_of(key_node, loader)
            span = _span(key_node, value_node)
            if key in first:
                duplicates.append(((*path, key), span, first[key]))
                continue
            first[key] = span.key_line
            spans[(*path, key)] = span
            _walk(value_node, (*path, key), spans, duplicates, loader, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            spans[(*path, index)] = _span(item, item)
            _walk(item, (*path, index), spans, duplicates, loader, seen)


MAX_DEPTH = 64
"""Deepest nesting a chain document may have (real chains, JSON Schemas included, use ~15)."""
MAX_VALUES = 100_000
"""Most values a chain document may stand for once its aliases are expanded."""
MAX_TEXT = 10_000_000
"""Most characters of text a chain document may stand for once its aliases are expanded."""


def _line_col(text: str, position: int) -> tuple[int, int]:
    line = text.count("\n", 0, position) + 1
    return line, position - (text.rfind("\n", 0, position) + 1) + 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _shape_problem(root: yaml.Node, filename: str) -> Problem | None:
    """A document too deep, recursive, or that aliases expand past ``MAX_VALUES`` (a
    "billion laughs"): reported at the node, before anything walks the expanded data."""

    def at(node: yaml.Node, problem: str, hint: str = "") -> Problem:
        mark = node.start_mark
        return Problem(filename, mark.line + 1, mark.column + 1, "", problem, hint)

    sizes: dict[int, int] = {}
    texts: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, closing = stack.pop()
        key = id(node)
        if closing:
            open_nodes.discard(key)
            children = _children(node)
            size = 1 + sum(sizes[id(child)] for child in children)
            text = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            text += sum(texts[id(child)] for child in children)
            sizes[key], texts[key] = size, text
            if size > MAX_VALUES:
                return at(
                    node,
                    f"this value stands for more than {MAX_VALUES:,} values once its YAML "
                    "aliases are expanded",
                    "write the values out, or anchor less deeply nested ones",
                )
            if text > MAX_TEXT:
                return at(
                    node,
                    f"this value stands for more than {MAX_TEXT:,} characters of text once its "
                    "YAML aliases are expanded",
                    "write the text out once; do not repeat a long anchored text through aliases",
                )
            continue
        if key in sizes:
            continue
        if depth > MAX_DEPTH:
            return at(node, f"nested too deeply (more than {MAX_DEPTH} levels)")
        open_nodes.add(key)
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) in open_nodes:
                return at(child, "a YAML alias that contains itself (a recursive anchor)")
            if id(child) not in sizes:
                stack.append((child, depth + 1, False))
    return None


def _key_of(node: yaml.Node, loader: yaml.SafeLoader) -> str | int:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_object(node)
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        return str(value)
    return f"<{type(node).__name__}>"


def _span(key_node: yaml.Node, value_node: yaml.Node) -> Span:
    style = value_node.style if isinstance(value_node, yaml.ScalarNode) else None
    return Span(
        key_node.start_mark.line + 1,
        key_node.start_mark.column + 1,
        value_node.start_mark.line + 1,
        value_node.start_mark.column + 1,
        value_node.end_mark.line + 1,
        style,
    )


def _sorted_unique(problems: list[Problem]) -> list[Problem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.file, p.line or 0, p.col or 0, p.key))
