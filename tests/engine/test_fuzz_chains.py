"""Fuzzed chain YAML through the loader and ``stagecast validate``: never a traceback, and every
problem names ``file:line:col``.

The mutations start from the shipped chains: keys deleted, duplicated and retyped, values nested
deep, YAML anchors that expand exponentially ("billion laughs"), ``!!python/object`` tags, huge
numbers, tabs, binary junk, truncation. ``STAGECAST_FUZZ_EXAMPLES`` sets the examples per test
(120 by default, so CI stays fast; e.g. 5000 for a deep local run).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagecast.engine.loading import validate_chain_file
from stagecast.engine.resources import SHIPPED_CHAINS

EXAMPLES = int(os.environ.get("STAGECAST_FUZZ_EXAMPLES", "120"))
SHIPPED = {p.name: p.read_text(encoding="utf-8") for p in sorted(SHIPPED_CHAINS.glob("*.yaml"))}
PLACE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): ")

JUNK_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    10**30,
    1e308,
    float("inf"),
    float("nan"),
    "",
    "x" * 5000,
    "{{",
    "{% for %}",
    "\u202e\u0000",
    [],
    [[[[[[[[]]]]]]]],
    {},
    {"kind": "nope"},
    {"id": "x", "kind": "llm"},
    ["a", {"b": [1, 2, {"c": None}]}],
]

TEXT_JUNK = [
    "!!python/object/apply:os.system ['echo pwned']",
    "!!python/name:os.system",
    "!!binary aGVsbG8=",
    "&a [*a]",
    "*undefined_alias",
    "\t",
    "\x00",
    "\x1b[31m",
    "\ufeff",
    "\ud800",
    "'unterminated",
    '"\\q"',
    "{ a: 1, a: 2 }",
    "? [complex, key]\n: value",
    "[" * 300 + "]" * 300,
    "1" * 400,
    "!!float 1e99999",
    "<<: *nothing",
]


def _bomb(levels: int = 9) -> str:
    lines = ['x0: &x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"x{i}: &x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]")
    return "\n".join(lines)


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(data, dict):
        for key, value in data.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            out += _paths(value, (*prefix, index))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def mutate_data(text: str, rnd: random.Random) -> str:
    data = yaml.safe_load(text)
    for _ in range(rnd.randint(1, 4)):
        paths = [p for p in _paths(data) if p]
        path = rnd.choice(paths)
        parent, key = _parent(data, path), path[-1]
        action = rnd.choice(["delete", "retype", "nest", "rename", "copy"])
        if action == "delete":
            del parent[key]
        elif action == "retype":
            parent[key] = rnd.choice(JUNK_VALUES)
        elif action == "nest":
            value = parent[key]
            for _ in range(rnd.choice([2, 10, 70])):
                value = [value] if rnd.random() < 0.5 else {"k": value}
            parent[key] = value
        elif action == "rename" and isinstance(parent, dict):
            parent[str(key) + rnd.choice(["s", "_", "X", ""])] = parent.pop(key)
        elif action == "copy" and isinstance(parent, list):
            parent.append(parent[key])
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def mutate_text(text: str, rnd: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    for _ in range(rnd.randint(1, 3)):
        action = rnd.choice(["junk", "dup", "drop", "truncate", "bomb", "indent"])
        index = rnd.randrange(len(lines)) if lines else 0
        if action == "junk" and lines:
            line = lines[index]
            cut = rnd.randrange(len(line) + 1)
            lines[index] = line[:cut] + rnd.choice(TEXT_JUNK) + line[cut:]
        elif action == "dup" and lines:
            lines.insert(index, lines[index])
        elif action == "drop" and lines:
            del lines[index]
        elif action == "truncate":
            joined = "".join(lines)
            lines = [joined[: rnd.randrange(len(joined) + 1)]]
        elif action == "bomb":
            lines.insert(0, _bomb(rnd.choice([4, 9])) + "\n")
            lines.append("outputs: {boom: *x" + str(len(_bomb().splitlines()) - 1) + "}\n")
        elif action == "indent" and lines:
            lines[index] = rnd.choice(["\t", "  ", " "]) + lines[index]
    return "".join(lines)


def mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    junk = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
    cut = rnd.randrange(len(data) + 1)
    return data[:cut] + junk + data[cut:]


def mutated(seed: int) -> bytes:
    rnd = random.Random(seed)
    text = SHIPPED[rnd.choice(sorted(SHIPPED))]
    kind = rnd.choice(["data", "text", "text", "bytes", "both"])
    if kind in ("data", "both"):
        text = mutate_data(text, rnd)
    if kind in ("text", "both"):
        text = mutate_text(text, rnd)
    data = text.encode("utf-8", "surrogatepass")
    return mutate_bytes(data, rnd) if kind == "bytes" else data


def check_problems(path: Path) -> list[str]:
    started = time.monotonic()
    problems = validate_chain_file(path)  # must not raise, whatever the bytes
    assert time.monotonic() - started < 5, "validation took too long"
    for problem in problems:
        text = str(problem)
        match = PLACE.match(text)
        assert match, f"no file:line:col in {text!r}"
        assert match["file"] == str(path)
        assert int(match["line"]) >= 1 and int(match["col"]) >= 1
        assert "Traceback" not in text
    return [str(p) for p in problems]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(seed=st.integers(min_value=0, max_value=2**32))
def test_mutated_chains_give_located_problems_never_a_traceback(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "chain.yaml"
    path.write_bytes(mutated(seed))
    check_problems(path)


def test_each_kind_of_abuse_is_reported_at_its_line(tmp_path: Path) -> None:
    base = SHIPPED["advanced_summary.yaml"]
    cases = {
        "bomb": _bomb() + "\n" + base + "outputs: {boom: *x8}\n",
        "python_tag": base.replace("version: 1", "version: !!python/object/apply:os.system [id]"),
        "tab": base.replace("  - id: sections", "\t- id: sections"),
        "nul": base.replace("title:", "ti\x00tle:"),
        "deep": "stages: " + "[" * 200 + "]" * 200 + "\n",
        "recursive": "stages: &s [*s]\n",
        "huge_number": base.replace("chunk_size: 2000", "chunk_size: " + "9" * 500),
        "text_bomb": base.replace(
            "inputs:",
            'x-pad: &a "' + "y" * 10_000 + '"\nx-more: &b [' + ", ".join(["*a"] * 300) + "]\n"
            "x-all: [" + ", ".join(["*b"] * 300) + "]\ninputs:",
        ),
    }
    found = {}
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        problems = check_problems(path)
        assert problems, name
        found[name] = problems[0].split(": ", 1)[1]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(base.encode()[:300] + b"\xff\xfe\x00junk" + base.encode()[300:])
    (problem,) = check_problems(binary)
    assert re.match(r".*binary\.yaml:\d+:\d+: the file is not UTF-8 text", problem)
    assert found["bomb"].startswith("this value stands for more than 100,000 values")
    assert found["python_tag"].startswith("invalid YAML: could not determine a constructor")
    assert found["tab"].startswith("invalid YAML: found character '\\t'")
    assert found["nul"].startswith("invalid YAML: the character U+0000 is not allowed")
    assert found["deep"].startswith("nested too deeply (more than 64 levels)")
    assert found["recursive"].startswith("a YAML alias that contains itself")
    assert "chunk_size" in found["huge_number"]
    assert found["text_bomb"].startswith("this value stands for more than 10,000,000 characters")


def test_stagecast_validate_reports_a_folder_of_mutants_without_a_traceback(
    tmp_path: Path,
) -> None:
    for seed in range(40):
        (tmp_path / f"m{seed:02d}.yaml").write_bytes(mutated(10_000 + seed))
    result = subprocess.run(
        [sys.executable, "-m", "stagecast.api.cli", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for line in result.stdout.splitlines():
        if line.startswith("  hint: ") or line.endswith(": ok"):
            continue
        assert PLACE.match(line) or line.startswith("  "), f"unlocated: {line!r}"
    assert re.search(r"\d+ problems? in \d+ files?", result.stderr)
