"""Protocol invariants under parallelism, over random DAG shapes (hypothesis)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagecast.engine.chain import Chain
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.spec import ChainSpec
from tests.fakes import ScriptedChatModel


@st.composite
def dag_chains(draw: st.DrawFn) -> tuple[dict[str, Any], list[list[Any]], str | None]:
    n = draw(st.integers(1, 6))
    stages: list[dict[str, Any]] = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        refs = " ".join(f"{{{{ stages.s{d}.output | string | length }}}}" for d in sorted(deps))
        kind = draw(st.sampled_from(["llm", "llm", "map", "template"]))
        stage: dict[str, Any] = {"id": f"s{i}", "weight": draw(st.sampled_from([1, 2, 0.5]))}
        if kind == "llm":
            stage.update(kind="llm", prompt=f"p{i} {refs}", retries=1)
        elif kind == "template":
            stage.update(kind="template", text=f"t{i} {refs}")
        else:
            stage.update(
                kind="map",
                over=f"{{{{ range({draw(st.integers(0, 4))}) | list }}}}",
                concurrency=draw(st.integers(1, 3)),
                stage={"kind": "llm", "prompt": f"m{i} {{{{ item }}}} {refs}", "retries": 1},
            )
        if draw(st.booleans()) and i:
            stage["when"] = f"{{{{ {draw(st.sampled_from(['true', 'false']))} }}}}"
        stages.append(stage)
    scripts = draw(
        st.lists(
            st.lists(
                st.one_of(
                    st.sampled_from(["a", "b ", "c"]),
                    st.sampled_from([0.0, 0.001, 0.003]),
                ),
                max_size=5,
            ),
            min_size=1,
            max_size=4,
        )
    )
    fail = draw(st.sampled_from([None, None, "transient", "permanent", "cancel"]))
    return {"defaults": {"model": "fake"}, "stages": stages}, scripts, fail


def check_invariants(events: list[Any], chain: Chain) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "seq has gaps"
    assert events[0].type == "run-start"
    assert [e.type for e in events].count("run-end") == 1 and events[-1].type == "run-end"
    assert len({e.run_id for e in events}) == 1
    open_paths: dict[tuple[Any, ...], int] = {}
    ended: set[tuple[Any, ...]] = set()
    ended_ok: set[str] = set()
    last_progress = 0.0
    for e in events[1:-1]:
        path = tuple(e.path)
        if e.type == "stage-start":
            assert path not in open_paths and path not in ended, f"second start {path}"
            open_paths[path] = e.attempt
            if len(path) == 1:
                for dep in chain.deps[e.stage]:
                    assert dep in ended_ok, f"{e.stage} started before its dependency {dep}"
        elif e.type in ("token", "stage-retry", "source"):
            assert path in open_paths, f"{e.type} outside its stage {path}"
            assert e.attempt == open_paths[path], "attempt mismatch"
            if e.type == "stage-retry":
                open_paths[path] += 1
        elif e.type == "stage-progress":
            assert path in open_paths
        elif e.type == "stage-end":
            if e.status != "skipped":
                assert open_paths.pop(path) == e.attempt, f"end without start {path}"
            ended.add(path)
            if len(path) == 1 and e.status in ("succeeded", "skipped"):
                ended_ok.add(e.stage)
            assert e.progress >= last_progress - 1e-9, "progress went back"
            last_progress = e.progress
            for child in open_paths:
                assert child[: len(path)] != path, f"{path} ended before its item {child}"
    assert not open_paths, f"stages never ended: {list(open_paths)}"
    end = events[-1]
    if end.status == "succeeded":
        top_ends = [e for e in events if e.type == "stage-end" and len(e.path) == 1]
        assert len(top_ends) == len(chain.spec.stages)
        assert top_ends[-1].progress == 1.0
    else:
        assert end.error is not None or end.status == "cancelled"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(dag_chains())
def test_protocol_invariants_hold_for_random_dags(case: Any) -> None:
    spec_data, scripts, fail = case
    chain = Chain.from_spec(ChainSpec.model_validate(spec_data), id="random")
    from stagecast.engine.errors import TransientError

    if fail == "transient":
        scripts = [["x", TransientError("flaky")], *scripts]
    elif fail == "permanent":
        scripts = [*scripts, [ValueError("broken")]]
    model = ScriptedChatModel(scripts=scripts, cycle=True)

    async def main() -> list[Any]:
        events: list[Any] = []

        def sink(event: Any) -> None:
            events.append(event)
            if fail == "cancel" and len(events) == 4:
                run.cancel()  # from inside the run, between two events

        run = ChainRun(chain, {}, models={"fake": model}, sink=sink, retry_backoff=0.0)
        async with asyncio.timeout(10):
            await run.execute()
        return events

    # a fresh loop in a worker thread: independent of whatever the test runner's thread holds
    with ThreadPoolExecutor(1) as pool:
        events = pool.submit(asyncio.run, main()).result(timeout=30)
    check_invariants(events, chain)
    if fail == "cancel" and len(events) > 5:
        assert events[-1].status == "cancelled"
    assert len(model.closed) + len(model.completed) == len(model.calls)
