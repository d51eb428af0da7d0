"""The package as a user installs it: a wheel, installed into a new venv, run outside the checkout.

The wheel is built (``pip wheel``) from a copy of the checkout's package folders and installed
with ``--no-deps`` into a fresh venv whose only other path is this environment's site-packages
(a ``.pth`` line: the dependencies, not the editable install of Stagecast, whose finder is a
``.pth`` *file* that a plain path line does not run). Every command then runs in an empty
directory, so nothing is found through the source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


class Installed:
    def __init__(self, venv: Path, wheel: Path, workdir: Path) -> None:
        self.venv, self.wheel, self.workdir = venv, wheel, workdir
        self.bin = venv / "bin"
        self.cache = workdir.parent / "user-cache"

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "OPENAI_API_KEY", "OPENAI_BASE_URL", "STAGECAST_MODELS")
        }
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["XDG_CACHE_HOME"] = str(self.cache)
        return subprocess.run(
            list(args),
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    # build from a copy: setuptools' build/ folder in the checkout would keep stale modules
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("engine", "api", "chains", "configs"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = base.glob("stagecast-*.whl")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "_stagecast_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
        + [str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    workdir = base / "elsewhere"
    workdir.mkdir()
    return Installed(venv, wheel, workdir)


def test_the_wheel_holds_one_namespace_and_the_package_data(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"stagecast"}  # nothing generic such as engine/ or api/ in site-packages
    for expected in (
        "stagecast/engine/orchestrator.py",
        "stagecast/engine/py.typed",
        "stagecast/api/cli.py",
        "stagecast/api/static/index.html",
        "stagecast/api/static/stagecast.js",
        "stagecast/api/schema/run-events.json",
        "stagecast/chains/advanced_summary.yaml",
        "stagecast/chains/mock_interview.yaml",
        "stagecast/chains/docs_qa.yaml",
        "stagecast/chains/collections/docs_qa/thermostat-manual.pdf",
        "stagecast/chains/collections/docs_qa/support.xlsx",
        "stagecast/chains/collections/docs_qa/ko-guide.docx",
        "stagecast/chains/collections/docs_qa/refund-policy.md",
        "stagecast/chains/chain.schema.json",
        "stagecast/chains/examples/advanced_summary.json",
        "stagecast/configs/models.yaml",
        "stagecast/configs/server.yaml",
        "stagecast/configs/collections.yaml",
    ):
        assert expected in names, expected
    assert not [n for n in names if n.startswith(("stagecast/tests", "stagecast/bench"))]
    assert not [n for n in names if ".stagecast-index" in n]  # a local index cache never ships
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert "stagecast = stagecast.api.cli:main" in text


def test_the_installed_package_is_imported_from_the_venv(installed: Installed) -> None:
    probe = (
        "import stagecast.engine, stagecast.api, importlib.resources as r;"
        "print(stagecast.engine.__file__); print(r.files('stagecast.chains'))"
    )
    result = installed.run(str(installed.bin / "python"), "-c", probe)
    assert result.returncode == 0, result.stderr
    engine_file, chains = result.stdout.split()
    assert Path(engine_file).is_relative_to(installed.venv)
    assert Path(chains).is_relative_to(installed.venv)


def test_list_and_a_shipped_chain_run_outside_the_checkout(installed: Installed) -> None:
    listed = installed.run("stagecast", "list")
    assert listed.returncode == 0, listed.stderr
    ids = [line.split()[0] for line in listed.stdout.splitlines()]
    assert ids == ["advanced_summary", "docs_qa", "mock_interview"]
    # the README's command, as written: the example file is found in the package data
    ran = installed.run(
        "stagecast",
        "run",
        "advanced_summary",
        "--inputs",
        "chains/examples/advanced_summary.json",
        "--events",
    )
    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "run-start" and events[0]["model"] == "offline"
    assert events[-1]["type"] == "run-end" and events[-1]["status"] == "succeeded"
    assert events[-1]["outputs"]["summary"]


def test_docs_qa_runs_outside_the_checkout_on_its_shipped_collection(installed: Installed) -> None:
    ran = installed.run(
        "stagecast", "run", "docs_qa", "-i", "question=카카오톡 상담이 되나요?", "--events"
    )
    assert ran.returncode == 0, ran.stderr
    events = [json.loads(line) for line in ran.stdout.splitlines()]
    sources = [e["source"]["id"] for e in events if e["type"] == "source"]
    assert sources[0] == "support.xlsx#고객센터!row3"
    answer = next(e for e in events if e["type"] == "stage-end" and e["stage"] == "answer")
    assert answer["citations"][0] == {"marker": 1, "source_id": sources[0], "stage": "search"}
    indexed = installed.run("stagecast", "index", "sample")
    assert indexed.returncode == 0, indexed.stderr
    assert "30 passages from 10 files" in indexed.stdout
    # the shipped collection's index goes to the user's cache, never into site-packages
    assert not list(installed.venv.rglob(".stagecast-index"))
    assert list((installed.cache / "stagecast" / "index").glob("docs_qa-*/manifest.json"))


def _readme_commands() -> list[str]:
    """Every ``stagecast …`` line of the README's code blocks, comments stripped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if "stagecast " in command:
                lines.append(command[command.index("stagecast ") :])
    return lines


def test_every_readme_command_runs_outside_the_checkout(installed: Installed) -> None:
    (installed.workdir / "README.md").write_text(README, encoding="utf-8")  # `-i document=@…`
    ran = []
    for command in _readme_commands():
        words = command.split()
        if words[1] in ("serve", "worker") or "--server" in words:
            continue  # a server or worker runs until stopped: the next test serves for real
        if "--model" in words and words[words.index("--model") + 1] in ("ollama", "vllm"):
            continue  # needs that server (and the README says so); auto/demo/offline need none
        command = command.split(" | ")[0].split(" > ")[0]  # no jq, no writing into chains/
        result = installed.run("bash", "-c", command, timeout=300)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        ran.append(command)
    assert len(ran) >= 10, ran
    schema = installed.run("stagecast", "schema", "--events").stdout
    assert schema == (ROOT / "api" / "schema" / "run-events.json").read_text(encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(installed: Installed) -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(
        [str(installed.bin / "stagecast"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=installed.workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):  # bounded: 15 s
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the installed server did not start within 15 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_the_installed_server_serves_the_shipped_chains_and_the_demo_page(served: str) -> None:
    chains = json.loads(urllib.request.urlopen(served + "/v1/chains", timeout=5).read())
    assert sorted(c["id"] for c in chains["chains"]) == [
        "advanced_summary",
        "docs_qa",
        "mock_interview",
    ]
    page = urllib.request.urlopen(served + "/", timeout=5).read().decode()
    assert "<html" in page.lower()
    script = urllib.request.urlopen(served + "/static/stagecast.js", timeout=5).read()
    assert b"export" in script
