"""``stagecast``: validate, run, dry-run and draw chains from a terminal.

Exit codes: 0 the run succeeded (or every file is valid); 1 the run failed, or a chain has
problems; 2 bad usage or input (unknown chain, unknown model, bad ``-i``); 130 cancelled (Ctrl-C:
the run is cancelled cleanly and still ends with run-end ``cancelled``).

``--events`` prints exactly ``stagecast.engine.events.event_to_json`` per line on stdout and
nothing else; every diagnostic goes to stderr. Without a terminal on stdout ``run`` prints a plain
log instead of the live view.

The CLI is the outer layer: it imports the engine and the server (``serve``, ``--server``) with
plain imports. The server modules are imported inside those commands only so that ``run`` and
``validate`` start fast; nothing here is hidden from the type checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from stagecast.api.answering import Answerer, AnswersFile, Ask, NoAnswer, TerminalAsker
from stagecast.api.live import EventsView, LiveView, PlainView, View
from stagecast.engine.asking import AnswerRefused, NotWaiting, PendingInput
from stagecast.engine.chain import Chain
from stagecast.engine.errors import ChainSpecError, InputError, ModelConfigError, Problem
from stagecast.engine.events import (
    InputRequired,
    RunEnded,
    RunEvent,
    event_to_json,
    events_json_schema_text,
)
from stagecast.engine.graph import chain_mermaid
from stagecast.engine.loading import find_chain, load_chain, validate_chain_file
from stagecast.engine.model_config import load_models_config
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.providers import ModelRegistry, describe_models
from stagecast.engine.resources import chain_dirs, chain_files, data_glob, data_path
from stagecast.engine.reuse import Recording, RecordingError, Reuse, ReuseError
from stagecast.engine.spec import InputSpec
from stagecast.engine.validation import chain_json_schema_text

if TYPE_CHECKING:
    from collections.abc import Coroutine

__all__ = ["app", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
Sink = Callable[[RunEvent], None]

app = typer.Typer(
    name="stagecast",
    help="Run multi-step LLM prompt chains declared in YAML, stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from stagecast.api.app import API_VERSION
    from stagecast.engine.events import PROTOCOL_VERSION

    try:
        package = version("stagecast")
    except PackageNotFoundError:  # a source tree that was never installed
        package = "(not installed)"
    print(f"stagecast {package} (event protocol v{PROTOCOL_VERSION}, HTTP API {API_VERSION})")
    raise typer.Exit(EXIT_OK)


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_show_version,
            help="Print the version (package, event protocol, HTTP API) and exit.",
        ),
    ] = False,
) -> None:
    """Run multi-step LLM prompt chains declared in YAML, stage by stage."""


# -- output helpers ---------------------------------------------------------------------------


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fail(message: str, code: int = EXIT_USAGE, hint: str = "") -> NoReturn:
    _err(f"error: {message}")
    if hint:
        _err(f"  hint: {hint}")
    raise typer.Exit(code)


def _problem_lines(problem: Problem) -> str:
    """A problem with a place as ``file:line:col: key: problem``; one without, as its message."""
    if problem.line is None and not problem.key:
        where = f"{problem.file}: " if problem.file and Path(problem.file).is_file() else ""
        text = f"{where}{problem.problem}"
        return text + (f"\n  hint: {problem.hint}" if problem.hint else "")
    return str(problem)


# -- loading ----------------------------------------------------------------------------------


def _registry() -> ModelRegistry:
    try:
        return ModelRegistry(load_models_config())
    except ModelConfigError as exc:
        _fail(str(exc))


def _find(name: str) -> Path:
    try:
        return find_chain(name)
    except ChainSpecError as exc:
        for problem in exc.problems:
            _err(f"error: {_problem_lines(problem)}")
        raise typer.Exit(EXIT_USAGE) from None


def _load(path: Path, registry: ModelRegistry | None) -> Chain:
    names = registry.known_names() if registry is not None else None
    try:
        return load_chain(path, model_names=names)
    except ChainSpecError as exc:
        for problem in exc.problems:
            _err(_problem_lines(problem))
        count = len(exc.problems)
        _err(f"{path}: {count} problem{'s' if count != 1 else ''}; the chain was not run")
        raise typer.Exit(EXIT_FAILED) from None


def _read_text(path: str, what: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return data_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        _fail(f"{what}: {path}: no such file")
    except IsADirectoryError:
        _fail(f"{what}: {path}: is a directory")
    except UnicodeDecodeError:
        _fail(f"{what}: {path}: not UTF-8 text")
    except OSError as exc:
        _fail(f"{what}: {path}: {exc.strerror or exc}")


def collect_inputs(
    declared: Mapping[str, InputSpec], pairs: Iterable[str], inputs_file: Path | None
) -> dict[str, Any]:
    """The run's inputs from ``--inputs FILE.json`` then ``-i k=v`` / ``-i k=@file`` (exit 2)."""
    values: dict[str, Any] = {}
    if inputs_file is not None:
        text = _read_text(str(inputs_file), "--inputs")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            _fail(f"{inputs_file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}")
        except RecursionError:
            _fail(f"{inputs_file}: the JSON is nested too deeply")
        if not isinstance(data, dict):
            _fail(f"{inputs_file}: expected a JSON object of inputs, got {type(data).__name__}")
        values.update(data)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            _fail(f"-i {pair!r}: expected key=value or key=@file")
        value: Any = raw
        if raw.startswith("@@"):
            value = raw[1:]  # a literal value that starts with @
        elif raw.startswith("@"):
            value = _read_text(raw[1:], f"-i {key}")
        spec = declared.get(key)
        if spec is not None and spec.type in ("array", "object") and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                _fail(f"inputs.{key}: expected {spec.type} as JSON, got invalid JSON ({exc.msg})")
            except RecursionError:
                _fail(f"inputs.{key}: the JSON is nested too deeply")
        values[key] = value
    return values


# -- validate ---------------------------------------------------------------------------------


def _chain_files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in paths:
        path = data_path(name)
        if not path.exists() and any(c in name for c in "*?["):
            files.extend(data_glob(name))  # a pattern the shell left alone (no ./chains here)
            continue
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        elif path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            files.append(path)
        else:
            try:
                files.append(find_chain(name))
            except ChainSpecError:
                files.append(path)
    return files


@app.command()
def validate(
    paths: Annotated[
        list[str], typer.Argument(help="Chain files, directories of chains, or chain ids.")
    ],
) -> None:
    """Check chain files; print every problem as file:line:col: key: problem (exit 1 if any)."""
    names = _registry().known_names()
    files = _chain_files(paths)
    total = broken = 0
    for path in files:
        problems = validate_chain_file(path, model_names=names)
        if not problems:
            print(f"{path}: ok")
            continue
        broken += 1
        total += len(problems)
        for problem in problems:
            print(_problem_lines(problem))
    if not files:
        _fail("no chain files found in " + ", ".join(paths))
    if total:
        _err(
            f"{total} problem{'s' if total != 1 else ''} in {broken} "
            f"file{'s' if broken != 1 else ''}"
        )
        raise typer.Exit(EXIT_FAILED)


# -- run / dry-run ----------------------------------------------------------------------------

ChainArg = Annotated[
    str, typer.Argument(metavar="CHAIN", help="A chain file, or the id of a chain in chains/.")
]
InputOpt = Annotated[
    list[str] | None,
    typer.Option(
        "-i",
        "--input",
        metavar="KEY=VALUE",
        help="An input: key=value, or key=@file to read the value from a file (@- is stdin).",
    ),
]
InputsFileOpt = Annotated[
    Path | None,
    typer.Option("--inputs", metavar="FILE.json", help="Inputs as a JSON object file."),
]
EventsOpt = Annotated[
    bool,
    typer.Option("--events", help="Print the events as NDJSON on stdout, and nothing else."),
]
CoalesceOpt = Annotated[
    float,
    typer.Option("--coalesce-ms", min=0, metavar="N", help="Merge tokens arriving within N ms."),
]
RecordOpt = Annotated[
    Path | None,
    typer.Option(
        "--record",
        metavar="FILE.ndjson",
        help="Also write the events to FILE (the --events stream: a recording; holds the inputs).",
    ),
]
ReuseOpt = Annotated[
    Path | None,
    typer.Option(
        "--reuse",
        metavar="FILE.ndjson",
        help="Reuse the unchanged succeeded stages of this recording (its inputs are defaults).",
    ),
]
FromOpt = Annotated[
    str | None,
    typer.Option("--from", metavar="STAGE", help="With --reuse: run STAGE and its dependents."),
]
AnswersOpt = Annotated[
    Path | None,
    typer.Option(
        "--answers",
        metavar="FILE.json",
        help="Answers to the chain's input stages, by stage id (a list for map items); "
        "without it they are asked on the terminal.",
    ),
]


@app.command()
def run(
    chain: ChainArg,
    input: InputOpt = None,
    inputs: InputsFileOpt = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="A model name from configs/models.yaml."),
    ] = None,
    events: EventsOpt = False,
    coalesce_ms: CoalesceOpt = 0.0,
    server: Annotated[
        str | None,
        typer.Option("--server", metavar="URL", help="Run on a Stagecast server instead."),
    ] = None,
    record: RecordOpt = None,
    reuse: ReuseOpt = None,
    from_stage: FromOpt = None,
    answers: AnswersOpt = None,
) -> None:
    """Run a chain with a live view of every stage (exit 0 succeeded, 1 failed, 130 cancelled)."""
    if from_stage is not None and reuse is None:
        _fail("--from needs --reuse FILE.ndjson (the run whose outputs to reuse)")
    if server is not None:
        if reuse is not None:
            _fail(
                "--reuse is not available with --server",
                hint='POST /v1/runs with "reuse": {"run_id" or "recording", "from"}',
            )
        _run_remote(server, chain, input or [], inputs, model, events, answers, record=record)
    _run_local(
        chain,
        input or [],
        inputs,
        model,
        events,
        coalesce_ms,
        answers,
        dry_run=False,
        record=record,
        reuse=(reuse, from_stage) if reuse is not None else None,
    )


@app.command("dry-run")
def dry_run(
    chain: ChainArg,
    input: InputOpt = None,
    inputs: InputsFileOpt = None,
    events: EventsOpt = False,
    coalesce_ms: CoalesceOpt = 0.0,
    answers: AnswersOpt = None,
) -> None:
    """Run a chain on the offline model and print each stage's rendered prompt."""
    _run_local(chain, input or [], inputs, "offline", events, coalesce_ms, answers, dry_run=True)


def _make_view(events: bool) -> View:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # a lone surrogate (a model's split emoji) becomes its JSON escape instead of a crash
        sys.stdout.reconfigure(errors="backslashreplace")
    if events:
        return EventsView(sys.stdout)
    if sys.stdout.isatty():
        from rich.console import Console

        return LiveView(Console())
    return PlainView(sys.stdout)


def _answerer(answers_file: Path | None, events: bool, view: View) -> Answerer:
    """Where the answers to input stages come from: the file, else the terminal, else none."""
    if answers_file is not None:
        try:
            return Answerer(AnswersFile(answers_file), None)
        except NoAnswer as exc:
            _fail(str(exc))
    if events:
        return Answerer(None, None, why_not="--events is on (stdout is NDJSON)")
    if not sys.stdin.isatty():
        return Answerer(None, None, why_not="stdin is not a terminal")
    if isinstance(view, LiveView):
        console = view.console
    else:
        from rich.console import Console

        console = Console(stderr=True)
    return Answerer(None, TerminalAsker(console), pause=view.pause, resume=view.resume)


def _run_local(
    chain_name: str,
    pairs: list[str],
    inputs_file: Path | None,
    model: str | None,
    events: bool,
    coalesce_ms: float,
    answers_file: Path | None,
    *,
    dry_run: bool,
    record: Path | None = None,
    reuse: tuple[Path, str | None] | None = None,
) -> NoReturn:
    path = _find(chain_name)
    registry = _registry()
    if dry_run and "offline" not in registry.config.models:
        from stagecast.engine.offline import OfflineChatModel

        registry.overrides["offline"] = OfflineChatModel()
    chain = _load(path, registry)
    values = collect_inputs(chain.spec.inputs, pairs, inputs_file)
    reusing = _load_reuse(reuse[0], reuse[1], chain) if reuse is not None else None
    view = _make_view(events)
    sink = _recording_sink(view.handle, record)
    answerer = _answerer(answers_file, events, view)
    asking: set[asyncio.Task[None]] = set()

    def on_input(pending: PendingInput) -> None:
        ask = Ask(pending.stage, pending.path, pending.prompt, pending.schema)

        async def submit(value: Any) -> dict[str, str] | None:
            try:
                chain_run.answer(pending.stage, pending.path, value)
            except AnswerRefused as exc:
                return exc.problems
            except NotWaiting:  # timed out or cancelled meanwhile
                pass
            return None

        def fail(message: str) -> None:
            with contextlib.suppress(NotWaiting):
                chain_run.fail_input(pending.stage, pending.path, message)

        task = asyncio.get_running_loop().create_task(answerer.handle(ask, submit, fail))
        asking.add(task)
        task.add_done_callback(asking.discard)

    try:
        chain_run = ChainRun(
            chain,
            values,
            models=registry,
            model=model,
            sink=sink,
            coalesce_ms=coalesce_ms,
            on_prompt=view.prompt if dry_run else None,
            reuse=reusing,
            on_input=on_input,
        )
    except InputError as exc:
        for key, problem in exc.errors.items():
            _err(f"error: inputs.{key}: {problem}")
        raise typer.Exit(EXIT_USAGE) from None
    except ModelConfigError as exc:
        _fail(str(exc))
    view.on_broken = chain_run.cancel

    async def execute() -> RunEnded:
        try:
            return await chain_run.execute()
        finally:
            for task in list(asking):
                task.cancel()
            await registry.aclose()  # the models' HTTP connections, in the loop that opened them

    try:
        end = asyncio.run(_drive(execute(), chain_run.cancel, view))
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        with contextlib.suppress(Exception):
            view.finish(None)
        raise typer.Exit(EXIT_CANCELLED) from None
    _exit_for(end, view, events)


async def _drive(
    execute: Coroutine[Any, Any, RunEnded | None], cancel: Callable[[], None], view: View
) -> RunEnded | None:
    """Run to the end; the first Ctrl-C (or SIGTERM) cancels cleanly: run-end ``cancelled``."""
    loop = asyncio.get_running_loop()

    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        view.note("cancelling… (Ctrl-C again to quit at once)")
        cancel()
        for sig in signals:  # a second signal takes the default way out
            loop.remove_signal_handler(sig)

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
    view.start()
    end: RunEnded | None = None
    try:
        end = await execute
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        view.finish(end)
    return end


# -- record / reuse ---------------------------------------------------------------------------


def _recording_sink(handle: Callable[[RunEvent], None], record: Path | None) -> Sink:
    """``handle``, and with ``--record FILE`` every event's wire JSON appended to FILE too."""
    if record is None:
        return handle
    try:
        out = record.open("w", encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        _fail(f"--record: {record}: {exc.strerror or exc}")

    def sink(event: RunEvent) -> None:
        handle(event)
        out.write(event_to_json(event) + "\n")
        if event.type == "run-end":
            out.close()

    return sink


def _read_recording(path: Path) -> Recording:
    try:
        return Recording.read(path)
    except RecordingError as exc:
        _fail(str(exc))


def _load_reuse(path: Path, from_stage: str | None, chain: Chain) -> Reuse:
    try:
        return Reuse(_read_recording(path), chain, from_stage)
    except ReuseError as exc:
        _fail(f"--reuse: {exc}" if from_stage is None else f"--reuse/--from: {exc}")


def _exit_for(end: RunEnded | None, view: View, events: bool) -> NoReturn:
    if view.broken:
        # stdout was closed (`| head`): say nothing more there, and do not fail at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_FAILED)
    if end is None:
        raise typer.Exit(EXIT_FAILED)
    if end.status == "succeeded":
        raise typer.Exit(EXIT_OK)
    if end.status == "cancelled":
        if events:
            _err("cancelled")
        raise typer.Exit(EXIT_CANCELLED)
    if events or not sys.stdout.isatty():
        error = end.error
        where = f"{error.stage}: " if error is not None and error.stage else ""
        _err(f"error: run failed: {where}{error.message if error else 'unknown error'}")
    raise typer.Exit(EXIT_FAILED)


def _chain_file_given(name: str) -> Path | None:
    """The chain file ``name`` names when it is a path (not a chain id), else None."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return None


def _run_remote(
    server: str,
    chain_name: str,
    pairs: list[str],
    inputs_file: Path | None,
    model: str | None,
    events: bool,
    answers_file: Path | None,
    *,
    record: Path | None = None,
) -> NoReturn:
    """``run --server URL``: the same views, fed by the HTTP client; input stages are answered
    through ``POST /v1/runs/{id}/input`` (from ``--answers`` or the terminal)."""
    from stagecast.api.client import AsyncClient, StagecastError

    declared: Mapping[str, InputSpec] = {}
    given_file = _chain_file_given(chain_name)
    chain_id = given_file.stem if given_file is not None else chain_name
    with contextlib.suppress(ChainSpecError):
        local = load_chain(find_chain(chain_name))
        declared, chain_id = local.spec.inputs, local.id
    values = collect_inputs(declared, pairs, inputs_file)
    if given_file is not None:  # the server runs its own chains: say which, never upload
        _err(
            f"note: {server} runs its own chain {chain_id!r} (by id); the file {given_file} "
            "is not sent"
        )
    view = _make_view(events)
    show = _recording_sink(view.handle, record)
    answerer = _answerer(answers_file, events, view)
    run_id: list[str] = []
    cancelled = asyncio.Event()
    unanswered: list[str] = []

    async def execute() -> RunEnded | None:
        end: RunEnded | None = None
        api_key = os.environ.get("STAGECAST_API_KEY") or None
        async with AsyncClient(server, api_key=api_key) as client:

            async def cancel_when_asked() -> None:
                await cancelled.wait()
                await client.cancel(run_id[0])

            handle = await client.start_run(chain_id, values, model=model)
            run_id.append(handle.run_id)
            loop = asyncio.get_running_loop()
            canceller = loop.create_task(cancel_when_asked())
            asking: set[asyncio.Task[None]] = set()

            def ask_for(event: InputRequired) -> None:
                where = list(event.path or [])
                ask = Ask(event.stage or "", where, event.prompt, event.schema or {})

                async def submit(value: Any) -> dict[str, str] | None:
                    try:
                        await client.answer(handle.run_id, ask.stage, ask.path, value)
                    except StagecastError as exc:
                        fields = exc.details.get("fields") if exc.status == 422 else None
                        if isinstance(fields, dict) and fields:
                            return {str(k): str(v) for k, v in fields.items()}
                        if exc.status != 409:  # 409: answered meanwhile (another viewer)
                            raise
                    return None

                def fail(message: str) -> None:  # the API cannot fail an input: cancel
                    unanswered.append(message)
                    cancelled.set()

                task = loop.create_task(answerer.handle(ask, submit, fail))
                asking.add(task)
                task.add_done_callback(asking.discard)

            try:
                async for event in client.events(handle.run_id):
                    show(event)
                    if isinstance(event, InputRequired):
                        ask_for(event)
                    elif isinstance(event, RunEnded):
                        end = event
            finally:
                canceller.cancel()
                for task in list(asking):
                    task.cancel()
        return end

    view.on_broken = cancelled.set
    try:
        end = asyncio.run(_drive(execute(), cancelled.set, view))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_CANCELLED) from None
    except StagecastError as exc:
        fields = exc.details.get("fields") if isinstance(exc.details, dict) else None
        if isinstance(fields, dict) and fields:
            for key, problem in fields.items():
                _err(f"error: {key}: {problem}")
        elif exc.code == "unknown_chain" and given_file is not None:
            _err(
                f"error: {server}: the server has no chain {chain_id!r} ({exc.message})\n"
                f"  hint: --server runs a chain of the server's chains folder by its id and "
                f"does not upload {given_file}: copy it into that folder (the server reads "
                "new files without a restart), or start the server on its folder with "
                f"`stagecast serve --chains {given_file.parent}`, or run it here without "
                "--server"
            )
        else:
            _err(f"error: {server}: {exc.message} ({exc.status} {exc.code})")
        raise typer.Exit(
            EXIT_USAGE if exc.status in (401, 403, 404, 422) else EXIT_FAILED
        ) from None
    except OSError as exc:
        _fail(f"{server}: cannot reach the server ({exc})", EXIT_FAILED)
    except Exception as exc:  # httpx errors: one line, not a traceback
        _fail(f"{server}: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if unanswered:
        for message in unanswered:
            _err(f"error: {message}")
        raise typer.Exit(EXIT_FAILED)
    _exit_for(end, view, events)


# -- replay / diff ----------------------------------------------------------------------------


@app.command()
def replay(
    recording: Annotated[
        Path, typer.Argument(metavar="FILE.ndjson", help="A recording (run --record, --events).")
    ],
    speed: Annotated[
        str,
        typer.Option("--speed", metavar="N|max", help="N times the recorded pace, or max."),
    ] = "1",
    events: EventsOpt = False,
) -> None:
    """Play a recorded run in the live view at its recorded pace (a new run id, fresh seq/ts)."""
    from stagecast.engine.replay import ReplayRun, parse_speed

    try:
        factor = parse_speed(speed)
    except ValueError as exc:
        _fail(f"--speed: {exc}")
    loaded = _read_recording(recording)
    view = _make_view(events)
    played = ReplayRun(loaded, speed=factor, sink=view.handle)
    view.on_broken = played.cancel
    try:
        end = asyncio.run(_drive(played.execute(), played.cancel, view))
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_CANCELLED) from None
    _exit_for(end, view, events)


@app.command()
def diff(
    first: Annotated[Path, typer.Argument(metavar="A.ndjson", help="The earlier recording.")],
    second: Annotated[Path, typer.Argument(metavar="B.ndjson", help="The later recording.")],
) -> None:
    """Compare two recorded runs stage by stage: status, duration, usage, output diff."""
    from stagecast.api.rundiff import diff_recordings

    sys.stdout.write(diff_recordings(_read_recording(first), _read_recording(second)))


# -- graph ------------------------------------------------------------------------------------


@app.command()
def graph(chain: ChainArg) -> None:
    """Print the chain as a Mermaid flowchart."""
    print(chain_mermaid(_load(_find(chain), None)))


# -- list / schema / models / serve -----------------------------------------------------------


def _describe_input(name: str, spec: InputSpec) -> str:
    if spec.default is None:
        return f"{name} ({spec.type}, required)"
    default = spec.default if isinstance(spec.default, str) and spec.default else None
    default = default or json.dumps(spec.default, ensure_ascii=False)
    if isinstance(default, str) and len(default) > 20:
        default = default[:17] + "…"
    return f"{name} ({spec.type}, default {default})"


@app.command("list")
def list_chains() -> None:
    """List the chains (./chains, then the shipped ones) with their inputs."""
    files = list(chain_files().values())
    if not files:
        _err("no chains in " + ", ".join(str(d) for d in chain_dirs()))
        return
    rows: list[tuple[str, str, str]] = []
    for path in files:
        try:
            chain = load_chain(path)
        except ChainSpecError as exc:
            count = len(exc.problems)
            rows.append(
                (
                    path.stem,
                    f"(invalid: {count} problem{'s' if count != 1 else ''})",
                    f"see: stagecast validate {path}",
                )
            )
            continue
        parts = [_describe_input(n, s) for n, s in chain.spec.inputs.items()]
        rows.append((chain.id, chain.title, ", ".join(parts) or "no inputs"))
    width_id = max(len(r[0]) for r in rows)
    width_title = max(len(r[1]) for r in rows)
    for chain_id, title, described in rows:
        print(f"{chain_id:<{width_id}}  {title:<{width_title}}  {described}")


@app.command()
def index(
    collection: Annotated[
        str,
        typer.Argument(
            metavar="COLLECTION",
            help="A folder of documents, or a collection name from configs/collections.yaml.",
        ),
    ],
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even when the cached index is current.")
    ] = False,
) -> None:
    """Build (or check) the BM25 retrieval index of a collection, with a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from stagecast.engine.collections import (
        CollectionError,
        collection_files,
        load_collections_config,
    )
    from stagecast.engine.retrieval import open_index

    try:
        config = load_collections_config()
        entry = config.collections.get(collection)
        if entry is not None and entry.retriever is not None:
            _fail(f"collection '{collection}' is a retriever ({entry.retriever}): nothing to index")
        folder = config.folder_of(collection) if entry is not None else None
        if entry is not None and folder is None:
            _fail(f"collection '{collection}' has no `path` in {config.file}: nothing to index")
        chunk_size, overlap = (entry.chunk_size, entry.overlap) if entry else (2000, 200)
        target = folder or Path(collection).resolve()
        collection_files(target)  # a missing folder fails before the progress bar shows
        console = Console(stderr=True)
        with Progress(
            TextColumn("[bold]indexing[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(str(target), total=None)

            def on_file(path: Path, done: int, total: int) -> None:
                progress.update(task, completed=done, total=total, description=path.name)

            built = open_index(
                target, on_file=on_file, force=force, chunk_size=chunk_size, overlap=overlap
            )
    except CollectionError as exc:
        _fail(str(exc), EXIT_FAILED)
    stats = built.stats
    assert stats is not None
    for path, why in stats.skipped:
        _err(f"warning: {path}: skipped: {why}")
    what = "built" if stats.rebuilt else "up to date"
    print(
        f"{target}: {stats.passages} passages from {stats.files} files in "
        f"{stats.seconds:.2f} s ({what}; {stats.location})"
    )


@app.command()
def schema(
    events: Annotated[
        bool, typer.Option("--events", help="The event protocol's JSON Schema instead.")
    ] = False,
    http: Annotated[
        bool, typer.Option("--http", help="The HTTP API's request and response bodies instead.")
    ] = False,
) -> None:
    """Print the chain YAML JSON Schema (or, with --events, the event union's)."""
    # the exact text of api/schema/run-events.json / chains/chain.schema.json
    if http:
        from stagecast.api.rest_schema import rest_json_schema_text

        sys.stdout.write(rest_json_schema_text())
        return
    sys.stdout.write(events_json_schema_text() if events else chain_json_schema_text())


def _model_rows(registry: ModelRegistry) -> list[tuple[str, str, str, str]]:
    """(name, what it runs, usable, notes) per model, from providers.describe_models."""
    rows = []
    for row in describe_models(registry):
        entry = registry.config.models.get(row["name"])
        model = row.get("model") or ""
        if model == "offline" or row["provider"] == "offline":
            target = "offline"
            if entry is not None and entry.delay_ms:
                target += f" ({entry.delay_ms:g} ms/token)"
        else:
            target = f"openai:{model}"
            base_url = row.get("base_url")
            if base_url and base_url != "(OpenAI)":
                target += f" at {base_url}"
        if row["provider"] == "auto":
            target = f"auto → {target}"
        usable = "yes" if row["usable"] else f"no: {row.get('why_not') or 'not usable'}"
        notes = row.get("description") or ""
        price_in, price_out = (
            row.get("price_input_per_million"),
            row.get("price_output_per_million"),
        )
        if price_in is not None:
            notes += f" (${price_in:g} in / ${price_out or 0:g} out per 1M tokens)"
        marker = " (default)" if row.get("default") else ""
        rows.append((row["name"] + marker, target, usable, notes.strip()))
    return rows


@app.command()
def models() -> None:
    """List the models of configs/models.yaml and whether each is usable (never a secret)."""
    registry = _registry()
    rows = _model_rows(registry)
    widths = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    for row in rows:
        print("  ".join(f"{row[i]:<{widths[i]}}" for i in range(3)) + f"  {row[3]}".rstrip())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    chains: Annotated[
        Path | None,
        typer.Option(
            "--chains",
            metavar="DIR",
            help="Serve the chains of this folder (instead of ./chains and the shipped ones); "
            "the setting chains_dir, $STAGECAST_CHAINS_DIR.",
        ),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(
            "--models",
            metavar="FILE",
            help="The models file (instead of configs/models.yaml); the setting models_file, "
            "$STAGECAST_MODELS_FILE.",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(min=1, help="Processes; more than 1 needs STAGECAST_EVENT_LOG=redis://..."),
    ] = 1,
    recordings: Annotated[
        Path | None,
        typer.Option(
            "--recordings",
            metavar="DIR",
            help="Serve the recordings (*.ndjson) in DIR: POST /v1/replays, reuse.recording.",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API (runs as Server-Sent Event streams)."""
    from stagecast.api.server import serve as start_server
    from stagecast.api.settings import SettingsError, load_settings

    if chains is not None and not chains.is_dir():
        _fail(f"--chains {chains}: no such folder")
    if models is not None and not models.is_file():
        _fail(f"--models {models}: no such file")
    if recordings is not None and not recordings.is_dir():
        _fail(f"--recordings {recordings}: no such folder")
    try:
        settings = load_settings(
            chains_dir=chains.resolve() if chains is not None else None,
            models_file=models.resolve() if models is not None else None,
            recordings_dir=recordings.resolve() if recordings is not None else None,
        )
    except SettingsError as exc:
        _fail(str(exc))
    if settings.chains_dir is not None:
        _err(f"serving the chains in {settings.chains_dir}")
    if workers > 1:  # each worker process reads its settings again: hand it the options
        if chains is not None:
            os.environ["STAGECAST_CHAINS_DIR"] = str(chains.resolve())
        if models is not None:
            os.environ["STAGECAST_MODELS_FILE"] = str(models.resolve())
        if recordings is not None:
            os.environ["STAGECAST_RECORDINGS_DIR"] = str(recordings.resolve())
    try:
        start_server(host=host, port=port, settings=settings, workers=workers)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


@app.command()
def worker() -> None:
    """Work queued runs of a deployment on Redis (STAGECAST_EVENT_LOG=redis://...), no HTTP."""
    from stagecast.api.worker import run_worker

    run_worker()


def main() -> None:
    """The ``stagecast`` console script."""
    app(prog_name="stagecast")


if __name__ == "__main__":
    main()
