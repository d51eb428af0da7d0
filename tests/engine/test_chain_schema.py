"""chains/chain.schema.json: generated from ChainSpec, committed, and described field by field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

from stagecast.engine.validation import SCHEMA_DIALECT, chain_json_schema, chain_json_schema_text

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "chains" / "chain.schema.json"
BAD = Path(__file__).parent / "chains_bad"

EXAMPLE = """\
id: advanced_summary
inputs:
  document: {type: string, description: Text to summarize, max_length: 400000}
defaults: {model: default, temperature: 0.2}
stages:
  - id: sections
    kind: split
    text: "{{ inputs.document }}"
    chunk_size: 2000
    overlap: 200
  - id: section_summaries
    kind: map
    over: "{{ stages.sections.output }}"
    as: section
    stage:
      kind: llm
      prompt: {system: You summarize., user: "{{ section.text }}"}
  - id: draft
    kind: llm
    output: json
    schema: {type: array, items: {type: string}}
    prompt:
      - {role: user, content: "Merge {{ stages.section_summaries.output }}"}
outputs:
  summary: "{{ stages.draft.output }}"
"""


def properties(node: Any, where: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (location, property schema) in the schema, $defs included."""
    if isinstance(node, dict):
        for name, prop in (node.get("properties") or {}).items():
            yield f"{where}/properties/{name}", prop
        for key, value in node.items():
            yield from properties(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from properties(value, f"{where}/{index}")


def test_the_committed_schema_is_up_to_date() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == chain_json_schema_text(), (
        "chains/chain.schema.json is stale; regenerate it with "
        "`stagecast schema > chains/chain.schema.json`"
    )


def test_schema_header() -> None:
    schema = chain_json_schema()
    assert schema["$schema"] == SCHEMA_DIALECT == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "Stagecast chain"
    assert schema["description"]
    Draft202012Validator.check_schema(schema)


def test_every_property_has_a_description() -> None:
    found = list(properties(chain_json_schema()))
    assert len(found) > 50
    missing = [where for where, prop in found if not prop.get("description")]
    assert missing == []


def test_aliases_are_used() -> None:
    defs = chain_json_schema()["$defs"]
    assert "schema" in defs["LlmStage"]["properties"]
    assert "as" in defs["MapStage"]["properties"]
    assert "schema_" not in json.dumps(defs)


def test_the_schema_accepts_a_valid_chain_and_rejects_an_unknown_key() -> None:
    validator = Draft202012Validator(chain_json_schema())
    assert list(validator.iter_errors(yaml.safe_load(EXAMPLE))) == []
    bad = yaml.safe_load((BAD / "unknown_key.yaml").read_text(encoding="utf-8"))
    assert list(validator.iter_errors(bad))
