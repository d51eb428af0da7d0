"""A loaded chain: its spec plus what the orchestrator derives from it (the DAG)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from stagecast.engine.sourcemap import KeyPath
from stagecast.engine.spec import (
    ChainSpec,
    InputStage,
    LlmStage,
    MapStage,
    Message,
    PromptParts,
    RetrieveStage,
    SplitStage,
    StageSpec,
    TemplateStage,
)
from stagecast.engine.templates import references

__all__ = [
    "Chain",
    "PromptRole",
    "StageTemplate",
    "prompt_parts",
    "stage_dependencies",
    "stage_templates",
]


@dataclass
class Chain:
    """A validated chain, ready to run."""

    spec: ChainSpec
    id: str
    path: Path | None = None
    deps: dict[str, list[str]] = field(default_factory=dict)
    """Top-level stage id -> the stages it waits for (template references + ``needs``)."""

    @classmethod
    def from_spec(
        cls, spec: ChainSpec, *, id: str | None = None, path: Path | None = None
    ) -> Chain:
        chain_id = spec.id or id or (path.stem if path else "chain")
        return cls(spec=spec, id=chain_id, path=path, deps=stage_dependencies(spec))

    @cached_property
    def cited_stages(self) -> dict[int, list[str]]:
        """``id(llm stage spec)`` -> the retrieve stages (or maps of one) its prompt reads, in
        order: whose sources its ``[n]`` markers cite. Derived once per loaded chain."""
        retrieving: list[str] = []
        for stage in self.spec.stages:
            inner: StageSpec | None = stage
            while isinstance(inner, MapStage):
                inner = inner.stage
            if isinstance(inner, RetrieveStage) and stage.id:
                retrieving.append(stage.id)
        cited: dict[int, list[str]] = {}
        if not retrieving:
            return cited
        todo: list[StageSpec] = list(self.spec.stages)
        while todo:
            stage = todo.pop()
            if isinstance(stage, MapStage):
                todo.extend(stage.item_stages)
            if not isinstance(stage, LlmStage):
                continue
            read: set[str] = set()
            for template in stage_templates(stage):
                if template.path and template.path[0] == "when":
                    continue
                try:
                    read.update(references(template.source).stages)
                except Exception:
                    continue
            ids = [s for s in retrieving if s in read]
            if ids:
                cited[id(stage)] = ids
        return cited

    @property
    def title(self) -> str:
        return self.spec.title or self.id

    def stage(self, stage_id: str) -> StageSpec:
        for stage in self.spec.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)


PromptRole = Literal["system", "user", "assistant"]


def prompt_parts(
    prompt: str | PromptParts | list[Message],
) -> list[tuple[PromptRole, KeyPath, str]]:
    """An llm stage's prompt as ``(role, key path under prompt, template source)``, in order.

    The one walk over the three prompt forms: a string is the user message; ``{system, user}``;
    a list of ``{role, content}`` messages.
    """
    if isinstance(prompt, str):
        return [("user", (), prompt)]
    if isinstance(prompt, list):
        return [(m.role, (i, "content"), m.content) for i, m in enumerate(prompt)]
    parts: list[tuple[PromptRole, KeyPath, str]] = []
    if prompt.system is not None:
        parts.append(("system", ("system",), prompt.system))
    parts.append(("user", ("user",), prompt.user))
    return parts


@dataclass(frozen=True, slots=True)
class StageTemplate:
    """One template field of a stage."""

    path: KeyPath
    """Where it is, from the path the walk started at: ``(..., "prompt", "system")``."""
    source: str
    scope: frozenset[str]
    """Names it may read besides ``inputs`` and ``stages`` (a map's ``as``, ``index``,
    ``earlier``)."""
    local: frozenset[str] = frozenset()
    """Stage ids it may read besides the top-level ones: the stages before it in a map's
    ``stages`` sequence (``stages.<id>.output`` of the same item)."""


def stage_templates(
    stage: StageSpec,
    path: KeyPath = (),
    scope: frozenset[str] = frozenset(),
    local: frozenset[str] = frozenset(),
) -> Iterator[StageTemplate]:
    """Every template of a stage, nested map stages included, in field order."""
    if stage.when is not None:
        yield StageTemplate((*path, "when"), stage.when, scope, local)
    if isinstance(stage, LlmStage):
        for _, where, source in prompt_parts(stage.prompt):
            yield StageTemplate((*path, "prompt", *where), source, scope, local)
    elif isinstance(stage, MapStage):
        yield StageTemplate((*path, "over"), stage.over, scope, local)
        inner = scope | {stage.as_, "index", "earlier"}
        if stage.stages is not None:
            before: set[str] = set(local)
            for index, member in enumerate(stage.stages):
                yield from stage_templates(
                    member, (*path, "stages", index), inner, frozenset(before)
                )
                if member.id:
                    before.add(member.id)
        elif stage.stage is not None:
            yield from stage_templates(stage.stage, (*path, "stage"), inner, local)
    elif isinstance(stage, TemplateStage | SplitStage):
        yield StageTemplate((*path, "text"), stage.text, scope, local)
    elif isinstance(stage, RetrieveStage):
        yield StageTemplate((*path, "query"), stage.query, scope, local)
    elif isinstance(stage, InputStage):
        yield StageTemplate((*path, "prompt"), stage.prompt, scope, local)


def stage_dependencies(spec: ChainSpec) -> dict[str, list[str]]:
    """Each top-level stage's dependencies, in YAML order, self-references and unknowns dropped."""
    ids = [s.id for s in spec.stages if s.id]
    known = set(ids)
    deps: dict[str, list[str]] = {}
    for stage in spec.stages:
        if not stage.id:
            continue
        wanted: set[str] = set(stage.needs)
        for template in stage_templates(stage):
            try:
                wanted.update(references(template.source).stages)
            except Exception:
                continue  # syntax errors are validation's business
        wanted.discard(stage.id)
        deps[stage.id] = [i for i in ids if i in wanted and i in known]
    return deps
