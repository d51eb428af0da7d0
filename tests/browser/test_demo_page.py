"""The demo page end to end: every shipped chain runs and is watched in headless Chromium.

Each test drives the page as a person would (pick a chain, fill the generated form, start) and
checks what docs/protocol.md and the demo-page issue promise: every stage row goes through its
statuses to `succeeded`, the overall bar reaches 100, tokens show while their stage runs, a reload
mid-run resumes the same run, cancel ends `cancelled`, and model output is only ever text.
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "chains" / "examples"
RUNNING_WITH_TEXT = '[data-stage][data-status="running"] .stream:not(.is-empty)'

# Records every status each stage row shows, from its first render (before the page's scripts).
RECORD_STATUSES = """
window.__statuses = {};
new MutationObserver((mutations) => {
  const note = (node) => {
    const id = node.dataset.stage, list = (window.__statuses[id] ||= []);
    if (list[list.length - 1] !== node.dataset.status) list.push(node.dataset.status);
  };
  for (const m of mutations) {
    if (m.type === "attributes" && m.target.dataset && m.target.dataset.stage) note(m.target);
    for (const added of m.addedNodes || []) {
      if (added.nodeType !== 1) continue;
      if (added.dataset.stage) note(added);
      added.querySelectorAll("[data-stage]").forEach(note);
    }
  }
}).observe(document, {subtree: true, childList: true, attributes: true,
                      attributeFilter: ["data-status"]});
"""


def open_page(page: Any, path: str = "/") -> None:
    page.add_init_script(RECORD_STATUSES)
    page.goto(path)
    page.wait_for_selector("body[data-ready]")


def choose_chain(page: Any, chain: str, first_field: str) -> None:
    page.select_option("#chain", chain)
    page.wait_for_selector(f'#run-form[data-chain="{chain}"] [data-field="{first_field}"]')


def start(page: Any, model: str) -> str:
    page.wait_for_selector("select#model")  # the server lists its models (GET /v1/models)
    page.select_option("#model", model)
    page.click("#start")
    page.wait_for_selector("#run[data-run-id], #form-error:not([hidden])")
    assert page.locator("#form-error").is_hidden(), page.locator("#form-error").inner_text()
    run_id = page.evaluate("new URLSearchParams(location.search).get('run')")
    assert run_id == page.get_attribute("#run", "data-run-id")
    page.wait_for_selector(f'#run[data-run-id="{run_id}"] [data-stage]')
    return str(run_id)


def fill_advanced_summary(page: Any) -> None:
    choose_chain(page, "advanced_summary", "document")
    example = json.loads((EXAMPLES / "advanced_summary.json").read_text(encoding="utf-8"))
    # The document comes in through the form's file picker, as a person would load it.
    page.set_input_files("#input-document-file", str(EXAMPLES / "quarterly_report.md"))
    page.wait_for_function("document.querySelector('[name=document]').value.includes('Larkspur')")
    page.fill("[name=language]", example.get("language", "en"))
    page.fill("[name=bullets]", str(example.get("bullets", 5)))


def wait_run_status(page: Any, status: str) -> None:
    page.wait_for_selector(f'#run[data-run-status="{status}"]')


def assert_all_succeeded(page: Any) -> dict[str, list[str]]:
    rows = page.eval_on_selector_all(
        "#run [data-stage]", "rows => rows.map(r => [r.dataset.stage, r.dataset.status])"
    )
    assert rows and all(status == "succeeded" for _, status in rows), rows
    overall = page.locator('#run [role="progressbar"][data-progress="overall"]')
    assert overall.get_attribute("aria-valuenow") == "100"
    assert overall.get_attribute("aria-valuemin") == "0"
    assert overall.get_attribute("aria-valuemax") == "100"
    statuses: dict[str, list[str]] = page.evaluate("window.__statuses")
    for stage, _ in rows:
        seen = statuses[stage]
        assert seen[0] == "waiting" and seen[-1] == "succeeded", (stage, seen)
        assert "running" in seen and seen.index("running") < len(seen) - 1, (stage, seen)
    return statuses


def test_advanced_summary_streams_and_finishes(page: Any, artifacts: Path) -> None:
    open_page(page)
    fill_advanced_summary(page)
    start(page, "fast")

    # Every stage of the plan is drawn at once, from run-start.
    stages = page.eval_on_selector_all("#run [data-stage]", "rs => rs.map(r => r.dataset.stage)")
    assert stages == [
        "sections",
        "section_summaries",
        "merge",
        "polish",
    ]
    # Tokens show while their stage is still running.
    page.wait_for_selector(RUNNING_WITH_TEXT)
    page.screenshot(path=str(artifacts / "advanced_summary-running-desktop.png"), full_page=True)

    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)

    # The map stage counts its items and has its own bar; each item streamed into its own place.
    fan = page.locator('[data-stage="section_summaries"]')
    assert fan.locator(".stage-count").inner_text() == "4 / 4"
    bar = fan.locator('[role="progressbar"]')
    assert bar.get_attribute("aria-valuenow") == "100"
    paths = fan.locator(".item").evaluate_all("items => items.map(i => i.dataset.path)")
    assert paths == [f"section_summaries/{i}" for i in range(4)]
    assert fan.locator('.item[data-status="succeeded"] .stream').count() == 4
    # Each item is named by its item (the section's first heading), after its number.
    heads = fan.locator(".item-head").evaluate_all(
        "hs => hs.map(h => [h.querySelector('.item-name').textContent,"
        " h.querySelector('.item-title').textContent])"
    )
    assert heads == [
        ["#1", "Larkspur Logistics — Engineering Report, Q3 2024"],
        ["#2", "2. Reliability"],
        ["#3", "3. Delivery"],
        ["#4", "5. Security and compliance"],
    ]
    # Tokens per item and per stage; the offline model has no prices, so no cost at all.
    usages = fan.locator(".item-usage").all_inner_texts()
    assert len(usages) == 4 and all(re.fullmatch(r"[\d,]+ in · [\d,]+ out", u) for u in usages)
    total = fan.locator(".stage-usage").inner_text()
    assert re.fullmatch(r"[\d,]+ in · [\d,]+ out", total), total
    assert sum(int(u.split(" in")[0].replace(",", "")) for u in usages) == int(
        total.split(" in")[0].replace(",", "")
    )
    assert page.locator('[data-stage="sections"] .stage-usage').inner_text() == ""  # no model
    # The split's chunks are sources, shown as cards under their stage, folded to their count.
    sources = page.locator('[data-stage="sections"] details.sources')
    assert sources.locator("summary").inner_text() == "4 sources"
    assert sources.get_attribute("open") is None
    cards = page.locator('[data-stage="sections"] .source')
    assert cards.count() == 4 and not cards.first.is_visible()
    sources.locator("summary").click()
    assert cards.first.locator(".source-title").inner_text() == "Section 1 of 4"
    # The JSON stage is shown readably (its fields by name), raw on demand.
    polish = page.locator('[data-stage="polish"]')
    fields = polish.locator(".json-object > dt").all_inner_texts()
    assert fields == ["Title", "Key points", "Summary"], fields
    raw = polish.locator("pre.json")
    assert raw.is_hidden()
    polish.locator('button[data-action="raw"]').click()
    assert raw.is_visible() and polish.locator(".json-pretty").is_hidden()
    polished = json.loads(raw.inner_text())
    assert polished["key_points"]
    assert polish.locator(".json-object li").all_inner_texts() == polished["key_points"]
    assert page.locator('#run .outputs [data-output="key_points"] li').count() >= 1
    assert page.locator('#run .outputs [data-output="title"]').inner_text().strip()
    page.screenshot(path=str(artifacts / "advanced_summary-desktop.png"), full_page=True)


def test_docs_qa_shows_source_cards_and_links_each_citation_to_its_card(
    page: Any, artifacts: Path
) -> None:
    open_page(page)
    choose_chain(page, "docs_qa", "question")
    page.fill("[name=question]", "Is water damage covered by the warranty?")
    start(page, "fast")
    wait_run_status(page, "succeeded")
    cards = page.locator('[data-stage="search"] .source')
    assert cards.count() == 4
    assert cards.evaluate_all("cs => cs.map(c => c.dataset.sourceId)")[:2] == [
        "warranty.docx#2",
        "warranty.docx#1",
    ]
    assert cards.first.locator(".source-number").text_content() == "[1]"
    assert cards.first.locator(".source-title").text_content() == (
        "warranty: What the warranty does not cover"
    )
    # [1] and [2] in the answer (the stage's text and the result) link to the cards they cite
    for where in ('[data-stage="answer"]', '#run .outputs [data-output="answer"]'):
        links = page.locator(f"{where} a.citation")
        assert links.evaluate_all("ls => ls.map(l => [l.textContent, l.getAttribute('href')])") == [
            ["[1]", "#" + str(cards.nth(0).get_attribute("id"))],
            ["[2]", "#" + str(cards.nth(1).get_attribute("id"))],
        ]
    # the cards are folded to their count; following a citation unfolds them
    assert page.locator('[data-stage="search"] details.sources').get_attribute("open") is None
    page.locator('[data-stage="answer"] a.citation').nth(1).click()
    assert page.locator('[data-stage="search"] details.sources').get_attribute("open") == ""
    page.wait_for_selector('[data-stage="search"] .source.is-cited')
    assert cards.nth(1).get_attribute("class") == "source is-cited"
    page.screenshot(path=str(artifacts / "docs_qa-desktop.png"), full_page=True)


def test_an_unmatched_citation_is_marked_not_linked(page: Any) -> None:
    page.goto("/")
    page.evaluate(
        """async (events) => {
            const { RunView } = await import("/static/run-view.js");
            const { resolveCitations } = await import("/static/stagecast.js");
            const root = document.createElement("section");
            root.id = "synthetic";
            document.body.append(root);
            const view = new RunView(root, {});
            view.reset("run_c");
            for (const e of events) view.apply(e);
            const sources = events.filter((e) => e.type === "source");
            window.__resolved = resolveCitations(events[5], sources);
        }""",
        CITED,
    )
    answer = page.locator('#synthetic [data-stage="answer"]')
    assert answer.locator("a.citation").evaluate_all("ls => ls.map(l => l.textContent)") == ["[1]"]
    assert answer.locator(".citation-unmatched").inner_text() == "[4]"
    assert page.evaluate("window.__resolved") == [
        {"marker": 1, "stage": "search", "source": {"id": "a#1", "title": "A", "text": "alpha"}},
        {"marker": 4, "stage": None, "source": None},
    ]


def test_mock_interview_with_answers_given_streams_and_finishes_at_phone_width(
    page: Any, artifacts: Path
) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page)
    choose_chain(page, "mock_interview", "job_posting")
    # The answers come with the inputs (a batch run): the interview asks nothing.
    example = json.loads((EXAMPLES / "mock_interview.batch.json").read_text(encoding="utf-8"))
    page.fill("[name=job_posting]", example["job_posting"])
    page.fill("[name=resume]", example["resume"])
    page.fill("[name=answers]", json.dumps(example["answers"]))
    start(page, "fast")

    page.wait_for_selector(RUNNING_WITH_TEXT)
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)

    interview = page.locator('[data-stage="interview"]')
    assert interview.locator(".stage-count").inner_text() == "3 / 3"
    items = interview.locator(".item")
    # A map over range(n) names its items by number only; each item shows its stages as parts
    # (the answer stage, skipped with the answers given, has none).
    assert items.evaluate_all("is => is.map(i => [i.dataset.path, i.dataset.status])") == [
        [f"interview/{i}", "succeeded"] for i in range(3)
    ]
    assert items.locator(".item-name").all_inner_texts() == ["#1", "#2", "#3"]
    assert items.locator(".item-title").count() == 0
    parts = items.first.locator(".part").evaluate_all(
        "ps => ps.map(p => [p.dataset.stagePart, p.querySelector('.part-label').textContent,"
        " p.dataset.status])"
    )
    assert parts == [
        ["question", "Question", "succeeded"],
        ["evaluation", "Evaluating the answer", "succeeded"],
    ]
    evaluation = items.first.locator('.part[data-stage-part="evaluation"]')
    assert evaluation.locator(".json-object > dt").first.inner_text() == "Strong"
    assert json.loads(str(evaluation.locator("pre.json").text_content()))["scores"]
    assert re.fullmatch(
        r"[\d,]+ in · [\d,]+ out", items.first.locator(".item-usage").first.inner_text()
    )
    # The report (Markdown from the model) is rendered as DOM, not as markup text.
    assert page.locator('#run .outputs [data-output="report"]').inner_text().strip()
    # Nothing is wider than the phone screen.
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width
    page.screenshot(path=str(artifacts / "mock_interview-phone.png"), full_page=True)
    page.locator("#run").scroll_into_view_if_needed()
    page.evaluate("document.querySelector('#run').scrollIntoView()")
    page.screenshot(path=str(artifacts / "mock_interview-phone-run.png"))
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "mock_interview-phone-form.png"))
    page.set_viewport_size({"width": 1280, "height": 900})
    page.screenshot(path=str(artifacts / "mock_interview-desktop.png"), full_page=True)


def test_reload_mid_run_resumes_the_same_run(page: Any) -> None:
    open_page(page)
    fill_advanced_summary(page)
    run_id = start(page, "slow")
    page.wait_for_selector(RUNNING_WITH_TEXT)
    assert page.locator('#run[data-run-status="running"]').count() == 1

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert f"run={run_id}" in page.url
    page.wait_for_selector(f'#run[data-run-id="{run_id}"] [data-stage]')
    # Replay, then live: the run is still going when the page comes back, and it finishes.
    page.wait_for_selector(RUNNING_WITH_TEXT)
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)
    # Nothing was drawn twice.
    assert page.locator('[data-stage="sections"] .source').count() == 4
    paths = page.locator("#run .stream").evaluate_all("s => s.map(x => x.dataset.path)")
    assert len(paths) == len(set(paths)), paths
    assert page.evaluate(MEASURE)["firstOutputInView"]  # the reloaded page followed to the result


def test_cancel_ends_the_run_cancelled(page: Any) -> None:
    open_page(page)
    fill_advanced_summary(page)
    start(page, "slow")
    page.wait_for_selector(RUNNING_WITH_TEXT)
    page.click('#run [data-action="cancel"]')
    wait_run_status(page, "cancelled")
    statuses = page.eval_on_selector_all("#run [data-stage]", "rs => rs.map(r => r.dataset.status)")
    assert "cancelled" in statuses and "running" not in statuses and "waiting" not in statuses
    assert page.locator('#run [data-action="cancel"]').is_hidden()


PAYLOAD = (
    'Hello <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=1</script>\n'
    "# A heading\n- **bold** item\n- [a link](javascript:window.__pwned=1)\n"
)


def test_model_output_is_shown_as_text_never_as_html(page: Any) -> None:
    open_page(page)
    choose_chain(page, "xss_echo", "text")
    page.fill("[name=text]", PAYLOAD)
    start(page, "echo")
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)

    assert page.evaluate("window.__pwned") is None
    run = page.locator("#run")
    assert run.locator("img").count() == 0
    assert run.locator("script").count() == 0
    assert run.locator('a[href^="javascript"]').count() == 0
    for name in ("echoed", "answer"):
        text = page.locator(f'#run .outputs [data-output="{name}"]').inner_text()
        assert '<img src=x onerror="window.__pwned=1">' in text, text
        assert "<script>window.__pwned=1</script>" in text, text
        assert "[a link](javascript:window.__pwned=1)" in text, text
    # Markdown still renders (safely): the heading and the bold text are real elements.
    answer = page.locator('#run .outputs [data-output="answer"]')
    assert answer.locator("h2").inner_text() == "A heading"
    assert answer.locator("strong").inner_text() == "bold"
    # The streamed stage text kept the markup as text too.
    streamed = page.locator('[data-stage="answer"] .stream').inner_text()
    assert "<script>window.__pwned=1</script>" in streamed


MARKDOWN_CASES = [
    ("# Title", '<h2 class="md-h">Title</h2>'),
    ("one\ntwo\n\nthree", "<p>one<br>two</p><p>three</p>"),
    ("- a\n- *b* and `c<d>`", "<ul><li>a</li><li><em>b</em> and <code>c&lt;d&gt;</code></li></ul>"),
    ("1. x\n2. **y**", "<ol><li>x</li><li><strong>y</strong></li></ol>"),
    ("- a\n  - b", "<ul><li>a<ul><li>b</li></ul></li></ul>"),
    ("```\n<b>x</b>\n```", '<pre class="md-code"><code>&lt;b&gt;x&lt;/b&gt;</code></pre>'),
    ("a window.__pwned=1 b__c", "<p>a window.__pwned=1 b__c</p>"),
    ("<img src=x onerror=alert(1)>", "<p>&lt;img src=x onerror=alert(1)&gt;</p>"),
    ("[x](javascript:alert(1))", "<p>[x](javascript:alert(1))</p>"),
    (
        "[docs](https://example.org/a)",
        '<p><a href="https://example.org/a" rel="noopener noreferrer nofollow" '
        'target="_blank">docs</a></p>',
    ),
    ("> quoted **text**", "<blockquote><p>quoted <strong>text</strong></p></blockquote>"),
]


def test_markdown_renderer_builds_safe_dom(page: Any) -> None:
    page.goto("/")
    results = page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import("/static/markdown.js");
            return cases.map(([source]) => {
                const box = document.createElement("div");
                box.append(renderMarkdown(source));
                return box.innerHTML;
            });
        }""",
        [list(case) for case in MARKDOWN_CASES],
    )
    assert results == [expected for _, expected in MARKDOWN_CASES]


def _ev(seq: int, type_: str, path: list[Any] | None = None, **payload: Any) -> dict[str, Any]:
    stage = path[0] if path else None
    attempt = payload.pop("attempt", 1 if path else None)
    return {"v": 1, "type": type_, "run_id": "run_x", "seq": seq, "ts": 1_000 + seq,
            "stage": stage, "path": path, "attempt": attempt, **payload}  # fmt: skip


PLAN = [
    {"stage": "draft", "label": "Drafting", "kind": "llm", "needs": [], "weight": 1,
     "fan_out": False},
    {"stage": "ask", "label": "Asking you", "kind": "input", "needs": ["draft"], "weight": 1,
     "fan_out": False},
]  # fmt: skip

SYNTHETIC = [
    _ev(1, "run-start", chain={"id": "t", "title": "T", "version": 1}, plan=PLAN, model="m"),
    _ev(2, "stage-start", ["draft"], label="Drafting", kind="llm", index=None, total=None),
    _ev(3, "token", ["draft"], text="first try "),
    _ev(4, "stage-retry", ["draft"], error={"type": "timeout", "message": "too slow"}),
    _ev(5, "token", ["draft"], text="second try", attempt=2),
    _ev(6, "future-type", ["draft"], whatever=True),  # unknown types are ignored
    _ev(4, "token", ["draft"], text=" (a replayed duplicate)"),
    _ev(
        7,
        "stage-end",
        ["draft"],
        status="succeeded",
        output="second try",
        attempt=2,
        usage={},
        duration_ms=5,
        error=None,
        progress=0.5,
    ),  # fmt: skip
    _ev(8, "stage-start", ["ask"], label="Asking you", kind="input", index=None, total=None),
    _ev(
        9,
        "input-required",
        ["ask"],
        prompt="How many **points**?",
        schema={
            "type": "object",
            "required": ["count"],
            "properties": {
                "count": {"type": "integer", "minimum": 1, "title": "Count"},
                "note": {"type": "string", "default": "none"},
            },
        },
    ),  # fmt: skip
]


CITED = [
    _ev(1, "run-start", None, chain={"id": "c"}, model="offline", plan=[
        {"stage": "search", "label": "Search", "kind": "retrieve", "needs": [], "weight": 1,
         "fan_out": False},
        {"stage": "answer", "label": "Answer", "kind": "llm", "needs": ["search"], "weight": 1,
         "fan_out": False},
    ]),
    _ev(2, "stage-start", ["search"], label="Search", kind="retrieve"),
    _ev(3, "source", ["search"], source={"id": "a#1", "title": "A", "text": "alpha"}),
    _ev(4, "stage-end", ["search"], status="succeeded", output=[], usage={}, duration_ms=1,
        error=None, progress=0.5, citations=None),
    _ev(5, "stage-start", ["answer"], label="Answer", kind="llm"),
    _ev(6, "stage-end", ["answer"], status="succeeded", output="Alpha [1], not [4].", usage={},
        duration_ms=1, error=None, progress=1.0, citations=[
            {"marker": 1, "source_id": "a#1", "stage": "search"},
            {"marker": 4, "source_id": None, "stage": None},
        ]),
]  # fmt: skip


def test_retry_and_input_required_from_synthetic_events(page: Any) -> None:
    page.goto("/")
    page.evaluate(
        """async (events) => {
            const { RunView } = await import("/static/run-view.js");
            const root = document.createElement("section");
            root.id = "synthetic";
            document.body.append(root);
            window.__answers = [];
            const view = new RunView(root, {
                onAnswer: async (answer) => { window.__answers.push(answer); },
            });
            view.reset("run_x");
            for (const e of events) view.apply(e);
            window.__view = view;
        }""",
        SYNTHETIC,
    )
    root = page.locator("#synthetic")
    draft = root.locator('[data-stage="draft"]')
    # The failed attempt's tokens are gone; the retry is shown.
    assert draft.locator(".stream").inner_text() == "second try"
    assert "attempt 1 failed (too slow)" in draft.locator(".note-retry").inner_text()
    assert draft.get_attribute("data-retries") == "1"
    # input-required: a form in place, generated from the event's schema; the run waits.
    assert root.get_attribute("data-run-status") == "waiting_input"
    ask = root.locator('[data-stage="ask"]')
    assert ask.get_attribute("data-awaiting") == "input"
    assert ask.locator(".input-prompt strong").inner_text() == "points"
    assert ask.locator("[name=note]").input_value() == "none"
    ask.locator("button[type=submit]").click()
    assert ask.locator('[data-field="count"] .field-problem').inner_text() == "required"
    ask.locator("[name=count]").fill("3")
    ask.locator("button[type=submit]").click()
    page.wait_for_function("window.__answers.length === 1")
    assert page.evaluate("window.__answers") == [{"count": 3, "note": "none"}]
    # The next event of that stage removes the form and the run is running again.
    page.evaluate(
        "(e) => window.__view.apply(e)",
        _ev(
            10,
            "stage-end",
            ["ask"],
            status="succeeded",
            output={"count": 3},
            usage={},
            duration_ms=9,
            error=None,
            progress=1.0,
        ),  # fmt: skip
    )
    assert ask.locator("form").count() == 0
    assert root.get_attribute("data-run-status") == "running"
    assert ask.locator("pre.json").text_content() == '{\n  "count": 3\n}'


def test_invalid_inputs_are_shown_at_their_field(page: Any) -> None:
    open_page(page)
    choose_chain(page, "advanced_summary", "document")
    page.click("#start")  # the document is required: the form says so, no request is made
    field = page.locator('[data-field="document"]')
    assert field.locator(".field-problem").inner_text() == "required"
    page.fill("[name=document]", "Some text.")
    page.fill("[name=bullets]", "99")  # over the maximum: the server's 422 names the field
    page.click("#start")
    page.wait_for_selector("#form-error:not([hidden])")
    problem = page.locator('[data-field="bullets"] .field-problem')
    assert "20" in problem.inner_text(), problem.inner_text()
    assert page.locator("#run").is_hidden()


# -- what is in the viewport while a run is watched ----------------------------------------------

# Measured in an animation frame (after the page's own follow-up of the last event): the
# streaming stages and what of them is in the viewport below the sticky run bar, the source
# cards in the viewport, the connection state's place. Up to three frames, for an event that
# came in between the page's frame and this one.
MEASURE = """async () => {
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => resolve()));
  const measure = () => {
    const vh = innerHeight, vw = innerWidth;
    const run = document.querySelector("#run");
    const bar = run.querySelector(".run-bar").getBoundingClientRect();
    const seen = (node, atLeast) => {
      const r = node.getBoundingClientRect();
      const visible = Math.min(r.bottom, vh) - Math.max(r.top, bar.bottom);
      return r.height > 0 && r.right > 0 && r.left < vw && visible >= Math.min(atLeast, r.height);
    };
    const streams = [...run.querySelectorAll(
      '[data-stage][data-status="running"] .stream:not(.is-empty)')];
    const cards = [...run.querySelectorAll(".source")].filter((c) => {
      const r = c.getBoundingClientRect();  // cards in folded <details> are laid out, not shown
      return c.checkVisibility() && r.height > 0 && r.bottom > 0 && r.top < vh;
    });
    const conn = run.querySelector(".connection").getBoundingClientRect();
    const outputs = run.querySelector(".outputs");
    return {
      status: run.dataset.runStatus,
      streaming: streams.map((s) => s.dataset.path),
      streamingInView: streams.filter((s) => seen(s, 60)).map((s) => s.dataset.path),
      cardsInView: cards.length,
      connection: run.dataset.connection,
      connectionInView: conn.height > 0 && conn.top >= 0 && conn.bottom <= vh,
      resultTop: outputs.hidden ? null : outputs.getBoundingClientRect().top - bar.bottom,
      firstOutputInView: outputs.hidden ? false : seen(outputs.querySelector(".output"), 40),
      scrollY, viewport: [vw, vh], scrollWidth: document.documentElement.scrollWidth,
      atPageEnd: scrollY + vh >= document.documentElement.scrollHeight - 2,
    };
  };
  let m;
  for (let i = 0; i < 3; i++) {
    await frame();
    m = measure();
    if (!m.streaming.length || m.streamingInView.length) break;
  }
  return m;
}"""

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


@pytest.mark.parametrize("size", sorted(VIEWPORTS))
def test_the_page_follows_the_run_in_the_viewport(page: Any, artifacts: Path, size: str) -> None:
    page.set_viewport_size(VIEWPORTS[size])
    open_page(page)
    fill_advanced_summary(page)
    start(page, "demo")  # ~25 ms per token: a run of a few seconds, as a person watches it
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        m = page.evaluate(MEASURE)
        if m["status"] not in ("connecting", "running"):
            break
        samples.append(m)
        if len(samples) == 8:
            page.screenshot(path=str(artifacts / f"follow-running-{size}.png"))
        time.sleep(0.08)
    streaming = [m for m in samples if m["streaming"]]
    assert len(streaming) >= 8, f"too few samples while text streamed: {len(samples)}"
    for m in streaming:
        # what streams is in sight below the run bar, the whole run long
        assert m["streamingInView"], m
    for m in samples:
        # the source cards are folded to their count: they never fill the viewport
        assert m["cardsInView"] == 0, m
        assert m["connectionInView"] and m["connection"] in ("connecting", "connected"), m
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)
    end = page.evaluate(MEASURE)
    # At the end the result is read from its start: right below the run bar, or as high as the
    # page scrolls (the result is the end of the page).
    assert end["resultTop"] is not None and 0 <= end["resultTop"] < end["viewport"][1] / 2, end
    assert end["resultTop"] <= 40 or end["atPageEnd"], end
    assert end["firstOutputInView"], end
    assert end["connection"] == "ended" and end["connectionInView"], end
    assert page.locator("#run .connection").inner_text() == "Ended"
    assert end["scrollWidth"] <= VIEWPORTS[size]["width"], end
    page.screenshot(path=str(artifacts / f"follow-end-{size}.png"))


def test_scrolling_away_stops_following_until_asked(page: Any) -> None:
    page.set_viewport_size(VIEWPORTS["desktop"])
    open_page(page)
    fill_advanced_summary(page)
    start(page, "demo")
    page.wait_for_selector('[data-stage="merge"][data-status="running"] .stream:not(.is-empty)')
    assert page.evaluate("scrollY") > 0  # the page followed the run down
    assert page.get_attribute("#run", "data-following") == "true"
    follow = page.locator('#run [data-action="follow"]')
    assert follow.is_hidden()

    page.mouse.move(640, 400)
    page.mouse.wheel(0, -5000)  # the reader goes back up to the form
    page.wait_for_selector('#run[data-following="false"]')
    page.wait_for_function("scrollY === 0")
    # The page stays where the reader put it while the run goes on, and offers to follow again.
    seq = int(page.get_attribute("#run", "data-last-seq") or 0)
    page.wait_for_function(
        f"Number(document.querySelector('#run').dataset.lastSeq) > {seq + 15}"
        " || document.querySelector('#run').dataset.runStatus === 'succeeded'"
    )
    assert page.evaluate("scrollY") == 0
    box = follow.bounding_box()
    assert follow.is_visible() and box is not None
    assert 0 <= box["y"] and box["y"] + box["height"] <= 800, box
    assert follow.inner_text() in ("Follow the run ↓", "Show the result ↓")

    follow.click()
    assert page.get_attribute("#run", "data-following") == "true"
    assert follow.is_hidden()
    m = page.evaluate(MEASURE)
    if m["status"] == "running" and m["streaming"]:
        assert m["streamingInView"], m
    else:
        wait_run_status(page, "succeeded")
        m = page.evaluate(MEASURE)
        assert m["firstOutputInView"], m


def test_a_cut_shows_reconnecting_and_the_run_resumes_without_loss(
    cut_page: Any, artifacts: Path
) -> None:
    page, cutter = cut_page
    page.set_viewport_size(VIEWPORTS["desktop"])
    open_page(page)
    fill_advanced_summary(page)
    run_id = start(page, "slow")
    page.wait_for_selector(RUNNING_WITH_TEXT)
    page.wait_for_selector('#run[data-connection="connected"]')
    connection = page.locator("#run .connection")
    assert connection.inner_text() == "Connected"

    assert cutter.cut(hold=True) == 1  # the page's one event stream, cut mid-run
    page.wait_for_selector('#run[data-connection="reconnecting"]')
    assert connection.inner_text() == "Reconnecting…"
    assert page.evaluate(MEASURE)["connectionInView"]
    # While the cut lasts the run goes on on the server; the page says it is reconnecting.
    seen = int(page.get_attribute("#run", "data-last-seq") or 0)
    for _ in range(100):  # bounded: 100 x 50 ms
        status = page.request.get(f"/v1/runs/{run_id}").json()
        if status["last_seq"] > seen + 10 or status["status"] != "running":
            break
        page.wait_for_timeout(50)
    assert status["last_seq"] > seen + 10, status
    assert page.get_attribute("#run", "data-connection") == "reconnecting"
    assert int(page.get_attribute("#run", "data-last-seq") or 0) == seen
    page.screenshot(path=str(artifacts / "cut-reconnecting-desktop.png"))

    cutter.release()
    page.wait_for_selector('#run[data-connection="connected"], #run[data-connection="ended"]')
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)
    page.wait_for_selector('#run[data-connection="ended"]')
    assert connection.inner_text() == "Ended"
    # Resumed after the last event seen: every event once, none missing, nothing drawn twice.
    assert cutter.event_requests == 2, cutter.event_requests
    final = page.request.get(f"/v1/runs/{run_id}").json()
    assert page.get_attribute("#run", "data-last-seq") == str(final["last_seq"])
    assert page.get_attribute("#run", "data-seq-gaps") is None
    assert page.locator('[data-stage="sections"] .source').count() == 4
    paths = page.locator("#run .stream").evaluate_all("s => s.map(x => x.dataset.path)")
    assert len(paths) == len(set(paths)), paths


USAGE_PLAN = [
    {"stage": "silent", "label": "Silent provider", "kind": "llm", "needs": [], "weight": 1,
     "fan_out": False},
    {"stage": "priced", "label": "Priced model", "kind": "llm", "needs": [], "weight": 1,
     "fan_out": False},
    {"stage": "chunks", "label": "Chunks", "kind": "split", "needs": [], "weight": 1,
     "fan_out": False},
]  # fmt: skip


def _end(seq: int, stage: str, usage: dict[str, Any], output: Any = "ok") -> dict[str, Any]:
    return _ev(seq, "stage-end", [stage], status="succeeded", output=output, usage=usage,
               duration_ms=3, error=None, progress=seq / 10, citations=None)  # fmt: skip


UNKNOWN = {"input_tokens": 0, "output_tokens": 0, "cost": None, "reported": False}
USAGE_EVENTS = [
    _ev(1, "run-start", chain={"id": "u", "title": "U", "version": 1}, plan=USAGE_PLAN, model="m"),
    _ev(2, "stage-start", ["silent"], label="Silent provider", kind="llm"),
    _end(3, "silent", UNKNOWN),
    _ev(4, "stage-start", ["priced"], label="Priced model", kind="llm"),
    _end(5, "priced", {"input_tokens": 1200, "output_tokens": 34, "cost": 0.0012}),
    _ev(6, "stage-start", ["chunks"], label="Chunks", kind="split"),
    _end(7, "chunks", {"input_tokens": 0, "output_tokens": 0, "cost": None}, output=[]),
    _ev(8, "run-end", status="succeeded", outputs={"output": "ok"}, usage=UNKNOWN,
        duration_ms=9, error=None),
]  # fmt: skip


def _synthetic(page: Any, events: list[dict[str, Any]], on_answer: str = "undefined") -> Any:
    page.goto("/")
    page.evaluate(
        """async ([events, onAnswer]) => {
            const { RunView } = await import("/static/run-view.js");
            const connection = await import("/static/connection.js");
            const root = document.createElement("section");
            root.id = "synthetic";
            document.body.append(root);
            const view = new RunView(root, { onAnswer: eval(onAnswer) });
            view.reset("run_x");
            for (const e of events) view.apply(e);
            window.__view = view;
        }""",
        [events, on_answer],
    )
    return page.locator("#synthetic")


def test_per_stage_usage_and_unknown_usage_is_never_zero(page: Any) -> None:
    root = _synthetic(page, USAGE_EVENTS)
    usage = {
        stage: root.locator(f'[data-stage="{stage}"] .stage-usage').inner_text()
        for stage in ("silent", "priced", "chunks")
    }
    assert usage == {
        "silent": "usage unknown",  # the provider reported none: not 0, not $0
        "priced": "1,200 in · 34 out · $0.0012",
        "chunks": "",  # no model was called
    }
    took = root.locator(".run-meta .meta").last.inner_text()
    assert took == "Took 0.0 s · usage unknown", took
    text = root.inner_text()
    assert not re.search(r"\$0(\.0+)?(?![\d.])|(?<![\d,])0 (in|out)", text), text


def test_answers_post_stage_path_value_and_refusals_show_at_their_field(page: Any) -> None:
    posted: list[Any] = []
    replies = [
        (422, {"code": "invalid_answer", "message": "The answer does not fit the question.",
               "details": {"fields": {"value.count": "must be at least 1"}}}),
        (409, {"code": "not_waiting_input", "message": "Run run_x is not waiting for input."}),
        (422, {"code": "invalid_answer", "message": "The answer does not fit the question.",
               "details": {"fields": {"value": "must be at least 3 characters"}}}),
        (202, None),
    ]  # fmt: skip

    def reply(route: Any) -> None:
        posted.append(route.request.post_data_json)
        status, error = replies[len(posted) - 1]
        body = {"error": error} if error else {"status": "accepted"}
        route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    page.route("**/v1/runs/run_x/input", reply)
    expires = int(time.time() * 1000) + 90_000
    events = [
        *SYNTHETIC[:8],
        _ev(9, "input-required", ["ask"], prompt="How many?", expires_at=expires,
            schema=SYNTHETIC[9]["schema"]),
    ]  # fmt: skip
    root = _synthetic(page, events, "(value, e) => connection.answerInput('run_x', e, value)")
    ask = root.locator('[data-stage="ask"]')
    deadline = ask.locator(".input-deadline")
    assert re.fullmatch(r"Answer within 1:(2\d|30)", deadline.inner_text()), deadline.inner_text()
    assert 80 <= int(deadline.get_attribute("data-seconds-left") or 0) <= 90

    ask.locator("[name=count]").fill("0")
    ask.locator("button[type=submit]").click()
    problem = ask.locator('[data-field="count"] .field-problem')
    page.wait_for_function("document.querySelector('#synthetic [data-field=count] .field-problem')"
                           ".textContent !== ''")  # fmt: skip
    assert problem.inner_text() == "must be at least 1"
    assert ask.locator(".input-status").inner_text() == "The answer does not fit the question."
    assert ask.locator("button[type=submit]").is_enabled()  # the run still waits: try again

    ask.locator("[name=count]").fill("2")
    ask.locator("button[type=submit]").click()
    status = ask.locator(".input-status")
    page.wait_for_function("document.querySelector('#synthetic .input-status').textContent"
                           ".startsWith('Run run_x')")  # fmt: skip
    assert status.inner_text() == "Run run_x is not waiting for input."
    assert ask.locator("button[type=submit]").is_disabled()
    assert posted == [
        {"stage": "ask", "path": ["ask"], "value": {"count": 0, "note": "none"}},
        {"stage": "ask", "path": ["ask"], "value": {"count": 2, "note": "none"}},
    ]

    # A question with the default schema (a string): one text area; `value` is the answer.
    page.evaluate(
        "(e) => window.__view.apply(e)",
        _ev(10, "input-required", ["ask"], prompt="Why?", schema={"type": "string"},
            expires_at=None),
    )  # fmt: skip
    assert ask.locator(".input-deadline").count() == 0
    answer = ask.locator("textarea[name=answer]")
    answer.fill("no")
    ask.locator("button[type=submit]").click()
    page.wait_for_function("document.querySelector('#synthetic [data-field=answer] .field-problem')"
                           ".textContent !== ''")  # fmt: skip
    assert ask.locator('[data-field="answer"] .field-problem').inner_text() == (
        "must be at least 3 characters"
    )
    answer.fill("because")
    ask.locator("button[type=submit]").click()
    page.wait_for_function("document.querySelector('#synthetic .input-status').textContent"
                           ".startsWith('Sent')")  # fmt: skip
    assert posted[2:] == [
        {"stage": "ask", "path": ["ask"], "value": "no"},
        {"stage": "ask", "path": ["ask"], "value": "because"},
    ]


LONG_TOPIC = "How the ledger reconciles every payment provider's settlement files at night"
LABEL_PLAN = [
    {"stage": "topics", "label": "Topics", "kind": "llm", "needs": [], "weight": 1,
     "fan_out": False},
    {"stage": "each", "label": "Each", "kind": "map", "needs": ["topics"], "weight": 1,
     "fan_out": True},
]  # fmt: skip
LABEL_EVENTS = [
    _ev(1, "run-start", chain={"id": "l", "title": "L", "version": 1}, plan=LABEL_PLAN, model="m"),
    _ev(2, "stage-start", ["topics"], label="Topics", kind="llm"),
    _end(3, "topics", {}, output=[f"## {LONG_TOPIC}\n\nbody", {"id": 7, "title": "Refunds"}, 42,
                                  {"n": 1}]),
    _ev(4, "stage-start", ["each"], label="Each", kind="map"),
    *[_ev(5 + i, "stage-start", ["each", i], label="Each", kind="llm", index=i, total=4)
      for i in range(4)],
]  # fmt: skip


def test_map_items_are_named_by_their_item_within_bounds(page: Any) -> None:
    root = _synthetic(page, LABEL_EVENTS)
    heads = root.locator('[data-stage="each"] .item-head').evaluate_all(
        "hs => hs.map(h => [h.querySelector('.item-name').textContent,"
        " h.querySelector('.item-title')?.textContent ?? null,"
        " h.querySelector('.item-title')?.title ?? null])"
    )
    assert heads == [
        ["#1", LONG_TOPIC[:59] + "…", LONG_TOPIC],  # the first heading, at most 60 characters
        ["#2", "Refunds", "Refunds"],  # a title-like field
        ["#3", "42", "42"],  # a value
        ["#4", None, None],  # nothing to name it by: its number only
    ]


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_an_interview_is_held_end_to_end_on_the_demo_page(
    page: Any, server_url: str, artifacts: Path, size: str
) -> None:
    """The real interactive mock_interview on the offline model: each question streams, the
    form appears in place, a refused answer is shown at its field, typed answers continue the
    run, and the report comes at the end."""
    width, height = (1280, 800) if size == "desktop" else (390, 844)
    page.set_viewport_size({"width": width, "height": height})
    open_page(page)
    choose_chain(page, "mock_interview", "job_posting")
    example = json.loads((EXAMPLES / "mock_interview.json").read_text(encoding="utf-8"))
    page.fill("[name=job_posting]", example["job_posting"])
    page.fill("[name=num_questions]", "2")
    run_id = start(page, "fast")
    interview = page.locator('[data-stage="interview"]')
    typed = ["I rebuilt our checkout around idempotency keys.", "I led the incident review."]
    for turn, answer in enumerate(typed):
        box = interview.locator(f'form.input-box[data-path="interview/{turn}/answer"]')
        box.wait_for(state="visible", timeout=30_000)
        wait_run_status(page, "waiting_input")
        # the form asks the question that just streamed, in the item that asks, in view
        question = interview.locator(
            f'.item[data-path="interview/{turn}"] .part[data-stage-part="question"] .stream'
        )
        assert box.locator(".input-prompt").inner_text().strip() == question.inner_text().strip()
        top = box.evaluate("b => b.getBoundingClientRect().top")
        assert 0 <= top < height, top
        status = json.loads(page.evaluate(f"fetch('/v1/runs/{run_id}').then(r => r.text())"))
        assert status["status"] == "waiting_input"
        assert status["pending_input"][0]["path"] == ["interview", turn, "answer"]
        field = box.locator("textarea[name=answer]")
        if turn == 0:  # an empty answer: refused in the page, nothing is sent
            box.locator("button[type=submit]").click()
            assert box.locator('[data-field="answer"] .field-problem').inner_text() == "required"
        field.fill(answer)
        box.locator("button[type=submit]").click()
        page.wait_for_selector(
            f'.item[data-path="interview/{turn}"] .part[data-stage-part="evaluation"]'
            '[data-status="succeeded"]',
            timeout=30_000,
        )
    wait_run_status(page, "succeeded")
    assert interview.locator("form.input-box").count() == 0
    status = json.loads(page.evaluate(f"fetch('/v1/runs/{run_id}').then(r => r.text())"))
    assert [turn["answer"] for turn in status["outputs"]["transcript"]] == typed
    assert status["pending_input"] == []
    assert page.locator('#run .outputs [data-output="report"]').inner_text().strip()
    assert "Technical depth" in page.locator('#run .outputs [data-output="scorecard"]').inner_text()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.screenshot(path=str(artifacts / f"interview-{size}.png"), full_page=True)
