"""Each validation problem, as the exact line a chain author sees (file:line:col: key: problem)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stagecast.engine.errors import ChainSpecError
from stagecast.engine.loading import load_chain, validate_chain_file

BAD = Path(__file__).parent / "chains_bad"
MODELS = ["default", "gpt-4o"]

CASES: dict[str, list[str]] = {
    "unknown_key": [
        "{f}:4:5: stages[draft].modle: unknown key\n  hint: did you mean 'model'?",
    ],
    "wrong_type": [
        "{f}:4:18: stages[draft].temperature: should be a valid number, "
        "unable to parse string as a number, got 'hot'",
    ],
    "unknown_kind": [
        "{f}:3:11: stages[draft].kind: unknown stage kind 'lml'\n"
        "  hint: did you mean 'llm'? its other keys were checked as llm; "
        "kinds are: llm, map, split, template, retrieve, input",
    ],
    "unknown_kind_hides_nothing": [
        "{f}:3:11: stages[draft].kind: unknown stage kind 'lml'\n"
        "  hint: did you mean 'llm'? its other keys were checked as llm; "
        "kinds are: llm, map, split, template, retrieve, input",
        "{f}:4:29: stages[draft].prompt: no input 'topic'; the chain declares no inputs\n"
        "  hint: declare it under `inputs:`",
        "{f}:5:18: stages[draft].temperature: should be a valid number, "
        "unable to parse string as a number, got 'hot'",
        "{f}:6:5: stages[draft].modle: unknown key\n  hint: did you mean 'model'?",
        "{f}:8:11: stages[fan].kind: unknown stage kind 'fanout'\n"
        "  hint: its other keys were checked as map; "
        "kinds are: llm, map, split, template, retrieve, input",
        "{f}:10:18: stages[fan].concurrency: should be greater than or equal to 1, got 0",
        "{f}:11:19: stages[fan].stage.kind: unknown stage kind 'tmplate'\n"
        "  hint: did you mean 'template'? its other keys were checked as template; "
        "kinds are: llm, map, split, template, retrieve, input",
        "{f}:11:56: stages[fan].stage.weight: should be greater than 0, got -1",
        "{f}:16:25: stages[seq].stages[0].kind: unknown stage kind 'inptu'\n"
        "  hint: did you mean 'input'? its other keys were checked as input; "
        "kinds are: llm, map, split, template, retrieve, input",
        "{f}:16:54: stages[seq].stages[0].bogus: unknown key\n"
        "  hint: keys here are: id, label, weight, when, needs, timeout, retries, kind, prompt, "
        "schema, default",
    ],
    "duplicate_ids": [
        "{f}:5:9: stages[1].id: duplicate stage id 'draft' (first at line 2)\n"
        "  hint: stage ids must be unique; rename one of them",
    ],
    "bad_id": [
        "{f}:2:9: stages[0].id: bad stage id 'Draft-1'\n"
        "  hint: use lowercase letters, digits and `_`, not starting with a digit",
    ],
    "missing_id": [
        "{f}:5:5: stages[1]: a top-level stage needs an id\n"
        "  hint: add `id: <name>`; other stages read its output as `stages.<name>.output`",
    ],
    "unknown_stage": [  # line 10 = the `|` line (7) + the template's own line (3)
        "{f}:10:10: stages[draft].prompt: no stage 'outlin'; stages are: outline, draft\n"
        "  hint: did you mean 'outline'?",
    ],
    "unknown_input": [
        "{f}:6:28: stages[draft].prompt: no input 'documnt'; inputs are: document\n"
        "  hint: did you mean 'document'?",
    ],
    "unknown_refs": [
        "{f}:7:15: stages[each].over: no stage 'sectons'; stages are: sections, each\n"
        "  hint: did you mean 'sections'?",
        "{f}:8:15: stages[each].when: no stage 'nope'; stages are: sections, each",
        "{f}:9:23: stages[each].needs[1]: no stage 'outlin'; stages are: sections, each",
    ],
    "nested_ref": [
        "{f}:14:15: stages[merge].text: no stage 'summary'; stages are: sections, each, merge\n"
        "  hint: 'summary' runs inside map 'each'; read its results as `stages.each.output`",
    ],
    "cycle": [
        "{f}:4:15: stages[a].text: cycle: a -> b -> c -> a\n"
        "  hint: a stage cannot wait for a stage that waits for it; remove one reference "
        "or `needs` entry",
    ],
    "undeclared": [
        "{f}:13:37: stages[each].stage.prompt.user: unknown variable 'sectoin'\n"
        "  hint: did you mean 'section'? templates can read: inputs, stages, earlier, index, "
        "section",
    ],
    "jinja_syntax": [  # line 7 = the `|` line (4) + the template's own line (3)
        "{f}:7:7: stages[draft].prompt: template syntax error: unexpected '}}'",
    ],
    "unknown_model": [
        "{f}:2:10: defaults.model: unknown model 'defualt'\n"
        "  hint: did you mean 'default'? models are: default, gpt-4o",
        "{f}:6:12: stages[draft].model: unknown model 'gpt-5-turbo'\n"
        "  hint: models are: default, gpt-4o",
    ],
    "map_without_stage": [
        "{f}:5:5: stages[each]: a map needs a nested `stage` to run per item (or `stages`, a "
        "sequence)\n"
        '  hint: add e.g. `stage: {{kind: llm, prompt: "{{{{ item }}}}"}}`',
    ],
    "map_stages": [
        "{f}:9:5: stages[interview].stages: a map has either `stage` or `stages`, not both\n"
        "  hint: keep `stages` (run one after another per item) or `stage`",
        "{f}:12:49: stages[interview].stages[0].prompt: no stage 'judge'; stages are: topics, "
        "interview\n"
        "  hint: 'judge' comes later in map 'interview': a stage of a map's `stages` reads only "
        "the stages before it",
        "{f}:14:18: stages[interview].stages[0].default: the default does not match `schema`: "
        "'three' is not of type 'integer'",
        "{f}:15:9: stages[interview].stages[1]: a stage in a map's `stages` needs an id\n"
        "  hint: the stages after it read its output as `stages.<id>.output`",
        "{f}:17:13: stages[interview].stages[2].id: 'topics' is already a top-level stage id\n"
        "  hint: ids in a map's `stages` must differ from the top-level ones",
    ],
    "unknown_collection": [
        "{f}:5:17: stages[by_name].collection: unknown collection 'smaple': not a name in "
        "configs/collections.yaml and no folder {d}/smaple\n"
        "  hint: did you mean 'sample'? collections are: sample; or give a folder relative to "
        "the chain file",
        "{f}:9:17: stages[by_folder].collection: collection 'no/such/folder': "
        "{d}/no/such/folder: no such folder\n"
        "  hint: collections are: sample",
        "{f}:13:17: stages[a_file].collection: collection 'unknown_collection.yaml': "
        "{d}/unknown_collection.yaml: not a folder\n"
        "  hint: collections are: sample",
    ],
    "overlap": [
        "{f}:6:14: stages[sections].overlap: overlap (500) must be smaller than chunk_size (500)",
    ],
    "bad_json_schema": [
        "{f}:8:21: stages[facts].schema.items.type: not a valid JSON Schema: "
        "'strnig' is not valid under any of the given schemas",
    ],
    "schema_with_text": [
        "{f}:5:5: stages[facts].schema: `schema` is ignored because `output` is text\n"
        "  hint: add `output: json`, or remove `schema`",
    ],
    "input_default": [
        "{f}:2:37: inputs.bullets.default: default 'five' is not an integer "
        "(the input's type is integer)",
        "{f}:3:37: inputs.language.default: default 'de' is not one of the enum values",
        "{f}:4:36: inputs.strict.default: default 1 is not true or false "
        "(the input's type is boolean)",
    ],
    "prompt_type": [
        "{f}:4:13: stages[draft].prompt: expected a string, a mapping or a list, got 42",
        "{f}:8:7: stages[polish].prompt: missing required key 'user'",
    ],
    "when_not_expression": [
        "{f}:7:11: stages[draft].when: `when` must be one {{{{ expression }}}} whose value is "
        'true or false\n  hint: e.g. `when: "{{{{ inputs.bullets > 3 }}}}"`',
    ],
    "duplicate_key": [
        "{f}:5:5: stages[draft].text: duplicate key (first at line 4)\n"
        "  hint: remove one of them; YAML would silently keep the last",
    ],
    "yaml_syntax": [
        "{f}:6:1: invalid YAML: found unexpected end of stream\n"
        "  hint: while scanning a quoted scalar (line 4)",
    ],
    "top_list": [
        "{f}:1:1: the top level must be a mapping (id, inputs, stages, …), not a list\n"
        "  hint: start the file with keys such as `id:` and `stages:`",
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_problem_message(name: str) -> None:
    path = BAD / f"{name}.yaml"
    problems = validate_chain_file(path, model_names=MODELS)
    assert [str(p) for p in problems] == [
        line.format(f=path, d=path.parent) for line in CASES[name]
    ]


def test_every_fixture_has_a_case() -> None:
    fixtures = {p.stem for p in BAD.glob("*.yaml")} - {"many"}
    assert fixtures == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_chain_raises_the_same_problems(name: str) -> None:
    path = BAD / f"{name}.yaml"
    with pytest.raises(ChainSpecError) as info:
        load_chain(path, model_names=MODELS)
    assert info.value.problems == validate_chain_file(path, model_names=MODELS)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)


def test_every_problem_at_once_in_line_order() -> None:
    path = BAD / "many.yaml"
    problems = validate_chain_file(path)
    assert [str(p) for p in problems] == [
        f"{path}:7:5: stages[0].modle: unknown key\n  hint: did you mean 'model'?",
        f"{path}:8:25: stages[0].prompt: no input 'topik'; inputs are: topic\n"
        "  hint: did you mean 'topic'?",
        f"{path}:9:9: stages[1].id: duplicate stage id 'outline' (first at line 5)\n"
        "  hint: stage ids must be unique; rename one of them",
        f"{path}:11:11: stages[1].text: template syntax error: unexpected '}}'",
        f"{path}:14:18: stages[draft].temperature: should be less than or equal to 2, got 9",
        f"{path}:17:10: stages[draft].prompt: no stage 'outlnie'; stages are: outline, draft\n"
        "  hint: did you mean 'outline'?",
    ]
    assert [p.line for p in problems] == sorted(p.line or 0 for p in problems)


def test_problem_attributes_for_the_api() -> None:
    path = BAD / "unknown_key.yaml"
    (problem,) = validate_chain_file(path)
    assert (problem.file, problem.line, problem.col) == (str(path), 4, 5)
    assert (problem.key, problem.problem) == ("stages[draft].modle", "unknown key")
    assert problem.hint == "did you mean 'model'?"


def test_models_are_not_checked_without_model_names() -> None:
    assert validate_chain_file(BAD / "unknown_model.yaml") == []
