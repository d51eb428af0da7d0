"""Cross-stage checks of a chain spec, and the chain's JSON Schema.

``check_chain`` runs after the pydantic models have checked shapes and types. It finds what one
field cannot see on its own: duplicate or missing stage ids, references to stages or inputs that
do not exist, cycles, undeclared template variables, bad Jinja syntax, unknown model names,
invalid JSON Schemas, and settings that contradict each other. Every problem carries the file,
line and column of the value (for templates, of the line inside the template).
"""

from __future__ import annotations

import difflib
import json
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateSyntaxError, nodes
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from stagecast.engine.chain import stage_templates
from stagecast.engine.collections import CollectionError, load_collections_config
from stagecast.engine.errors import Problem
from stagecast.engine.inputs import broken_rule
from stagecast.engine.retrieval import collection_problem
from stagecast.engine.spec import (
    ChainSpec,
    InputSpec,
    InputStage,
    LlmStage,
    MapStage,
    RetrieveStage,
    SplitStage,
    StageSpec,
)
from stagecast.engine.templates import ENV, compile_template, references

if TYPE_CHECKING:
    from stagecast.engine.sourcemap import KeyPath, SourceMap

__all__ = [
    "AVAILABLE_KINDS",
    "SCHEMA_DIALECT",
    "chain_json_schema",
    "chain_json_schema_text",
    "check_chain",
]

AVAILABLE_KINDS = ("llm", "map", "split", "template", "retrieve", "input")
"""Kinds the orchestrator runs (every kind of the spec)."""
SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_CONTEXT_NAMES = ("inputs", "stages")


def chain_json_schema() -> dict[str, Any]:
    """The JSON Schema of chain YAML v1 (``stagecast schema > chains/chain.schema.json``)."""
    generated = ChainSpec.model_json_schema(by_alias=True)
    generated.pop("title", None)
    generated.pop("description", None)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "Stagecast chain",
        "description": (
            "A prompt chain: typed inputs, stages that form a DAG, and named outputs "
            "(Stagecast chain YAML v1)."
        ),
        **generated,
    }


def chain_json_schema_text() -> str:
    """``chain_json_schema()`` exactly as committed in chains/chain.schema.json."""
    return json.dumps(chain_json_schema(), indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class _Template:
    path: KeyPath
    source: str
    scope: frozenset[str]
    """Names the template may read besides ``inputs`` and ``stages`` (a map's `as`, `index`)."""
    local: frozenset[str]
    """Stage ids of the same map item it may read (earlier members of a `stages` sequence)."""
    owner: str | None
    """The top-level stage id it belongs to (None for `outputs`)."""


def check_chain(
    spec: ChainSpec,
    source: SourceMap,
    *,
    model_names: Collection[str] | None = None,
    broken: Collection[int] = (),
) -> list[Problem]:
    """Every cross-stage problem of ``spec``; ``source`` maps key paths to file positions.

    ``broken`` lists the indexes of stages that failed validation (placeholders in ``spec``
    holding only their id): they count as existing stages but are not checked further.
    ``model_names`` turns on the unknown-model check.
    """
    return _Checker(spec, source, model_names, set(broken)).run()


class _Checker:
    def __init__(
        self,
        spec: ChainSpec,
        source: SourceMap,
        model_names: Collection[str] | None,
        broken: set[int],
    ) -> None:
        self.spec = spec
        self.source = source
        self.model_names = sorted(model_names) if model_names is not None else None
        self.models_source: str | None = getattr(model_names, "source", None)
        self.broken = broken
        self.problems: list[Problem] = []
        self.ids = list(dict.fromkeys(s.id for s in spec.stages if s.id))
        self.nested_ids: dict[str, str] = {}
        # (reader, read) -> where the reference is, for naming the field that closes a cycle
        self.edges: dict[str, dict[str, Problem]] = {i: {} for i in self.ids}

    def add(self, path: KeyPath, problem: str, hint: str = "", *, at_key: bool = False) -> None:
        self.problems.append(self.source.problem(path, problem, hint, at_key=at_key))

    def run(self) -> list[Problem]:
        self.check_ids()
        self.check_inputs()
        if self.spec.defaults.model is not None:
            self.check_model(("defaults", "model"), self.spec.defaults.model)
        templates: list[_Template] = []
        for index, stage in enumerate(self.spec.stages):
            if index in self.broken:
                continue
            path: KeyPath = ("stages", index)
            self.check_stage(stage, path, nested=False)
            templates.extend(_stage_templates(stage, path, stage.id))
            self.check_needs(stage, path)
        for name, value in (self.spec.outputs or {}).items():
            templates.extend(_value_templates(value, ("outputs", name)))
        for template in templates:
            self.check_template(template)
        self.check_cycles()
        return self.problems

    # ids ------------------------------------------------------------------------------------

    def check_ids(self) -> None:
        first: dict[str, int] = {}
        for index, stage in enumerate(self.spec.stages):
            path: KeyPath = ("stages", index)
            if stage.id is None:
                raw = self.source.value(path)
                if index in self.broken and (not isinstance(raw, dict) or "id" in raw):
                    continue  # not a mapping, or a bad id: already reported by the model
                self.add(
                    path,
                    "a top-level stage needs an id",
                    "add `id: <name>`; other stages read its output as `stages.<name>.output`",
                )
            elif stage.id in first:
                line = self.source.position(("stages", first[stage.id], "id"))[0]
                self.add(
                    (*path, "id"),
                    f"duplicate stage id '{stage.id}' (first at line {line})",
                    "stage ids must be unique; rename one of them",
                )
            else:
                first[stage.id] = index
            if isinstance(stage, MapStage) and index not in self.broken:
                self.collect_nested_ids(stage)

    def collect_nested_ids(self, stage: MapStage) -> None:
        for inner in stage.item_stages:
            if inner.id is not None and stage.id is not None:
                self.nested_ids.setdefault(inner.id, stage.id)
            if isinstance(inner, MapStage):
                self.collect_nested_ids(inner)

    # inputs ---------------------------------------------------------------------------------

    def check_inputs(self) -> None:
        for name, spec in self.spec.inputs.items():
            path: KeyPath = ("inputs", name)
            if spec.default is not None:
                problem = _default_problem(spec)
                if problem:
                    self.add((*path, "default"), problem)
            if (
                spec.minimum is not None
                and spec.maximum is not None
                and spec.minimum > spec.maximum
            ):
                self.add(
                    (*path, "minimum"),
                    f"minimum ({spec.minimum:g}) is greater than maximum ({spec.maximum:g})",
                )

    # stages ---------------------------------------------------------------------------------

    def check_stage(self, stage: StageSpec, path: KeyPath, *, nested: bool) -> None:
        if isinstance(stage, RetrieveStage):
            self.check_collection((*path, "collection"), stage.collection)
        if nested and stage.needs:
            self.add(
                (*path, "needs"),
                "`needs` has no effect inside a map's stage",
                "put `needs` on the map stage itself",
                at_key=True,
            )
        if isinstance(stage, LlmStage):
            if stage.model is not None:
                self.check_model((*path, "model"), stage.model)
            if stage.schema_ is not None:
                if stage.output == "text":
                    self.add(
                        (*path, "schema"),
                        "`schema` is ignored because `output` is text",
                        "add `output: json`, or remove `schema`",
                        at_key=True,
                    )
                else:
                    self.check_json_schema((*path, "schema"), stage.schema_)
        if isinstance(stage, InputStage):
            if stage.schema_ is not None:
                self.check_json_schema((*path, "schema"), stage.schema_)
            if stage.has_default:
                self.check_input_default(stage, path)
        if isinstance(stage, SplitStage) and stage.overlap >= stage.chunk_size:
            self.add(
                (*path, "overlap"),
                f"overlap ({stage.overlap}) must be smaller than chunk_size ({stage.chunk_size})",
            )
        if isinstance(stage, MapStage):
            if stage.as_ in (*_CONTEXT_NAMES, "index"):
                self.add(
                    (*path, "as"),
                    f"'{stage.as_}' is already a name in templates",
                    "choose another name for the item, e.g. `as: item`",
                )
            self.check_map_members(stage, path)

    def check_map_members(self, stage: MapStage, path: KeyPath) -> None:
        if stage.stage is None and stage.stages is None:
            self.add(
                path,
                "a map needs a nested `stage` to run per item (or `stages`, a sequence)",
                'add e.g. `stage: {kind: llm, prompt: "{{ item }}"}`',
            )
            return
        if stage.stage is not None and stage.stages is not None:
            self.add(
                (*path, "stages"),
                "a map has either `stage` or `stages`, not both",
                "keep `stages` (run one after another per item) or `stage`",
                at_key=True,
            )
        if stage.stage is not None:
            self.check_stage(stage.stage, (*path, "stage"), nested=True)
        members = stage.stages or []
        for index, member in enumerate(members):
            where: KeyPath = (*path, "stages", index)
            if member.id is None:
                self.add(
                    where,
                    "a stage in a map's `stages` needs an id",
                    "the stages after it read its output as `stages.<id>.output`",
                )
            elif member.id in self.ids:
                self.add(
                    (*where, "id"),
                    f"'{member.id}' is already a top-level stage id",
                    "ids in a map's `stages` must differ from the top-level ones",
                )
            elif member.id in {m.id for m in members[:index]}:
                self.add((*where, "id"), f"duplicate stage id '{member.id}' in this map's `stages`")
            self.check_stage(member, where, nested=True)

    def check_input_default(self, stage: InputStage, path: KeyPath) -> None:
        try:
            validator = validator_for(stage.answer_schema, default=Draft202012Validator)
            error = next(iter(validator(stage.answer_schema).iter_errors(stage.default)), None)
        except SchemaError:
            return  # reported by check_json_schema
        if error is not None:
            self.add((*path, "default"), f"the default does not match `schema`: {error.message}")

    def check_collection(self, path: KeyPath, value: str) -> None:
        try:
            config = load_collections_config()
        except CollectionError as exc:
            self.add(path, str(exc))
            return
        name = self.source.filename
        base = Path(name).parent if name and not name.startswith("<") else Path.cwd()
        found = collection_problem(value, base.resolve(), config)
        if found is not None:
            self.add(path, *found)

    def check_model(self, path: KeyPath, name: str) -> None:
        if self.model_names is None or name in self.model_names:
            return
        close = difflib.get_close_matches(name, self.model_names, n=1)
        known = ", ".join(self.model_names) if self.model_names else "(none configured)"
        hint = (f"did you mean '{close[0]}'? " if close else "") + f"models are: {known}"
        if self.models_source:
            hint += f" (in {self.models_source})"
        self.add(path, f"unknown model '{name}'", hint)

    def check_json_schema(self, path: KeyPath, schema: dict[str, Any]) -> None:
        try:
            validator_for(schema, default=Draft202012Validator).check_schema(schema)
        except SchemaError as exc:
            where: KeyPath = (*path, *(s for s in exc.absolute_path if isinstance(s, str | int)))
            self.add(where, f"not a valid JSON Schema: {exc.message}")

    def check_needs(self, stage: StageSpec, path: KeyPath) -> None:
        for index, name in enumerate(stage.needs):
            where: KeyPath = (*path, "needs", index)
            if name in self.ids:
                if stage.id is not None:
                    self.edges[stage.id].setdefault(name, self.source.problem(where, ""))
            else:
                self.add(where, *self.unknown_stage(name))

    def unknown_stage(self, name: str) -> tuple[str, str]:
        ids = self.ids
        problem = (
            f"no stage '{name}'; stages are: {', '.join(ids)}" if ids else f"no stage '{name}'"
        )
        if name in self.nested_ids:
            owner = self.nested_ids[name]
            return problem, (
                f"'{name}' runs inside map '{owner}'; read its results as `stages.{owner}.output`"
            )
        close = difflib.get_close_matches(name, ids, n=1)
        return problem, (f"did you mean '{close[0]}'?" if close else "")

    # templates ------------------------------------------------------------------------------

    def check_template(self, template: _Template) -> None:
        path, text = template.path, template.source
        if path[-1] in ("over", "when") and not compile_template_is_expression(text):
            field = path[-1]
            what = "a list" if field == "over" else "true or false"
            self.add(
                path,
                f"`{field}` must be one {{{{ expression }}}} whose value is {what}",
                f'e.g. `{field}: "{{{{ stages.sections.output }}}}"`'
                if field == "over"
                else 'e.g. `when: "{{ inputs.bullets > 3 }}"`',
            )
        try:
            ast = ENV.parse(text)
            refs = references(text)
        except TemplateSyntaxError as exc:
            self.problems.append(
                self.source.template_problem(
                    path, exc.lineno or 1, f"template syntax error: {exc.message}"
                )
            )
            return
        offset = _expression_offset(text)
        for name, line in sorted(refs.stages.items(), key=lambda item: item[1]):
            needles = _needles("stages", name)
            if name in template.local:
                continue  # an earlier stage of the same map item
            if name not in self.ids:
                problem, hint = self.unknown_stage(name)
                if template.owner is not None and self.nested_ids.get(name) == template.owner:
                    hint = (
                        f"'{name}' comes later in map '{template.owner}': a stage of a map's "
                        "`stages` reads only the stages before it"
                    )
                self.problems.append(
                    self.source.template_problem(path, line + offset, problem, hint, needles)
                )
            elif template.owner is not None:
                where = self.source.template_problem(path, line + offset, "", "", needles)
                self.edges.setdefault(template.owner, {}).setdefault(name, where)
        for name, line in sorted(refs.inputs.items(), key=lambda item: item[1]):
            if name in self.spec.inputs:
                continue
            known = list(self.spec.inputs)
            if known:
                problem = f"no input '{name}'; inputs are: {', '.join(known)}"
            else:
                problem = f"no input '{name}'; the chain declares no inputs"
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "declare it under `inputs:`"
            self.problems.append(
                self.source.template_problem(
                    path, line + offset, problem, hint, _needles("inputs", name)
                )
            )
        allowed = {*_CONTEXT_NAMES, *template.scope}
        for name in sorted(refs.names - allowed - set(ENV.globals)):
            readable = ", ".join([*_CONTEXT_NAMES, *sorted(template.scope)])
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = (
                f"did you mean '{close[0]}'? " if close else ""
            ) + f"templates can read: {readable}"
            self.problems.append(
                self.source.template_problem(
                    path, _name_line(ast, name), f"unknown variable '{name}'", hint, (name,)
                )
            )

    # cycles ---------------------------------------------------------------------------------

    def check_cycles(self) -> None:
        reported: set[str] = set()
        for start in self.ids:
            if start in reported:
                continue
            cycle = _find_cycle(start, self.edges)
            if cycle is None:
                continue
            reported.update(cycle)
            first = self.edges[cycle[0]][cycle[1]]
            self.problems.append(
                Problem(
                    first.file,
                    first.line,
                    first.col,
                    first.key,
                    f"cycle: {' -> '.join(cycle)}",
                    "a stage cannot wait for a stage that waits for it; remove one reference "
                    "or `needs` entry",
                )
            )


def compile_template_is_expression(text: str) -> bool:
    try:
        return compile_template(text).is_expression
    except TemplateSyntaxError:
        return True  # the syntax error is reported on its own


def _expression_offset(text: str) -> int:
    """``references`` re-parses a whole ``{{ expression }}`` without its leading whitespace."""
    if not compile_template_is_expression(text):
        return 0
    return text[: len(text) - len(text.lstrip())].count("\n")


def _needles(base: str, name: str) -> tuple[str, ...]:
    return (f"{base}.{name}", f"{base}['{name}']", f'{base}["{name}"]', name)


def _name_line(ast: nodes.Template, name: str) -> int:
    lines = [n.lineno for n in ast.find_all(nodes.Name) if n.name == name and n.ctx == "load"]
    return min(lines, default=1)


def _find_cycle(start: str, edges: dict[str, dict[str, Problem]]) -> list[str] | None:
    """The shortest path ``start -> … -> start`` along the edges, if any."""
    parents: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in edges.get(node, {}):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if nxt not in parents:
                parents[nxt] = node
                queue.append(nxt)
    return None


def _stage_templates(stage: StageSpec, path: KeyPath, owner: str | None) -> Iterator[_Template]:
    for template in stage_templates(stage, path):
        yield _Template(template.path, template.source, template.scope, template.local, owner)


def _value_templates(value: Any, path: KeyPath) -> Iterator[_Template]:
    if isinstance(value, str):
        yield _Template(path, value, frozenset(), frozenset(), None)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _value_templates(item, (*path, str(key)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _value_templates(item, (*path, index))


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
}


def _default_problem(spec: InputSpec) -> str:
    value = spec.default
    rule = broken_rule(spec, value)
    if rule is None:
        return ""
    if rule == "type":
        words = _TYPE_WORDS[spec.type]
        return f"default {_show(value)} is not {words} (the input's type is {spec.type})"
    if rule == "enum":
        return f"default {_show(value)} is not one of the enum values"
    if rule == "minimum":
        return f"default {_show(value)} is below the minimum ({spec.minimum:g})"
    if rule == "maximum":
        return f"default {_show(value)} is above the maximum ({spec.maximum:g})"
    if rule == "min_length":
        return f"default is shorter than min_length ({spec.min_length})"
    return f"default is longer than max_length ({spec.max_length})"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)
