"""Jinja2 templates in a sandbox with strict undefined.

A field whose whole value is one ``{{ expression }}`` keeps the expression's type (a list for
``over``, a boolean for ``when``); anything else renders to text. Values are data: a value that
holds ``{{ 7*7 }}`` is never rendered again. ``references`` reads a template's AST to find which
``stages.<id>`` and ``inputs.<name>`` it uses, which is how the orchestrator derives the DAG and
how validation finds unknown names.
"""

from __future__ import annotations

import json
import re
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, UndefinedError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stagecast.engine.errors import TemplateError

__all__ = ["ENV", "References", "Template", "compile_template", "references"]


class _Environment(ImmutableSandboxedEnvironment):
    """Data keys win over dict methods: ``inputs.items`` is the input named ``items``."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)


ENV = _Environment(
    undefined=StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _tojson_pretty(value: Any) -> str:
    """Indented JSON that keeps non-ASCII text readable (Korean stays Korean)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


ENV.filters["tojson_pretty"] = _tojson_pretty

_LAZY = (Iterator, KeysView, ValuesView, ItemsView, range)
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}|\{\{).)*)\}\}\s*$", re.DOTALL)


@dataclass(frozen=True)
class Template:
    """A compiled template: render(context) -> str, or the expression's own value."""

    source: str
    is_expression: bool
    _compiled: Any = field(repr=False, compare=False)

    def render(self, context: dict[str, Any]) -> Any:
        try:
            if self.is_expression:
                value = self._compiled(**context)
                if isinstance(value, StrictUndefined):
                    str(value)  # raises the UndefinedError with jinja's own message
                if isinstance(value, _LAZY):
                    value = list(value)  # map/select/…/.keys() are lazy; data must be concrete
                return value
            return self._compiled.render(context)
        except SecurityError as exc:
            raise TemplateError(f"unsafe template: {exc}", type="template_unsafe") from None
        except UndefinedError as exc:
            message = str(exc)
            if "unsafe" in message:
                raise TemplateError(f"unsafe template: {message}", type="template_unsafe") from None
            raise TemplateError(f"template error: {message}") from None
        except TemplateError:
            raise
        except Exception as exc:  # a filter or an operator failed on the data
            raise TemplateError(f"template error: {type(exc).__name__}: {exc}") from None

    def render_text(self, context: dict[str, Any]) -> str:
        value = self.render(context)
        return value if isinstance(value, str) else ("" if value is None else str(value))


@lru_cache(maxsize=4096)
def compile_template(source: str) -> Template:
    """Compile once; raises jinja2's TemplateSyntaxError (with ``lineno``) on bad syntax."""
    match = _WHOLE_EXPRESSION.match(source)
    if match:
        return Template(
            source, True, ENV.compile_expression(match["expr"], undefined_to_none=False)
        )
    return Template(source, False, ENV.from_string(source))


@dataclass
class References:
    """What a template reads from its context."""

    names: set[str] = field(default_factory=set)
    """Top-level names it reads (``inputs``, ``stages``, a map's ``as`` …), minus its own locals."""
    stages: dict[str, int] = field(default_factory=dict)
    """``stages.<id>`` it reads -> the line (1-based, inside the template) of the first use."""
    inputs: dict[str, int] = field(default_factory=dict)
    """``inputs.<name>`` it reads -> the line of the first use."""


def references(source: str) -> References:
    """Parse ``source`` and list what it references. Raises TemplateSyntaxError."""
    match = _WHOLE_EXPRESSION.match(source)
    ast = ENV.parse(source if not match else "{{" + match["expr"] + "}}")
    refs = References()
    refs.names = set(meta.find_undeclared_variables(ast))
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        assert isinstance(node, (nodes.Getattr, nodes.Getitem))
        base = node.node
        key = _key(node)
        if not isinstance(base, nodes.Name) or key is None:
            continue
        if base.name == "stages":
            refs.stages.setdefault(key, node.lineno)
        elif base.name == "inputs":
            refs.inputs.setdefault(key, node.lineno)
    return refs


def _key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None
