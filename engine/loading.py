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

import datetime
import difflib
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from engine.chain import Chain
from engine.errors import ChainSpecError, Problem
from engine.spec import (
    ID_PATTERN,
    STAGE_ID_PATTERN,
    ChainSpec,
    Defaults,
    InputSpec,
    MapStage,
    StageSpec,
    TemplateStage,
)
from engine.validation import STAGE_KINDS, check_chain

__all__ = [
    "CHAINS_DIR",
    "PROJECT_ROOT",
    "KeyPath",
    "SourceMap",
    "Span",
    "find_chain",
    "load_chain",
    "load_chain_text",
    "parse_chain_text",
    "validate_chain_file",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHAINS_DIR = PROJECT_ROOT / "chains"

KeyPath = tuple[str | int, ...]
"""Where a value sits in the chain document: ``("stages", 0, "prompt", "user")``."""

_STAGE_ADAPTER: TypeAdapter[StageSpec] = TypeAdapter(StageSpec)
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


# --------------------------------------------------------------------------------------------
# Source map


@dataclass(frozen=True)
class Span:
    """Where one key and its value start in the file (1-based lines and columns)."""

    key_line: int
    key_col: int
    line: int
    col: int
    end_line: int
    style: str | None = None
    """The scalar style of the value: None (plain), ``|``, ``>``, ``'`` or ``"``."""


@dataclass
class SourceMap:
    """Key paths of a chain document -> their positions, plus the plain data they hold."""

    filename: str
    text: str
    data: Any = None
    spans: dict[KeyPath, Span] = field(default_factory=dict)

    @cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def nearest(self, path: KeyPath) -> tuple[KeyPath, Span]:
        """The longest prefix of ``path`` that exists in the file, and its span."""
        for end in range(len(path), -1, -1):
            span = self.spans.get(path[:end])
            if span is not None:
                return path[:end], span
        return (), Span(1, 1, 1, 1, 1)

    def position(self, path: KeyPath, *, at_key: bool = False) -> tuple[int, int]:
        """Line and column of the value at ``path`` (or of its key), else of its nearest parent."""
        found, span = self.nearest(path)
        if at_key and found == path:
            return span.key_line, span.key_col
        return span.line, span.col

    def key(self, path: KeyPath) -> str:
        """``stages[draft].prompt.user``: a stage shows its id when it has a unique one."""
        out = ""
        for depth, seg in enumerate(path):
            if isinstance(seg, int):
                label = self._stage_labels.get(seg) if path[:depth] == ("stages",) else None
                out += f"[{label or seg}]"
            elif _PLAIN_KEY.match(seg):
                out += f".{seg}" if out else seg
            else:
                out += f"[{seg!r}]"
        return out

    @cached_property
    def _stage_labels(self) -> dict[int, str]:
        stages = self.data.get("stages") if isinstance(self.data, dict) else None
        if not isinstance(stages, list):
            return {}
        ids = [s.get("id") if isinstance(s, dict) else None for s in stages]
        return {
            i: sid
            for i, sid in enumerate(ids)
            if isinstance(sid, str) and re.match(STAGE_ID_PATTERN, sid) and ids.count(sid) == 1
        }

    def value(self, path: KeyPath) -> Any:
        """The plain value at ``path`` (None when it is not there)."""
        node = self.data
        for seg in path:
            if isinstance(node, dict) and seg in node:
                node = node[seg]
            elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
                node = node[seg]
            else:
                return None
        return node

    def problem(
        self, path: KeyPath, problem: str, hint: str = "", *, at_key: bool = False
    ) -> Problem:
        line, col = self.position(path, at_key=at_key)
        return Problem(self.filename, line, col, self.key(path), problem, hint)

    def template_position(
        self, path: KeyPath, template_line: int, needles: Collection[str] = ()
    ) -> tuple[int, int]:
        """The file position of line ``template_line`` (1-based) of the template at ``path``.

        Literal block scalars (``|``) keep their lines, so the line is exact; for other styles
        the template's lines are searched for within the value. ``needles`` (e.g.
        ``stages.outlin``) narrow the column down to the reference itself.
        """
        found, span = self.nearest(path)
        if found != path:
            return span.line, span.col
        if span.style == "|":
            candidates = [span.line + template_line]
        elif span.style == ">":
            candidates = list(range(span.line + 1, max(span.end_line, span.line + 1) + 1))
        else:
            candidates = list(range(span.line, span.end_line + 1))
        candidates = [n for n in candidates if 1 <= n <= len(self.lines)] or [span.line]
        for number in candidates:
            text = self.lines[number - 1] if number <= len(self.lines) else ""
            for needle in needles:
                index = _find_word(text, needle)
                if index >= 0 and (number > span.line or index + 1 >= span.col):
                    return number, index + 1
        number = candidates[0]
        if number == span.line:
            return number, span.col
        text = self.lines[number - 1] if number <= len(self.lines) else ""
        return number, len(text) - len(text.lstrip()) + 1

    def template_problem(
        self,
        path: KeyPath,
        template_line: int,
        problem: str,
        hint: str = "",
        needles: Collection[str] = (),
    ) -> Problem:
        line, col = self.template_position(path, template_line, needles)
        return Problem(self.filename, line, col, self.key(path), problem, hint)


def _find_word(text: str, needle: str) -> int:
    match = re.search(r"(?<![\w.])" + re.escape(needle) + r"(?![\w])", text)
    return match.start() if match else -1


# --------------------------------------------------------------------------------------------
# Public API


def find_chain(name: str | Path, chains_dir: Path = CHAINS_DIR) -> Path:
    """A chain file from a path, or from the id of a chain in ``chains_dir`` (its file stem).

    Raises ChainSpecError naming the chains that exist when there is no such chain.
    """
    path = Path(name)
    if path.is_file():
        return path
    has_suffix = path.suffix in (".yaml", ".yml")
    names = [path] if has_suffix else [Path(f"{name}.yaml"), Path(f"{name}.yml")]
    for candidate in names:
        if (chains_dir / candidate).is_file():
            return chains_dir / candidate
    if has_suffix or len(path.parts) > 1:
        raise ChainSpecError([Problem(str(path), None, None, "", "no such chain file")])
    available = sorted({p.stem for p in chains_dir.glob("*.y*ml") if p.suffix in (".yaml", ".yml")})
    if not available:
        raise ChainSpecError(
            [Problem(str(chains_dir), None, None, "", f"no chain '{name}': the directory has none")]
        )
    close = difflib.get_close_matches(str(name), available, n=1)
    hint = f"did you mean '{close[0]}'?" if close else ""
    problem = f"no chain '{name}'; chains are: {', '.join(available)}"
    raise ChainSpecError([Problem(str(chains_dir), None, None, "", problem, hint)])


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
    except yaml.YAMLError as exc:  # pragma: no cover - every PyYAML parse error has a mark
        return None, [Problem(filename, None, None, "", f"invalid YAML: {exc}")]
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
        problems.extend(_pydantic_problems(exc, source))
        spec = _partial_spec(source.data, broken)
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
        problem = f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ChainSpecError([Problem(str(path), None, None, "", problem)]) from None
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
    return Problem(filename, line, col, "", f"invalid YAML: {problem}", hint)


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


# --------------------------------------------------------------------------------------------
# Helpers: pydantic errors -> problems


def _partial_spec(data: Any, broken: set[int]) -> ChainSpec:
    """The parts of an invalid document that are valid, so cross-stage checks still run.

    Unknown keys (already reported) are dropped first, so a typo does not hide the stage's
    references. A stage that still does not validate becomes a placeholder that only holds its
    id (so references to it are not reported as unknown); its index goes into ``broken``.
    """
    data = _strip_unknown(data if isinstance(data, dict) else {}, ChainSpec)
    try:
        return ChainSpec.model_validate(data)
    except ValidationError:
        pass
    inputs: dict[str, InputSpec] = {}
    raw_inputs = data.get("inputs")
    if isinstance(raw_inputs, dict):
        for name, raw in raw_inputs.items():
            try:
                inputs[str(name)] = InputSpec.model_validate(raw)
            except ValidationError:
                inputs[str(name)] = InputSpec()
    try:
        defaults = Defaults.model_validate(data.get("defaults") or {})
    except ValidationError:
        defaults = Defaults()
    stages: list[StageSpec] = []
    raw_stages = data.get("stages")
    for index, raw in enumerate(raw_stages if isinstance(raw_stages, list) else []):
        salvaged = _salvage_stage(raw)
        if salvaged is not None:
            stages.append(salvaged)
        else:
            broken.add(index)
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            stage_id = raw_id if isinstance(raw_id, str) else None
            stages.append(TemplateStage.model_construct(id=stage_id, kind="template", text=""))
    outputs = data.get("outputs")
    return ChainSpec.model_construct(
        inputs=inputs,
        defaults=defaults,
        stages=stages,
        outputs=outputs if isinstance(outputs, dict) else None,
    )


def _salvage_stage(raw: Any) -> StageSpec | None:
    """The stage without its invalid optional settings (already reported), or None."""
    for _ in range(8):
        try:
            return _STAGE_ADAPTER.validate_python(raw)
        except ValidationError as exc:
            model = _pick_model(StageSpec, raw)
            if model is None:
                return None
            fields = {f.alias or n: f for n, f in model.model_fields.items()}
            bad = {
                loc[1]
                for loc in (tuple(e["loc"]) for e in exc.errors())
                if len(loc) > 1
                and isinstance(loc[1], str)
                and loc[1] in fields
                and not fields[loc[1]].is_required()
                and loc[1] not in ("id", "kind")
            }
            if not bad or not isinstance(raw, dict):
                return None
            raw = {k: v for k, v in raw.items() if k not in bad}
    return None


def _strip_unknown(value: Any, annotation: Any) -> Any:
    """``value`` without the keys its model does not know (recursively)."""
    model = _pick_model(annotation, value)
    if model is not None:
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        return {k: _strip_unknown(v, fields[k].annotation) for k, v in value.items() if k in fields}
    item = _container_item(annotation)
    if item is not None and isinstance(value, list):
        return [_strip_unknown(v, item) for v in value]
    if item is not None and isinstance(value, dict):
        return {k: _strip_unknown(v, item) for k, v in value.items()}
    return value


_BUILTIN_MEMBERS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_member_tag(seg: str | int) -> bool:
    """``PromptParts``, ``list[Message]``, ``str``: a union member name in a pydantic loc."""
    if not isinstance(seg, str):
        return False
    return seg[:1].isupper() or "[" in seg or seg in _BUILTIN_MEMBERS or "-" in seg


@dataclass
class _Loc:
    path: KeyPath
    """The longest part of the error's loc that exists in the data."""
    tail: list[str | int]
    """What follows it (a missing key's name)."""
    union: tuple[KeyPath, str] | None
    """Where a (non-discriminated) union was tried, and which member this error is from."""


def _clean_loc(loc: tuple[str | int, ...], data: Any) -> _Loc:
    path: list[str | int] = []
    tail: list[str | int] = []
    union: tuple[KeyPath, str] | None = None
    node = data
    tagged: set[int] = set()
    for seg in loc:
        if tail:
            tail.append(seg)
        elif seg == "[key]":
            continue
        elif isinstance(node, dict) and seg == node.get("kind") and id(node) not in tagged:
            tagged.add(id(node))  # the discriminated union's tag ('llm' in stages.0.llm.prompt)
        elif isinstance(node, dict) and seg in node:
            path.append(seg)
            node = node[seg]
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            path.append(seg)
            node = node[seg]
        elif _is_member_tag(seg):
            union = (tuple(path), str(seg))
        else:
            tail.append(seg)
    return _Loc(tuple(path), tail, union)


def _member_words(tag: str) -> str:
    if tag == "str":
        return "a string"
    if tag == "int":
        return "an integer"
    if tag == "float":
        return "a number"
    if tag == "bool":
        return "true or false"
    if tag == "none":
        return "null"
    if tag.startswith("list"):
        return "a list"
    return "a mapping"


def _member_matches(tag: str, value: Any) -> bool:
    if isinstance(value, dict):
        return tag[:1].isupper() or tag.startswith("dict")
    if isinstance(value, list):
        return tag.startswith("list")
    if isinstance(value, bool):
        return tag == "bool"
    if isinstance(value, str):
        return tag == "str"
    if isinstance(value, int):
        return tag in ("int", "float")
    if isinstance(value, float):
        return tag == "float"
    return False


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.date):
        return f"the date {value.isoformat()} (quote it to make it text)"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _pydantic_problems(exc: ValidationError, source: SourceMap) -> list[Problem]:
    plain: list[tuple[_Loc, Any]] = []
    unions: dict[KeyPath, list[tuple[_Loc, Any]]] = {}
    for error in exc.errors(include_url=False):
        loc = _clean_loc(tuple(error["loc"]), source.data)
        if loc.union is None:
            plain.append((loc, error))
        else:
            unions.setdefault(loc.union[0], []).append((loc, error))
    problems = [_translate(loc, error, source) for loc, error in plain]
    for where, errors in unions.items():
        value = source.value(where)
        chosen = [
            (loc, error)
            for loc, error in errors
            if loc.union is not None
            and _member_matches(loc.union[1], value)
            and (loc.path != where or loc.tail)
        ]
        if chosen:
            problems.extend(_translate(loc, error, source) for loc, error in chosen)
        else:
            tags = [loc.union[1] for loc, _ in errors if loc.union is not None]
            words = list(dict.fromkeys(_member_words(t) for t in tags))
            problem = f"expected {_or_list(words)}, got {_describe(value)}"
            problems.append(source.problem(where, problem))
    return problems


def _translate(loc: _Loc, error: Any, source: SourceMap) -> Problem:
    kind: str = error["type"]
    path = loc.path
    value = source.value(path)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(path[:-1], source.data)
        name = str(path[-1]) if path else ""
        close = difflib.get_close_matches(name, allowed, n=1)
        if close:
            hint = f"did you mean '{close[0]}'?"
        elif allowed:
            hint = f"keys here are: {', '.join(allowed)}"
        else:
            hint = ""
        return source.problem(path, "unknown key", hint, at_key=True)
    if kind == "missing" and loc.tail:
        name = str(loc.tail[0])
        model = _model_at(path, source.data)
        if model is MapStage and name == "stage":
            return source.problem(
                path,
                "a map needs a nested `stage` to run per item",
                'add e.g. `stage: {kind: llm, prompt: "{{ item }}"}`',
            )
        if path == () and name == "stages":
            return source.problem(path, "missing required key 'stages'", "a chain needs stages")
        return source.problem(path, f"missing required key '{name}'")
    if kind == "union_tag_not_found":
        return source.problem(path, "missing key 'kind'", f"kinds are: {', '.join(STAGE_KINDS)}")
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag", value.get("kind") if value else ""))
        close = difflib.get_close_matches(tag, STAGE_KINDS, n=1)
        hint = (
            f"did you mean '{close[0]}'? " if close else ""
        ) + f"kinds are: {', '.join(STAGE_KINDS)}"
        return source.problem((*path, "kind"), f"unknown stage kind '{tag}'", hint)
    if kind in ("model_attributes_type", "model_type", "dict_type"):
        return source.problem(path, f"expected a mapping, got {_describe(value)}")
    if kind == "string_pattern_mismatch" and path and path[-1] in ("id", "as"):
        if path == ("id",):
            return source.problem(
                path,
                f"bad chain id {value!r}",
                "use lowercase letters, digits, `_` and `-`",
            )
        what = "stage id" if path[-1] == "id" else "name for `as`"
        return source.problem(
            path,
            f"bad {what} {value!r}",
            "use lowercase letters, digits and `_`, not starting with a digit",
        )
    if kind == "too_short" and path == ("stages",):
        return source.problem(path, "a chain needs at least one stage")
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(str(value), expected, n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        return source.problem(
            path,
            f"unknown value {_describe(value)}; expected {_or_list([repr(e) for e in expected])}",
            hint,
        )
    message: str = error["msg"]
    if kind == "invalid_key" or (kind == "string_type" and error["loc"][-1] == "[key]"):
        return source.problem(path, f"keys must be text, got {error['input']!r}", at_key=True)
    message = message.replace("Input should be ", "should be ")
    message = message[:1].lower() + message[1:]
    if "got" not in message:
        message += f", got {_describe(value)}"
    return source.problem(path, message)


def _model_at(path: KeyPath, data: Any) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``path`` (None for a plain value)."""
    annotation: Any = ChainSpec
    node = data
    for seg in path:
        model = _pick_model(annotation, node)
        if model is not None:
            fields = {f.alias or n: f for n, f in model.model_fields.items()}
            if not isinstance(seg, str) or seg not in fields:
                return None
            annotation = fields[seg].annotation
        else:
            annotation = _container_item(annotation)
            if annotation is None:
                return None
        if isinstance(node, dict):
            node = node.get(seg)
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            node = node[seg]
        else:
            node = None
    return _pick_model(annotation, node)


def _flatten(annotation: Any) -> Iterator[Any]:
    args = get_args(annotation)
    origin = get_origin(annotation)
    if args and origin not in (list, dict):
        for arg in args:
            yield from _flatten(arg)
    else:
        yield annotation


def _pick_model(annotation: Any, node: Any) -> type[BaseModel] | None:
    if not isinstance(node, dict):
        return None
    models = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(models) == 1:
        return models[0]
    for model in models:
        kind = model.model_fields.get("kind")
        if kind is not None and node.get("kind") in get_args(kind.annotation):
            return model
    return None


def _container_item(annotation: Any) -> Any:
    for member in _flatten(annotation):
        origin = get_origin(member)
        if origin is list:
            return get_args(member)[0]
        if origin is dict:
            return get_args(member)[1]
    return None


def _allowed_keys(path: KeyPath, data: Any) -> list[str]:
    model = _model_at(path, data)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]
