"""A loaded chain: its spec plus what the orchestrator derives from it (the DAG)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.spec import ChainSpec, LlmStage, MapStage, StageSpec
from engine.templates import references

__all__ = ["Chain", "stage_templates", "stage_dependencies"]


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

    @property
    def title(self) -> str:
        return self.spec.title or self.id

    def stage(self, stage_id: str) -> StageSpec:
        for stage in self.spec.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(stage_id)


def stage_templates(stage: StageSpec) -> list[tuple[str, str]]:
    """Every template of a stage (nested stages included) as ``(key path, source)``."""
    out: list[tuple[str, str]] = []
    if stage.when is not None:
        out.append(("when", stage.when))
    if isinstance(stage, LlmStage):
        prompt = stage.prompt
        if isinstance(prompt, str):
            out.append(("prompt", prompt))
        elif isinstance(prompt, list):
            out.extend((f"prompt[{i}].content", m.content) for i, m in enumerate(prompt))
        else:
            if prompt.system is not None:
                out.append(("prompt.system", prompt.system))
            out.append(("prompt.user", prompt.user))
    elif isinstance(stage, MapStage):
        out.append(("over", stage.over))
        out.extend((f"stage.{k}", s) for k, s in stage_templates(stage.stage))
    else:
        for attr in ("text", "query", "prompt"):
            value: Any = getattr(stage, attr, None)
            if isinstance(value, str):
                out.append((attr, value))
    return out


def stage_dependencies(spec: ChainSpec) -> dict[str, list[str]]:
    """Each top-level stage's dependencies, in YAML order, self-references and unknowns dropped."""
    ids = [s.id for s in spec.stages if s.id]
    known = set(ids)
    deps: dict[str, list[str]] = {}
    for stage in spec.stages:
        if not stage.id:
            continue
        wanted: set[str] = set(stage.needs)
        for _, source in stage_templates(stage):
            try:
                wanted.update(references(source).stages)
            except Exception:
                continue  # syntax errors are validation's business
        wanted.discard(stage.id)
        deps[stage.id] = [i for i in ids if i in wanted and i in known]
    return deps
