"""Loading chain YAML: finding files, positions, pydantic errors mapped to keys, partial checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagecast.engine.chain import Chain
from stagecast.engine.errors import ChainSpecError
from stagecast.engine.loading import (
    find_chain,
    load_chain,
    load_chain_text,
    parse_chain_text,
    validate_chain_file,
)

GOOD = """\
id: advanced_summary
title: Advanced summary
inputs:
  document: {type: string, max_length: 400000}
  language: {type: string, default: en}
  bullets: {type: integer, default: 5, minimum: 1, maximum: 20}
defaults:
  model: default
  temperature: 0.2
stages:
  - id: sections
    kind: split
    text: "{{ inputs.document }}"
    chunk_size: 2000
    overlap: 200
    sources: true
  - id: section_summaries
    kind: map
    over: "{{ stages.sections.output }}"
    as: section
    concurrency: 4
    stage:
      kind: llm
      prompt:
        system: You summarize faithfully, in {{ inputs.language }}.
        user: "{{ section.text }} ({{ index }})"
  - id: draft
    kind: llm
    prompt: |
      Merge these section summaries into {{ inputs.bullets }} bullet points:
      {% for s in stages.section_summaries.output %}- {{ s }} {{ loop.index }}
      {% endfor %}
outputs:
  summary: "{{ stages.draft.output }}"
"""


def problems_of(text: str, **kwargs: object) -> list[str]:
    _, problems = parse_chain_text(text, filename="c.yaml", **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in problems]


def test_a_good_chain_loads_with_its_dag() -> None:
    chain = load_chain_text(GOOD, model_names=["default"])
    assert isinstance(chain, Chain)
    assert chain.id == "advanced_summary"
    assert chain.deps == {
        "sections": [],
        "section_summaries": ["sections"],
        "draft": ["section_summaries"],
    }


def test_load_chain_from_a_path_uses_the_file_stem_as_id(tmp_path: Path) -> None:
    path = tmp_path / "my_chain.yaml"
    path.write_text(GOOD.replace("id: advanced_summary\n", ""), encoding="utf-8")
    chain = load_chain(path)
    assert (chain.id, chain.path) == ("my_chain", path)
    assert validate_chain_file(path) == []


def test_load_chain_text_without_id_or_filename() -> None:
    assert load_chain_text(GOOD.replace("id: advanced_summary\n", "")).id == "chain"


def test_find_chain_by_id_and_by_path(tmp_path: Path) -> None:
    (tmp_path / "summarize.yaml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "interview.yml").write_text(GOOD, encoding="utf-8")
    assert find_chain("summarize", tmp_path) == tmp_path / "summarize.yaml"
    assert find_chain("interview", tmp_path) == tmp_path / "interview.yml"
    assert find_chain(tmp_path / "summarize.yaml", tmp_path) == tmp_path / "summarize.yaml"


def test_find_chain_unknown_id_names_the_chains(tmp_path: Path) -> None:
    (tmp_path / "summarize.yaml").write_text(GOOD, encoding="utf-8")
    (tmp_path / "interview.yaml").write_text(GOOD, encoding="utf-8")
    with pytest.raises(ChainSpecError) as info:
        find_chain("sumarize", tmp_path)
    assert str(info.value) == (
        f"{tmp_path}:?:?: no chain 'sumarize'; chains are: interview, summarize\n"
        "  hint: did you mean 'summarize'?"
    )


def test_find_chain_in_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ChainSpecError) as info:
        find_chain("summarize", tmp_path)
    assert str(info.value) == f"{tmp_path}:?:?: no chain 'summarize': the directory has none"


def test_a_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ChainSpecError) as info:
        load_chain(path)
    assert str(info.value) == f"{path}:?:?: no such chain file"
    assert [str(p) for p in validate_chain_file(path)] == [f"{path}:?:?: no such chain file"]


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"title: caf\xe9\n")
    (problem,) = validate_chain_file(path)
    assert problem.problem == "the file is not UTF-8 text (invalid continuation byte at byte 10)"


def test_an_empty_file() -> None:
    assert problems_of("") == ["c.yaml:1:1: the file is empty; a chain is a mapping with `stages`"]


def test_a_scalar_file() -> None:
    assert problems_of("just text\n") == [
        "c.yaml:1:1: the top level must be a mapping (id, inputs, stages, …), not a single "
        "value\n  hint: start the file with keys such as `id:` and `stages:`"
    ]


def test_two_documents_are_a_yaml_problem() -> None:
    assert problems_of("stages: []\n---\nstages: []\n") == [
        "c.yaml:2:1: invalid YAML: but found another document\n"
        "  hint: expected a single document in the stream (line 1)"
    ]


def test_tabs_get_a_hint() -> None:
    assert problems_of("stages:\n\t- id: a\n") == [
        "c.yaml:2:1: invalid YAML: found character '\\t' that cannot start any token\n"
        "  hint: YAML indents with spaces, never tabs"
    ]


def test_missing_stages_and_empty_stages() -> None:
    assert problems_of("id: x\n") == [
        "c.yaml:1:1: missing required key 'stages'\n  hint: a chain needs stages"
    ]
    assert problems_of("stages: []\n") == ["c.yaml:1:9: stages: a chain needs at least one stage"]


def test_unknown_top_level_key_lists_the_keys() -> None:
    text = "stages:\n  - {id: a, kind: template, text: x}\nzzz: 1\n"
    assert problems_of(text) == [
        "c.yaml:3:1: zzz: unknown key\n  hint: keys here are: id, title, description, version, "
        "inputs, defaults, stages, outputs"
    ]


def test_unknown_key_in_a_nested_map_stage_and_a_message() -> None:
    text = """\
stages:
  - id: each
    kind: map
    over: "{{ inputs.items }}"
    stage:
      kind: llm
      promt: hi
      prompt:
        - {role: user, contnet: hi}
inputs:
  items: {type: array}
"""
    assert problems_of(text) == [
        "c.yaml:7:7: stages[each].stage.promt: unknown key\n  hint: did you mean 'prompt'?",
        "c.yaml:9:11: stages[each].stage.prompt[0]: missing required key 'content'",
        "c.yaml:9:24: stages[each].stage.prompt[0].contnet: unknown key\n"
        "  hint: did you mean 'content'?",
    ]


def test_literal_errors_suggest_a_value() -> None:
    text = "inputs:\n  n: {type: int}\nstages:\n  - {id: a, kind: template, text: x}\n"
    assert problems_of(text) == [
        "c.yaml:2:13: inputs.n.type: unknown value 'int'; expected 'string', 'integer', "
        "'number', 'boolean', 'array' or 'object'\n  hint: did you mean 'integer'?"
    ]


def test_a_stage_that_is_not_a_mapping_and_one_without_kind() -> None:
    text = "stages:\n  - draft\n  - {id: b, text: x}\n"
    assert problems_of(text) == [
        "c.yaml:2:5: stages[0]: expected a mapping, got 'draft'",
        "c.yaml:3:5: stages[b]: missing key 'kind'\n"
        "  hint: kinds are: llm, map, split, template, retrieve, input",
    ]


def test_references_to_a_broken_stage_are_not_unknown() -> None:
    text = """\
stages:
  - id: a
    kind: llm
    prompt: {system: only}
  - id: b
    kind: template
    text: "{{ stages.a.output }}"
"""
    assert problems_of(text) == ["c.yaml:4:13: stages[a].prompt: missing required key 'user'"]


def test_a_self_reference_is_a_cycle() -> None:
    text = "stages:\n  - id: a\n    kind: template\n    text: '{{ stages.a.output }}'\n"
    assert problems_of(text) == [
        "c.yaml:4:15: stages[a].text: cycle: a -> a\n"
        "  hint: a stage cannot wait for a stage that waits for it; remove one reference or "
        "`needs` entry"
    ]


def test_outputs_are_checked() -> None:
    text = "stages:\n  - {id: a, kind: template, text: x}\noutputs:\n  r: '{{ stages.b.output }}'\n"
    assert problems_of(text) == ["c.yaml:4:10: outputs.r: no stage 'b'; stages are: a"]


def test_undeclared_inputs_when_none_are_declared() -> None:
    text = "stages:\n  - {id: a, kind: template, text: '{{ inputs.x }}'}\n"
    assert problems_of(text) == [
        "c.yaml:2:39: stages[a].text: no input 'x'; the chain declares no inputs\n"
        "  hint: declare it under `inputs:`"
    ]


def test_jinja_globals_and_loop_are_not_undeclared() -> None:
    text = (
        "stages:\n  - id: a\n    kind: template\n"
        "    text: '{% for i in range(3) %}{{ loop.index }}{% endfor %}'\n"
    )
    assert problems_of(text) == []


def test_a_bad_chain_id_from_the_file_name() -> None:
    _, problems = parse_chain_text(
        "stages:\n  - {id: a, kind: template, text: x}\n", filename="My Chain.yaml"
    )
    assert [str(p) for p in problems] == [
        "My Chain.yaml:1:1: the file name 'My Chain' is not a valid chain id\n"
        "  hint: rename the file (lowercase letters, digits, `_`, `-`) or set `id:`"
    ]


def test_nested_needs_and_shadowing_as() -> None:
    text = """\
stages:
  - id: a
    kind: template
    text: x
  - id: m
    kind: map
    over: "{{ stages.a.output }}"
    as: stages
    stage: {kind: template, text: "{{ index }}", needs: [a]}
"""
    assert problems_of(text) == [
        "c.yaml:8:9: stages[m].as: 'stages' is already a name in templates\n"
        "  hint: choose another name for the item, e.g. `as: item`",
        "c.yaml:9:50: stages[m].stage.needs: `needs` has no effect inside a map's stage\n"
        "  hint: put `needs` on the map stage itself",
    ]


def test_anchors_and_merge_keys_load() -> None:
    text = """\
defaults: &d {temperature: 0.1}
stages:
  - &base {id: a, kind: llm, prompt: hi}
  - <<: *base
    id: b
"""
    chain = load_chain_text(text)
    assert [s.id for s in chain.spec.stages] == ["a", "b"]


def test_keys_must_be_text_and_dates_are_explained() -> None:
    text = "1: 2\nid: 2024-01-01\nstages: [{id: a, kind: template, text: x}]\n"
    assert problems_of(text) == [
        "c.yaml:1:1: [1]: keys must be text, got 1",
        "c.yaml:2:5: id: should be a valid string, got the date 2024-01-01 "
        "(quote it to make it text)",
    ]


def test_an_unquoted_template_says_to_quote_it() -> None:
    text = "id: q\nstages:\n  - id: a\n    kind: template\n    text: {{ inputs.x }}\n"
    _, problems = parse_chain_text(text, filename="q.yaml")
    assert [str(p) for p in problems] == [
        "q.yaml:5:12: invalid YAML: found unhashable key\n"
        '  hint: quote the template: a value that starts with { must be in quotes, e.g. "{{ … }}"'
    ]
    flow = "id: q\nstages: [{id: a, kind: template, text: hi}]\noutputs: {x: 1}\n"
    assert parse_chain_text(flow, filename="f.yaml")[1] == []  # a flow mapping stays fine
