"""A run's inputs: checked against the chain's declared inputs before the run starts."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from stagecast.engine.chain import Chain
from stagecast.engine.errors import InputError
from stagecast.engine.spec import InputSpec

__all__ = ["MAX_DEPTH", "Rule", "broken_rule", "inputs_json_schema", "validate_inputs"]

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list, tuple),
    "object": (dict,),
}


def _coerce(spec: InputSpec, value: Any) -> Any:
    """Accept the text form of scalars (CLI flags, form fields); everything else as is."""
    if not isinstance(value, str) or spec.type == "string":
        return value
    text = value.strip()
    if spec.type in ("array", "object") and text[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # not JSON, or nested too deeply: stays text
            return value
    if spec.type == "integer":
        try:
            return int(text)
        except ValueError:
            return value
    if spec.type == "number":
        try:
            number = float(text)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    if spec.type == "boolean" and text.lower() in ("true", "false", "yes", "no", "1", "0"):
        return text.lower() in ("true", "yes", "1")
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


MAX_DEPTH = 64
"""Deepest nesting of lists and objects an input value may have."""


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value``, counted without recursion, to one past
    ``MAX_DEPTH`` at most."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | tuple | dict):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:
                break
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def _clean(value: Any) -> Any:
    """Lone surrogates (valid in JSON escapes, not in UTF-8) become U+FFFD, so text stays text."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


Rule = Literal["type", "enum", "min_length", "max_length", "minimum", "maximum"]


def broken_rule(spec: InputSpec, value: Any) -> Rule | None:
    """The first constraint of ``spec`` that ``value`` breaks, or None.

    The one checker of input constraints: run inputs (``validate_inputs``) and a chain's own
    defaults (``validation``) both use it, each wording the rule for its reader.
    """
    is_bool = isinstance(value, bool)
    if not isinstance(value, _JSON_TYPES[spec.type]) or (is_bool and spec.type != "boolean"):
        return "type"
    if spec.enum is not None and value not in spec.enum:
        return "enum"
    if isinstance(value, str):
        if spec.min_length is not None and len(value) < spec.min_length:
            return "min_length"
        if spec.max_length is not None and len(value) > spec.max_length:
            return "max_length"
    if isinstance(value, int | float) and not is_bool:
        if spec.minimum is not None and value < spec.minimum:
            return "minimum"
        if spec.maximum is not None and value > spec.maximum:
            return "maximum"
    return None


def _check(spec: InputSpec, value: Any) -> str | None:
    rule = broken_rule(spec, value)
    if rule is None:
        return None
    if rule == "type":
        return f"expected {spec.type}, got {_json_type(value)}"
    if rule == "enum":
        return f"must be one of {', '.join(map(repr, spec.enum or []))}"
    if rule == "min_length":
        return f"must have at least {spec.min_length} characters (has {len(value)})"
    if rule == "max_length":
        return f"must have at most {spec.max_length} characters (has {len(value)})"
    if rule == "minimum":
        return f"must be >= {spec.minimum:g}"
    return f"must be <= {spec.maximum:g}"


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return "null" if value is None else type(value).__name__


def validate_inputs(chain: Chain, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The inputs with defaults applied; raises InputError naming every bad field."""
    given = dict(inputs or {})
    declared = chain.spec.inputs
    errors: dict[str, str] = {}
    result: dict[str, Any] = {}
    for name in given:
        if name not in declared:
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"inputs are: {', '.join(declared)}"
            errors[name] = f"unknown input ({hint})" if declared else "this chain takes no inputs"
    for name, spec in declared.items():
        if name not in given or given[name] is None:
            if spec.default is None:
                errors[name] = "required" + (f" ({spec.description})" if spec.description else "")
            else:
                result[name] = spec.default
            continue
        value = _coerce(spec, given[name])
        if _depth(value) > MAX_DEPTH:
            errors[name] = f"nested more than {MAX_DEPTH} levels deep"
            continue
        value = _clean(value)
        problem = _check(spec, value)
        if problem:
            errors[name] = problem
        else:
            result[name] = list(value) if isinstance(value, tuple) else value
    if errors:
        raise InputError(errors)
    return result


def inputs_json_schema(chain: Chain) -> dict[str, Any]:
    """The chain's inputs as a JSON Schema object (for forms and the HTTP API)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, spec in chain.spec.inputs.items():
        prop: dict[str, Any] = {"type": spec.type, "title": spec.title or name}
        for key, schema_key in (
            ("description", "description"),
            ("default", "default"),
            ("enum", "enum"),
            ("min_length", "minLength"),
            ("max_length", "maxLength"),
            ("minimum", "minimum"),
            ("maximum", "maximum"),
            ("examples", "examples"),
        ):
            value = getattr(spec, key)
            if value is not None:
                prop[schema_key] = value
        if spec.multiline:
            prop["x-multiline"] = True
        properties[name] = prop
        if spec.default is None:
            required.append(name)
    return {
        "type": "object",
        "title": chain.title,
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
