"""Jinja2 templates in a sandbox with strict undefined, bounded in size and work.

A field whose whole value is one ``{{ expression }}`` keeps the expression's type (a list for
``over``, a boolean for ``when``); anything else renders to text. Values are data: a value that
holds ``{{ 7*7 }}`` is never rendered again. ``references`` reads a template's AST to find which
``stages.<id>`` and ``inputs.<name>`` it uses, which is how the orchestrator derives the DAG and
how validation finds unknown names.

One server renders many people's templates, so a render is bounded (``RenderLimits``):

- **size**: ``*`` and ``**`` (``"x" * 10**8``, ``9 ** 10**9``), ``+`` and ``~`` on text and lists,
  filters and method calls (``center(10**9)``, ``replace`` that grows) are checked before they
  allocate, where the result's size is known up front, and after, where it is not; the rendered
  text is capped while it is produced. Each limit is ``max_chars`` (characters, or items of a
  list), 10 million by default: far above any real prompt (the largest shipped input is 400,000);
- **work**: a render that is not plain substitution runs in a worker thread (``render_async``),
  so the event loop keeps serving other runs, under a trace that counts its steps (lines run in
  that thread: the compiled template's and the filters' it calls) and its wall time
  (``max_steps``, ``max_seconds``); cancelling the run stops the render at its next step.

Going over a limit raises ``RenderLimitError`` (a ``TemplateError``, type ``template_limit``) that
names the limit and the setting that raises it; the stage fails with it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from types import FrameType
from typing import Any

from jinja2 import Environment, StrictUndefined, UndefinedError, meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from stagecast.engine.errors import TemplateError

__all__ = [
    "DEFAULT_LIMITS",
    "ENV",
    "References",
    "RenderLimitError",
    "RenderLimits",
    "Template",
    "compile_template",
    "references",
    "render_async",
]


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """How big and how long one render may get (server settings ``template_max_*``)."""

    max_chars: int = 10_000_000
    """Most characters of text (or items of a list) a render produces, or holds in one value."""
    max_steps: int = 5_000_000
    """Most steps (lines of the compiled template) one render runs; loops count every turn."""
    max_seconds: float = 10.0
    """Most wall-clock seconds one render runs (in its worker thread)."""


DEFAULT_LIMITS = RenderLimits()
_LIMITS: ContextVar[RenderLimits] = ContextVar("stagecast_render_limits", default=DEFAULT_LIMITS)


class RenderLimitError(TemplateError):
    """A render went over one of its ``RenderLimits``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="template_limit")


def _too_large(size: int, what: str = "a value", unit: str = "characters") -> RenderLimitError:
    limit = _LIMITS.get().max_chars
    return RenderLimitError(
        f"template too large: {what} would have {size:,} {unit}, over the limit of {limit:,} "
        "(template_max_chars)"
    )


def _unit(value: Any) -> str:
    return "characters" if isinstance(value, str) else "items"


def _size(value: Any, budget: int) -> int:
    """The characters and items ``value`` holds, nested values included, counted only up to
    just past ``budget`` (lists that share one item many times cannot make this slow)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, list | tuple | dict):
        return 0
    total = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list | tuple | dict):
            total += len(item)
            if total > budget:
                break
            stack.extend(item.values() if isinstance(item, dict) else item)
        elif isinstance(item, int) and item.bit_length() > 64:
            total += _digits(item)  # a big number is as long as its digits once it is text
        else:
            total += 1
        if total > budget:
            break
    return total


def _digits(number: int) -> int:
    return int(number.bit_length() * 0.302) + 1  # log10(2) digits per bit


def _check(value: Any) -> Any:
    """``value`` itself, unless it holds more than ``max_chars`` characters and items."""
    if isinstance(value, str | list | tuple | dict):
        limit = _LIMITS.get().max_chars
        size = _size(value, limit)
        if size > limit:
            if isinstance(value, str) or size == len(value):
                raise _too_large(size, unit=_unit(value))
            raise _too_large(size, "a value with its nested values", "characters and items")
    return value


_FORMAT_WIDTHS = re.compile(r"%[-+ #0]*(\d+)(?:\.(\d+))?|\{[^{}]*:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


def _format_precheck(spec: Any) -> None:
    """Refuse a format string whose widths or precisions alone are over the limit."""
    if not isinstance(spec, str) or ("%" not in spec and "{" not in spec):
        return
    numbers = [int(n) for m in _FORMAT_WIDTHS.finditer(spec) for n in m.groups() if n]
    if numbers and max(numbers) > _LIMITS.get().max_chars:
        raise _too_large(max(numbers), "a formatted value")


def _format_args_precheck(args: Any) -> None:
    """Widths can also come from the arguments (``"%*s" % (n, x)``, ``"{:>{w}}"``)."""
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else ()
    limit = _LIMITS.get().max_chars
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise _too_large(value, "a formatted value")


def _join_precheck(sep: Any, items: Any) -> None:
    if isinstance(sep, str) and sep and isinstance(items, list | tuple | dict):
        size = len(sep) * max(len(items) - 1, 0)
        if size > _LIMITS.get().max_chars:
            raise _too_large(size, "joined text")


_SEQUENCES = (str, list, tuple)
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})


def _method_precheck(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a str method whose result size is known before it allocates."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    name = getattr(target, "__name__", "")
    if not isinstance(owner, str):
        return
    limit = _LIMITS.get().max_chars
    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int)]
    if name in _WIDTH_METHODS and numbers and max(numbers) > limit:
        raise _too_large(max(numbers))
    if name == "expandtabs" and numbers and owner.count("\t") * max(numbers) > limit:
        raise _too_large(owner.count("\t") * max(numbers), "expanded text")
    if name == "join" and args:
        _join_precheck(owner, args[0])
    if name in ("format", "format_map"):
        _format_precheck(owner)
        _format_args_precheck(args)
        _format_args_precheck(kwargs)
        if name == "format_map" and args and isinstance(args[0], dict):
            _format_args_precheck(args[0])
    if name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        if longest > 1 and len(owner) * longest > limit:
            raise _too_large(len(owner) * longest, "translated text")
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], args[1]
        if isinstance(new, str) and len(new) > len(old):
            hits = owner.count(old) if old else len(owner) + 1
            size = len(owner) + hits * (len(new) - len(old))
            if size > limit:
                raise _too_large(size)


_SERIALIZING = frozenset({"tojson", "tojson_pretty", "pprint", "string", "sum", "xmlattr"})
"""Filters that turn their whole input into one value (text, or a flattened list)."""


def _guard_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose result is size-checked (and whose width arguments are checked first)."""

    name = func.__name__.removeprefix("sync_").removeprefix("do_")

    @functools.wraps(func)  # keeps jinja's pass_context / pass_environment markers
    def guarded(*args: Any, **kwargs: Any) -> Any:
        plain = [a for a in args if not isinstance(a, EvalContext | Context | Environment)]
        if name in _SERIALIZING and plain:
            _check(plain[0])  # a nested value that shares items could serialize to gigabytes
        if name in ("center", "indent"):
            widths = [a for a in (*plain[1:], *kwargs.values()) if isinstance(a, int)]
            if widths and max(widths) > _LIMITS.get().max_chars:
                raise _too_large(max(widths))
            if name == "indent" and widths and isinstance(plain[0], str):
                size = len(plain[0]) + (plain[0].count("\n") + 1) * max(widths)
                if size > _LIMITS.get().max_chars:
                    raise _too_large(size, "indented text")
        elif name == "join" and plain:
            items = plain[0] if isinstance(plain[0], list | tuple | dict | str) else list(plain[0])
            if items is not plain[0]:  # a generator: measured once, then joined from the list
                index = next(i for i, a in enumerate(args) if a is plain[0])
                args = (*args[:index], items, *args[index + 1 :])
            _check(items)
            _join_precheck(plain[1] if len(plain) > 1 else kwargs.get("d", ""), items)
        elif name == "format" and plain:
            _format_precheck(plain[0])
            _format_args_precheck(tuple(plain[1:]))
            _format_args_precheck(kwargs)
        elif name == "replace" and len(plain) >= 3:
            _method_precheck(str(plain[0]).replace, (plain[1], plain[2]), {})
        return _check(func(*args, **kwargs))

    return guarded


class _CodeGenerator(CodeGenerator):
    """``a ~ b`` joins through the environment, so its size is checked like ``+``."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Environment(ImmutableSandboxedEnvironment):
    """Data keys win over dict methods: ``inputs.items`` is the input named ``items``.

    Operators, ``~``, method calls and filters are size-checked (see the module docstring).
    """

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(left, int) and isinstance(right, int):
            if (left.bit_length() + right.bit_length()) * 0.302 > _LIMITS.get().max_chars:
                raise _too_large(_digits(left) + _digits(right), "a product", "digits")
        if operator == "*":
            seq, count = (left, right) if isinstance(left, _SEQUENCES) else (right, left)
            if isinstance(seq, _SEQUENCES) and isinstance(count, int) and count > 0:
                if len(seq) * count > _LIMITS.get().max_chars:
                    what = (
                        f"{'text' if isinstance(seq, str) else 'a list'} repeated {count:,} times"
                    )
                    raise _too_large(len(seq) * count, what, _unit(seq))
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                digits = int(left.bit_length() * right * 0.302) + 1  # log10(2) per bit
                if digits > _LIMITS.get().max_chars:
                    raise _too_large(digits, f"{left} ** {right:,}", "digits")
        elif operator == "%":
            _format_precheck(left)
            if isinstance(left, str):
                _format_args_precheck(right if isinstance(right, tuple | dict) else (right,))
        elif operator == "+":
            both = isinstance(left, _SEQUENCES) and type(left) is type(right)
            limit = _LIMITS.get().max_chars
            if both and _size(left, limit) + _size(right, limit) > limit:
                raise _too_large(_size(left, limit) + _size(right, limit), "a sum", _unit(left))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _method_precheck(__obj, args, kwargs)
        return _check(super().call(__context, __obj, *args, **kwargs))

    @staticmethod
    def checked_concat(parts: tuple[Any, ...]) -> str:
        text = "".join([p if isinstance(p, str) else str(p) for p in parts])  # as jinja's ~ does
        if len(text) > _LIMITS.get().max_chars:
            raise _too_large(len(text), "joined text (~)")
        return text


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}`` of a text template: checked before it becomes text; null (an
    input given as null, a skipped stage's output) becomes empty text, never ``None``."""
    if value is None:
        return ""
    return _check(value)


ENV = _Environment(
    finalize=_finalize,
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
ENV.filters.update({name: _guard_filter(func) for name, func in ENV.filters.items()})
ENV.globals.pop("lipsum", None)  # lorem ipsum of any size, in one call: nothing a chain needs

_LAZY = (Iterator, KeysView, ValuesView, ItemsView, range)
_WHOLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}|\{\{).)*)\}\}\s*$", re.DOTALL)


@dataclass(frozen=True)
class Template:
    """A compiled template: render(context) -> str, or the expression's own value."""

    source: str
    is_expression: bool
    _compiled: Any = field(repr=False, compare=False)
    simple: bool = False
    """Only text, names, attributes, items and constants: no loop, call, filter or operator.
    Its render costs what copying its values costs, so it runs inline on the event loop."""

    def render(self, context: dict[str, Any], limits: RenderLimits | None = None) -> Any:
        """Render here and now (size limits apply; steps and seconds only in ``render_async``)."""
        token = _LIMITS.set(limits) if limits is not None else None
        try:
            return self._render(context)
        finally:
            if token is not None:
                _LIMITS.reset(token)

    def _render(self, context: dict[str, Any]) -> Any:
        try:
            if self.is_expression:
                value = self._compiled(**context)
                if isinstance(value, StrictUndefined):
                    str(value)  # raises the UndefinedError with jinja's own message
                if isinstance(value, _LAZY):
                    value = list(value)  # map/select/…/.keys() are lazy; data must be concrete
                return _check(value)
            limit = _LIMITS.get().max_chars
            parts: list[str] = []
            size = 0
            for part in self._compiled.generate(context):
                size += len(part)
                if size > limit:
                    raise _too_large(size, "the rendered text")
                parts.append(part)
            return "".join(parts)
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

    def render_text(self, context: dict[str, Any], limits: RenderLimits | None = None) -> str:
        return _as_text(self.render(context, limits))


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


_RENDER_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stagecast-render")
"""Renders that are not plain substitution run here: a pool of their own, so slow ones never
take the default executor's threads from retrieval and other ``to_thread`` work."""


async def render_async(
    template: Template, context: dict[str, Any], limits: RenderLimits, *, text: bool = False
) -> Any:
    """Render without holding up the event loop: inline when ``template.simple``, else in a
    worker thread under a step and time budget. ``text`` renders to text, as ``render_text``.

    Cancelling the caller stops the render too: the worker's trace raises at its next step.
    """
    if template.simple:
        value = template.render(context, limits)
    else:
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        work = contextvars.copy_context().run
        future = loop.run_in_executor(
            _RENDER_THREADS, work, _render_counted, template, context, limits, stop
        )
        try:
            value = await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the render ends at its next step; nobody waits for it
            future.add_done_callback(_consume)
            raise
    return _as_text(value) if text else value


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a stopped render is not an unhandled error


def _render_counted(
    template: Template, context: dict[str, Any], limits: RenderLimits, stop: threading.Event
) -> Any:
    steps = 0
    clock = time.monotonic
    deadline = clock() + limits.max_seconds

    def count(frame: FrameType, event: str, arg: Any) -> Any:
        # every line of every frame in this thread: the template's own and the filters' it
        # calls (a map chain is one template line); only one C call can run past a check
        nonlocal steps
        if event == "line":
            steps += 1
            if steps > limits.max_steps:
                raise RenderLimitError(
                    f"template too slow: over {limits.max_steps:,} steps (template_max_steps)"
                )
            if stop.is_set():
                raise RenderLimitError("template render stopped: the run was cancelled")
            if clock() > deadline:
                raise RenderLimitError(
                    f"template too slow: over {limits.max_seconds:g} s (template_max_seconds)"
                )
        return count

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        # this module's own checks are bounded by themselves and do not spend the budget
        return None if frame.f_code.co_filename == __file__ else count

    previous = sys.gettrace()
    sys.settrace(calls)  # this worker thread only
    try:
        return template.render(context, limits)
    finally:
        sys.settrace(previous)


@lru_cache(maxsize=4096)
def compile_template(source: str) -> Template:
    """Compile once; raises jinja2's TemplateSyntaxError (with ``lineno``) on bad syntax."""
    match = _WHOLE_EXPRESSION.match(source)
    if match:
        compiled = ENV.compile_expression(match["expr"], undefined_to_none=False)
        ast = ENV.parse("{{" + match["expr"] + "}}")
        return Template(source, True, compiled, _is_simple(ast))
    return Template(source, False, ENV.from_string(source), _is_simple(ENV.parse(source)))


_SIMPLE_NODES = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Const,
)


def _is_simple(ast: nodes.Template) -> bool:
    return all(isinstance(node, _SIMPLE_NODES) for node in ast.find_all(nodes.Node))


@dataclass
class References:
    """What a template reads from its context."""

    names: set[str] = field(default_factory=set)
    """Top-level names it reads (``inputs``, ``stages``, a map's ``as`` …), minus its own locals."""
    stages: dict[str, int] = field(default_factory=dict)
    """``stages.<id>`` it reads -> the line (1-based, inside the template) of the first use."""
    inputs: dict[str, int] = field(default_factory=dict)
    """``inputs.<name>`` it reads -> the line of the first use."""
    whole: set[str] = field(default_factory=set)
    """``inputs`` or ``stages`` when the template reads them other than by a constant key
    (``inputs | tojson``, ``stages[name]``): then it may read any of them."""


def references(source: str) -> References:
    """Parse ``source`` and list what it references. Raises TemplateSyntaxError."""
    match = _WHOLE_EXPRESSION.match(source)
    ast = ENV.parse(source if not match else "{{" + match["expr"] + "}}")
    refs = References()
    refs.names = set(meta.find_undeclared_variables(ast))
    keyed: dict[str, int] = {"inputs": 0, "stages": 0}
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
        if base.name in keyed:
            keyed[base.name] += 1
    for name in ast.find_all(nodes.Name):
        assert isinstance(name, nodes.Name)
        if name.name in keyed and name.ctx == "load":
            keyed[name.name] -= 1
    refs.whole = {name for name, left in keyed.items() if left < 0 and name in refs.names}
    return refs


def _key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None
