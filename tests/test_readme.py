"""The README's two commands are the contract with a new user; CI must run exactly the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _code_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_the_readme_starts_with_the_two_commands() -> None:
    blocks = _code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    main, tests = blocks[0], blocks[1]
    assert main.startswith("pip install -e . && stagecast run ")
    assert tests == "pip install -e '.[test]' && sh tests/setup.sh && pytest"


def test_ci_builds_a_fresh_venv_then_runs_the_readme_test_command_word_for_word() -> None:
    tests = _code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[1]
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in script.splitlines() if line.strip()]
    commands = [line for line in lines if not line.startswith("#")]
    assert commands[-1] == tests  # the last thing CI does is the README's command
    venv_at = next(i for i, line in enumerate(commands) if "-m venv" in line)
    activate_at = next(i for i, line in enumerate(commands) if "/bin/activate" in line)
    assert venv_at < activate_at < len(commands) - 1
    assert "mktemp" in script  # a new venv each run, outside whatever the machine has


def test_links_in_the_docs_stay_inside_the_repo() -> None:
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "engine").glob("*.py")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, path
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (path.parent / target).exists(), f"{path.name}: broken link {target}"
