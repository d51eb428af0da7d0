"""``stagecast run`` with input stages: answers from a file, a clear failure when nothing can
answer, a terminal session driven through a pty (a wrong answer is asked again), and
``--server`` answering through the API."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from stagecast.engine.events import InputRequired, RunEnded, StageEnded
from stagecast.engine.resources import SHIPPED_CHAINS
from tests.api.test_cli import ROOT, _env, _free_port, cli, parse_stream

QUIZ = str(Path(__file__).parent / "cli_chains" / "quiz.yaml")
EXAMPLES = SHIPPED_CHAINS / "examples"
INTERVIEW_INPUTS = str(EXAMPLES / "mock_interview.json")
INTERVIEW_ANSWERS = str(EXAMPLES / "mock_interview.answers.json")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\r")


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_an_answers_file_answers_every_input_stage(tmp_path: Path) -> None:
    answers = write(tmp_path, {"name": "Ada", "points": {"count": 4}})
    result = cli("run", QUIZ, "--answers", answers, "--events")
    assert result.returncode == 0, result.stderr
    events = parse_stream(result.stdout)
    asked = [e for e in events if isinstance(e, InputRequired)]
    assert [(e.stage, e.prompt) for e in asked] == [
        ("name", "What is your **name**?"),
        ("points", "How many points?"),
    ]
    end = events[-1]
    assert isinstance(end, RunEnded) and end.outputs == {"output": "Thanks Ada: 4 points"}


def test_the_interview_runs_from_an_answers_file_with_a_list_for_the_map_items() -> None:
    args = ["--inputs", INTERVIEW_INPUTS, "--answers", INTERVIEW_ANSWERS, "--model", "offline"]
    result = cli("run", "mock_interview", *args, "--events")
    assert result.returncode == 0, result.stderr
    events = parse_stream(result.stdout)
    given = json.loads(Path(INTERVIEW_ANSWERS).read_text(encoding="utf-8"))["answer"]
    taken = [
        e.output for e in events if isinstance(e, StageEnded) and e.path and e.path[-1] == "answer"
    ]
    assert taken == given
    assert [e.path for e in events if isinstance(e, InputRequired)] == [
        ["interview", i, "answer"] for i in range(3)
    ]


def test_with_events_and_no_answers_file_the_run_fails_instead_of_waiting() -> None:
    result = cli("run", QUIZ, "--events")
    assert result.returncode == 1
    events = parse_stream(result.stdout)
    assert [e.type for e in events][-3:] == ["input-required", "stage-end", "run-end"]
    assert result.stderr == (
        "error: run failed: name: no answer: --events is on (stdout is NDJSON); give the "
        "answers with --answers FILE.json\n"
    )


def test_answers_file_problems_are_named(tmp_path: Path) -> None:
    too_few = write(tmp_path, {"answer": ["only one"]})
    args = ["--inputs", INTERVIEW_INPUTS, "--model", "offline", "--events"]
    result = cli("run", "mock_interview", *args, "--answers", too_few)
    assert result.returncode == 1
    assert result.stderr == (
        f"error: run failed: interview: item 1: answer: --answers {too_few} has 1 answer for "
        "'answer'; item 1 (counting from 0) needs one more\n"
    )
    refused = write(tmp_path, {"name": "Ada", "points": {"count": 99}})
    result = cli("run", QUIZ, "--answers", refused, "--events")
    assert result.returncode == 1
    assert result.stderr == (
        f"error: run failed: points: the answer in --answers {refused} was refused: "
        "value.count: at most 10\n"
    )
    missing = write(tmp_path, {"nme": "Ada"})
    result = cli("run", QUIZ, "--answers", missing, "--events")
    assert result.stderr == (
        f"error: run failed: name: no answer for 'name' in --answers {missing} (it has: nme)\n"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    result = cli("run", QUIZ, "--answers", str(broken))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: --answers {broken}: not valid JSON (")


class Terminal:
    """``stagecast`` in a pseudo-terminal: what a person sees, and what they type."""

    def __init__(self, *args: str) -> None:
        master, slave = pty.openpty()
        env = _env(TERM="xterm-256color", COLUMNS="100", LINES="40")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stagecast.api.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.raw = b""
        self.seen = 0  # how far ``expect`` has read

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self.master, 65536)
            except OSError:  # the child closed the terminal
                time.sleep(timeout)

    def expect(self, wanted: str, timeout: float = 20.0) -> str:
        """Wait until ``wanted`` appears after what was already matched; the text before it."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.text.find(wanted, self.seen)
            if at >= 0:
                before = self.text[self.seen : at]
                self.seen = at + len(wanted)
                return before
            if time.monotonic() > deadline:
                raise AssertionError(f"{wanted!r} not shown; the terminal shows:\n{self.text}")
            self._read(0.05)

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\r").encode())

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running; the terminal shows:\n{self.text}")
            self._read(0.05)
        for _ in range(20):  # what is left in the terminal's buffer
            self._read(0.01)
        os.close(self.master)
        return self.proc.returncode


def test_a_terminal_session_asks_shows_the_constraints_and_asks_again_on_a_wrong_answer() -> None:
    term = Terminal("run", QUIZ)
    term.expect("input · name")
    term.expect("What is your name?")
    term.expect("(text, 1 to 40 characters): ")
    term.type("Ada")
    term.expect("input · points")
    term.expect("How many points?")
    term.expect("Points (a whole number from 1 to 10): ")
    term.type("11")
    term.expect("note (text, at most 100 characters; optional, Enter skips): ")
    term.type("")
    term.expect("value.count: at most 10")
    term.expect("please answer again")
    term.expect("Points (a whole number from 1 to 10): ")
    term.type("3")
    term.expect("note (text, at most 100 characters; optional, Enter skips): ")
    term.type("well done")
    term.expect("Thanks Ada: 3 points")
    assert term.wait() == 0


def test_an_interview_is_held_end_to_end_on_the_terminal() -> None:
    term = Terminal("run", "mock_interview", "--inputs", INTERVIEW_INPUTS, "-i", "num_questions=2")
    for turn in range(2):
        term.expect(f"input · interview[{turn}].answer")
        term.expect("Your answer (text, 1 to 20000 characters) — finish with an empty line:")
        term.type(f"My answer {turn}, first line.")
        term.type("And a second line.")
        term.type("")
    term.expect("scorecard")
    term.expect("Technical depth")
    term.expect("report")
    assert term.wait() == 0
    assert "Your answer" not in term.text[term.seen :]  # asked exactly twice


def test_ctrl_c_while_a_question_waits_cancels_the_run_and_exits_130() -> None:
    term = Terminal("run", QUIZ)
    term.expect("(text, 1 to 40 characters): ")
    os.killpg(term.proc.pid, signal.SIGINT)
    assert term.wait() == 130


# -- run --server: answered through POST /v1/runs/{id}/input -----------------------------------


def test_run_against_a_server_answers_through_the_api(tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "stagecast.api.cli", "serve", "--port", str(port)]
    server = subprocess.Popen(
        serve,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=_env(STAGECAST_CHAINS_DIR=str(Path(QUIZ).parent)),
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        answers = write(tmp_path, {"name": "Bo", "points": {"count": 2}})
        result = cli("run", "quiz", "--server", url, "--answers", answers, "--events")
        assert result.returncode == 0, result.stderr
        events = parse_stream(result.stdout)
        assert events[-1].outputs == {"output": "Thanks Bo: 2 points"}  # type: ignore[union-attr]
        refused = write(tmp_path, {"name": "Bo", "points": {"count": 0}})
        result = cli("run", "quiz", "--server", url, "--answers", refused, "--events")
        assert result.returncode == 1
        assert result.stderr == (
            f"error: the answer in --answers {refused} was refused: value.count: at least 1\n"
        )
        assert parse_stream(result.stdout)[-1].status == "cancelled"  # type: ignore[union-attr]
        term = Terminal("run", "quiz", "--server", url)
        term.expect("(text, 1 to 40 characters): ")
        term.type("Cy")
        term.expect("Points (a whole number from 1 to 10): ")
        term.type("0")
        term.expect("Enter skips): ")
        term.type("")
        term.expect("value.count: at least 1")  # the server's 422, shown at its field
        term.expect("Points (a whole number from 1 to 10): ")
        term.type("5")
        term.expect("Enter skips): ")
        term.type("")
        term.expect("Thanks Cy: 5 points")
        assert term.wait() == 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
