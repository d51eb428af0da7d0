"""pydantic's errors on a chain document -> problems an author can act on.

``ChainSpec.model_validate`` reports each error at a ``loc`` full of union member tags
(``function-after[...]``, ``LlmStage``); ``pydantic_problems`` maps each to the nearest key path
that exists in the file and words it as ``expected a mapping, got 'draft'`` or ``unknown key``
with a did-you-mean hint. ``partial_spec`` salvages what did validate, so the cross-stage checks
still run and every problem is reported at once.
"""

from __future__ import annotations

import datetime
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

from stagecast.engine.errors import Problem
from stagecast.engine.sourcemap import KeyPath, SourceMap
from stagecast.engine.spec import (
    STAGE_KINDS,
    ChainSpec,
    Defaults,
    InputSpec,
    MapStage,
    StageSpec,
    TemplateStage,
)

__all__ = ["guess_kind", "partial_spec", "pydantic_problems", "with_guessed_kinds"]

_STAGE_ADAPTER: TypeAdapter[StageSpec] = TypeAdapter(StageSpec)
_KIND_MODELS: dict[str, type[BaseModel]] = {
    get_args(member.model_fields["kind"].annotation)[0]: member
    for member in get_args(get_args(StageSpec)[0])
}
_COMMON_KEYS = frozenset.intersection(
    *(frozenset(f.alias or n for n, f in m.model_fields.items()) for m in _KIND_MODELS.values())
)


def guess_kind(stage: Any) -> str | None:
    """For a stage mapping whose ``kind`` is unknown: the kind it most likely means — the close
    spelling (``lml`` → ``llm``), else the one kind whose own keys it uses (``prompt`` → llm,
    ``over`` → map); None when it cannot tell."""
    if not isinstance(stage, dict) or stage.get("kind") in _KIND_MODELS:
        return None
    tag = stage.get("kind")
    if isinstance(tag, str):
        close = difflib.get_close_matches(tag, STAGE_KINDS, n=1)
        if close:
            return close[0]
    keys = {k for k in stage if isinstance(k, str)} - _COMMON_KEYS
    fits = {
        kind: len(keys & {f.alias or n for n, f in model.model_fields.items()})
        for kind, model in _KIND_MODELS.items()
    }
    best = max(fits.values(), default=0)
    winners = [kind for kind, fit in fits.items() if fit == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def with_guessed_kinds(data: Any) -> Any | None:
    """A copy of the document with each outermost unknown stage ``kind`` replaced by
    ``guess_kind`` (so the stage's other keys can be checked too), or None when no kind was
    guessed. A map's nested stage is only looked at once the map's own kind is known: validate
    the copy, then call this again on it (each round reports the next level's kind)."""

    def fix(stage: Any) -> Any:
        if not isinstance(stage, dict):
            return stage
        guess = guess_kind(stage)
        if guess is not None:  # the nested stage of a guessed map is for the next round
            return {**stage, "kind": guess}
        if stage.get("kind") == "map":
            if "stage" in stage:
                stage = {**stage, "stage": fix(stage["stage"])}
            if isinstance(stage.get("stages"), list):
                stage = {**stage, "stages": [fix(inner) for inner in stage["stages"]]}
        return stage

    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return None
    fixed = {**data, "stages": [fix(stage) for stage in data["stages"]]}
    return None if fixed == data else fixed


def partial_spec(data: Any, broken: set[int]) -> ChainSpec:
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
                and loc[1] not in ("id", "kind", "stage", "stages")
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


def pydantic_problems(exc: ValidationError, source: SourceMap) -> list[Problem]:
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
        guess = guess_kind(value)
        checked = f"its other keys were checked as {guess}; " if guess else ""
        hint = (
            (f"did you mean '{close[0]}'? " if close else "")
            + checked
            + f"kinds are: {', '.join(STAGE_KINDS)}"
        )
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
