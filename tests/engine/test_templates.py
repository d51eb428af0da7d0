"""Bounded templates: size and work limits, and renders that never stall other runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

import anyio
import pytest

from stagecast.engine.errors import TemplateError
from stagecast.engine.events import StageEnded, Token
from stagecast.engine.orchestrator import ChainRun
from stagecast.engine.templates import (
    DEFAULT_LIMITS,
    RenderLimits,
    compile_template,
    render_async,
)
from tests.engine.test_orchestrator import chain_of, collect
from tests.fakes import ScriptedChatModel

CTX = {"inputs": {"x": "0123456789", "n": 3, "items": ["a", "b"]}}
LIMIT = "over the limit of 10,000,000 (template_max_chars)"


def render(source: str, limits: RenderLimits = DEFAULT_LIMITS) -> Any:
    return asyncio.run(render_async(compile_template(source), CTX, limits))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "{{ (inputs.x * 100000000) * 3 }}",
            "text repeated 100,000,000 times would have 1,000,000,000 characters",
        ),
        ("{{ [0] * 20000000 }}", "a list repeated 20,000,000 times would have 20,000,000 items"),
        ("{{ 9 ** 100000000 }}", "9 ** 100,000,000 would have 120,800,001 digits"),
        (
            "{% set ns = namespace(s=inputs.x) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "joined text (~) would have 10,485,760 characters",
        ),
        (
            "{% set ns = namespace(s=inputs.x) %}{% for i in range(40) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
            "a sum would have 10,485,760 characters",
        ),
        ("{{ inputs.x.ljust(1000000000) }}", "a value would have 1,000,000,000 characters"),
        ("{{ inputs.x | center(1000000000) }}", "a value would have 1,000,000,000 characters"),
        (
            "{{ (inputs.x * 1000).replace('0', inputs.x * 10000) }}",
            "a value would have 100,009,000 characters",
        ),
        (
            "{{ range(100000) | join(inputs.x * 1000) }}",
            "joined text would have 999,990,000 characters",
        ),
        (
            "{{ (inputs.x * 1000).join(range(100000) | map('string') | list) }}",
            "joined text would have 999,990,000 characters",
        ),
        (
            "{{ '%1000000000s' % inputs.x }}",
            "a formatted value would have 1,000,000,000 characters",
        ),
        (
            "{{ '{:>1000000000}'.format(inputs.x) }}",
            "a formatted value would have 1,000,000,000 characters",
        ),
        (
            "{{ ((inputs.x ~ '\n') * 100000) | indent(1000) }}",
            "indented text would have 101,101,000 characters",
        ),
        # lists that share one item many times: tiny in memory, gigabytes once serialized
        (
            "{% set x = [inputs.x * 100] * 1000 %}{% set y = [x] * 1000 %}{{ y }}",
            "a value with its nested values would have 10,001,000 characters and items",
        ),
        (
            "{% set x = [inputs.x * 100] * 1000 %}{% set y = [x] * 1000 %}{{ y | tojson }}",
            "a value with its nested values would have 10,001,000 characters and items",
        ),
        (
            "{{ ([[0] * 1000] * 10000) | sum(start=[]) | length }}",
            "a value with its nested values would have 10,001,000 characters and items",
        ),
        (
            "{% for i in range(2000) %}{{ inputs.x * 1000 }}{% endfor %}",
            "the rendered text would have 10,010,000 characters",
        ),
    ],
)
def test_a_template_that_grows_past_the_limit_fails_with_its_size(
    source: str, message: str
) -> None:
    with pytest.raises(TemplateError) as info:
        render(source)
    assert str(info.value) == f"template too large: {message}, {LIMIT}"
    assert info.value.type == "template_limit"


BYPASSES = [
    '{{ "%*s" % (3500000000, "x") }}',
    '{{ "{:>{w}}".format("a", w=1000000000) }}',
    "{{ '{x:>1000000000}'.format_map({'x': 1}) }}",
    "{{ ('a' * 5000000).translate({97: 'b' * 500}) | length }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(400) %}"
    '{% set ns.l = ns.l + ["x" * 10000000] %}{% endfor %}{{ ns.l | length }}',
    "x{{ [10**4000] * 4000000 }}",
    "{{ ([10**4000] * 4000000) | join }}",
    '{{ range(100000) | map("string") | map("center", 9999999) | map("length") | sum }}',
    "{% set ns = namespace(x=7) %}{% for i in range(60) %}{% set ns.x = ns.x * ns.x %}"
    "{% endfor %}{{ ns.x > 1 }}",
    "{{ (inputs.x * 100000000) * 3 }}",
    "{% set x = [inputs.x * 100] * 1000 %}{% set y = [x] * 1000 %}{{ y | tojson }}",
    "{{ ([[0] * 1000] * 10000) | sum(start=[]) | length }}",
]
PROBE = """
import asyncio, json, resource, sys, time
from stagecast.engine.errors import TemplateError
from stagecast.engine.templates import RenderLimits, compile_template, render_async
size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, ((size + 700 * 1024) * 1024,) * 2)  # +700 MiB at most
out = []
for source in json.loads(sys.stdin.read()):
    started = time.monotonic()
    try:
        asyncio.run(render_async(compile_template(source), {"inputs": {"x": "0123456789"}},
                                 RenderLimits(max_seconds=2)))
        result = "rendered"
    except TemplateError as exc:
        result = exc.type
    except MemoryError:
        result = "MemoryError"
    out.append([result, time.monotonic() - started])
print(json.dumps(out))
"""


def test_no_template_gets_past_the_limits_in_memory_or_time() -> None:
    # a child whose address space may grow by 700 MiB only: any attempt at gigabytes fails there
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        input=json.dumps(BYPASSES),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout)
    assert [o[0] for o in outcomes] == ["template_limit"] * len(BYPASSES), outcomes
    assert max(o[1] for o in outcomes) < 5  # the 2 s budget, and one step past it at most


def test_lipsum_is_gone_and_tilde_and_join_keep_working() -> None:
    with pytest.raises(TemplateError, match="'lipsum' is undefined"):
        render("{{ lipsum(1000000) }}")
    assert render('{{ "item " ~ inputs.n ~ "/" ~ 3 }}') == "item 3/3"
    assert render("{{ inputs['items'] | map('upper') | join(', ') }}") == "A, B"
    assert render("{{ range(3) | map('string') | join(',') }}") == "0,1,2"
    big = {"inputs": {"doc": "z" * 12_000_000}}
    template = compile_template("{{ inputs.doc | length }}")
    assert asyncio.run(render_async(template, big, DEFAULT_LIMITS)) == 12_000_000


def test_nested_loops_stop_at_the_step_limit() -> None:
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateError) as info:
        render(source, RenderLimits(max_steps=10_000))
    assert str(info.value) == "template too slow: over 10,000 steps (template_max_steps)"
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"^template too slow: over 0\.2 s"):
        render(source, RenderLimits(max_steps=10**12, max_seconds=0.2))
    assert time.monotonic() - started < 5


def test_limits_are_configurable_and_ordinary_templates_pass() -> None:
    assert render("{{ inputs.x * 3 }}") == "012345678901234567890123456789"
    assert render("{% for i in inputs['items'] %}{{ i }}-{% endfor %}") == "a-b-"
    small = RenderLimits(max_chars=25)
    assert render("{{ inputs.x }}{{ inputs.x }}", small) == "01234567890123456789"
    with pytest.raises(TemplateError) as info:
        render("{{ inputs.x }}{{ inputs.x }}{{ inputs.x }}", small)
    assert str(info.value) == (
        "template too large: the rendered text would have 30 characters, over the limit of 25 "
        "(template_max_chars)"
    )
    assert compile_template("Hello {{ inputs.x }} / {{ inputs['n'] }}").simple
    assert not compile_template("{{ inputs.x | upper }}").simple
    assert not compile_template("{% for i in inputs['items'] %}{{ i }}{% endfor %}").simple


BOMB = """
inputs:
  x: {type: string}
stages:
  - id: boom
    kind: template
    text: "{{ (inputs.x * 100000000) * 3 }}"
  - id: after
    kind: template
    text: "never {{ stages.boom.output }}"
"""


@pytest.mark.anyio
async def test_the_issue_s_bomb_fails_its_stage_with_a_clear_error_and_the_run_ends() -> None:
    events = await collect(chain_of(BOMB), {"x": "0123456789"})
    ends = [e for e in events if isinstance(e, StageEnded)]
    assert [(e.stage, e.status) for e in ends] == [("boom", "failed")]
    assert ends[0].error is not None and ends[0].error.type == "template_limit"
    assert ends[0].error.message == (
        "template too large: text repeated 100,000,000 times would have 1,000,000,000 "
        f"characters, {LIMIT}"
    )
    end = events[-1]
    assert end.type == "run-end" and end.status == "failed"
    assert end.error.stage == "boom" and end.error.message == ends[0].error.message


HEAVY = """
stages:
  - id: heavy
    kind: template
    text: "{% for i in range(1500) %}{% for j in range(1000) %}{% endfor %}{% endfor %}done"
"""

STREAM = """
defaults: {model: fake}
stages:
  - {id: talk, kind: llm, prompt: "go"}
"""


@pytest.mark.anyio
async def test_a_heavy_render_does_not_hold_up_another_run_s_tokens() -> None:
    """One run renders ~3 million template steps while another streams a token every 2 ms."""
    arrivals: list[float] = []
    heavy: dict[str, float] = {}

    def watch_heavy(event: Any) -> None:
        if event.type == "stage-start":
            heavy["start"] = time.monotonic()
        elif isinstance(event, StageEnded):
            heavy["end"] = time.monotonic()
            heavy["ok"] = float(event.status == "succeeded")

    def watch_tokens(event: Any) -> None:
        if isinstance(event, Token):
            arrivals.append(time.monotonic())

    script: list[Any] = []
    for _ in range(400):
        script += [0.002, "t"]
    model = ScriptedChatModel(scripts=[script])
    talk = ChainRun(chain_of(STREAM), {}, models={"fake": model}, sink=watch_tokens)
    work = ChainRun(chain_of(HEAVY), {}, sink=watch_heavy)
    with anyio.fail_after(60):
        talking = asyncio.ensure_future(talk.execute())
        await asyncio.sleep(0.05)  # tokens are flowing
        await work.execute()
        await talking
    assert heavy["ok"] == 1.0
    render_s = heavy["end"] - heavy["start"]
    during = [t for t in arrivals if heavy["start"] <= t <= heavy["end"]]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    print(
        f"heavy render {render_s * 1000:.0f} ms; {len(during)} tokens of the other run during "
        f"it, largest gap {max(gaps, default=0) * 1000:.1f} ms"
    )
    assert render_s > 0.2  # heavy enough to matter: inline, it would stall the loop this long
    assert len(during) >= 10
    assert max(gaps) < render_s / 4


@pytest.mark.anyio
async def test_cancelling_a_run_stops_its_render_thread() -> None:
    endless = chain_of(
        """
stages:
  - id: heavy
    kind: template
    text: "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
"""
    )
    run = ChainRun(endless, {}, render_limits=RenderLimits(max_steps=10**12, max_seconds=60))
    with anyio.fail_after(10):
        task = asyncio.ensure_future(run.execute())
        await asyncio.sleep(0.3)  # the render is running in its thread
        run.cancel()
        end = await task
    assert end.status == "cancelled"
    await asyncio.sleep(0.2)  # the thread's next step sees the stop
    cpu = time.process_time()
    await asyncio.sleep(1.0)
    assert time.process_time() - cpu < 0.3  # nothing keeps burning a core after the cancel


@pytest.mark.anyio
async def test_a_map_over_too_many_items_fails_its_stage() -> None:
    huge = chain_of(
        """
stages:
  - id: many
    kind: map
    over: "{{ [0] * 200000 }}"
    stage: {kind: template, text: "{{ item }}"}
"""
    )
    events = await collect(huge, {}, max_map_items=1000)
    ends = [e for e in events if isinstance(e, StageEnded)]
    assert [(e.stage, e.status) for e in ends] == [("many", "failed")]
    assert ends[0].error is not None and ends[0].error.type == "map_limit"
    assert (
        ends[0].error.message == "over: 200,000 items, more than the limit of 1,000 (max_map_items)"
    )


def test_null_renders_as_empty_text_never_none() -> None:
    from stagecast.engine.templates import compile_template

    mixed = compile_template("Name: {{ x }}.{% for i in items %} [{{ i }}]{% endfor %}")
    assert mixed.render({"x": None, "items": [1, None]}) == "Name: . [1] []"
    whole = compile_template("{{ x }}")
    assert whole.render({"x": None}) is None  # an expression keeps its value (over, when)
    assert whole.render_text({"x": None}) == ""
    fallback = compile_template('{{ x | default("n/a", true) }} / {{ x if x is not none else 0 }}')
    assert fallback.render({"x": None}) == "n/a / 0"
    assert compile_template("{{ x }}|{{ y }}").render({"x": 0, "y": False}) == "0|False"
