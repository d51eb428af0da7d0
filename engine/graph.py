"""A chain as a Mermaid flowchart (``stagecast graph``): a node per stage, the DAG's edges."""

from __future__ import annotations

import contextlib

from stagecast.engine.chain import Chain
from stagecast.engine.spec import ChainSpec, MapStage
from stagecast.engine.templates import references

__all__ = ["chain_mermaid"]

_MERMAID_RESERVED = {
    "end",
    "graph",
    "subgraph",
    "flowchart",
    "style",
    "class",
    "classDef",
    "click",
    "linkStyle",
    "default",
}


def _node_id(stage_id: str) -> str:
    return stage_id + "_" if stage_id in _MERMAID_RESERVED else stage_id


def _mermaid_text(text: str) -> str:
    text = " ".join(text.split())
    for char, code in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text


def _when_expr(source: str) -> str:
    text = source.strip()
    if text.startswith("{{") and text.endswith("}}"):
        text = text[2:-2].strip()
    return text


def chain_mermaid(chain: Chain) -> str:
    """The chain as a Mermaid flowchart: a node per stage, edges from the DAG, outputs last."""
    spec = chain.spec
    lines = ["flowchart TD"]
    conditional: list[str] = []
    for stage in spec.stages:
        sid = stage.id or ""
        kind: str = stage.kind
        if isinstance(stage, MapStage):
            inner = " → ".join(member.kind for member in stage.item_stages)
            kind = f"map × {inner}"
        label = f"{_mermaid_text(stage.label or sid)}<br/><small>{kind} · {sid}</small>"
        if stage.when is not None:
            label += f"<br/><i>when: {_mermaid_text(_when_expr(stage.when))}</i>"
            conditional.append(_node_id(sid))
        shape = {
            "map": ('[["', '"]]'),
            "split": ('[/"', '"/]'),
            "template": ('("', '")'),
            "retrieve": ('[("', '")]'),
            "input": ('{{"', '"}}'),
        }.get(stage.kind, ('["', '"]'))
        lines.append(f"    {_node_id(sid)}{shape[0]}{label}{shape[1]}")
    for stage in spec.stages:
        sid = stage.id or ""
        arrow = "-.->" if stage.when is not None else "-->"
        for dep in chain.deps.get(sid, []):
            lines.append(f"    {_node_id(dep)} {arrow} {_node_id(sid)}")
    out_names, out_deps = _outputs_deps(spec)
    names = _mermaid_text(", ".join(out_names))
    lines.append(f'    outputs__(["outputs<br/><small>{names}</small>"])')
    for dep in out_deps:
        lines.append(f"    {_node_id(dep)} --> outputs__")
    if conditional:
        lines.append("    classDef conditional stroke-dasharray: 5 5")
        lines.append(f"    class {','.join(conditional)} conditional")
    return "\n".join(lines)


def _outputs_deps(spec: ChainSpec) -> tuple[list[str], list[str]]:
    ids = [s.id or "" for s in spec.stages]
    if spec.outputs is None:
        return ["output"], [ids[-1]]
    wanted: set[str] = set()
    for value in spec.outputs.values():
        if isinstance(value, str):
            with contextlib.suppress(Exception):
                wanted.update(references(value).stages)
    return list(spec.outputs), [i for i in ids if i in wanted]
