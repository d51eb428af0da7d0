"""The demo page end to end: every shipped chain runs and is watched in headless Chromium.

Each test drives the page as a person would (pick a chain, fill the generated form, start) and
checks what docs/protocol.md and the demo-page issue promise: every stage row goes through its
statuses to `succeeded`, the overall bar reaches 100, tokens show while their stage runs, a reload
mid-run resumes the same run, cancel ends `cancelled`, and model output is only ever text.
Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import json
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
    # The split's chunks are sources, shown as cards under their stage.
    cards = page.locator('[data-stage="sections"] .source')
    assert cards.count() == 4
    assert cards.first.locator(".source-title").inner_text() == "Section 1 of 4"
    # The JSON stage is shown formatted, and the outputs are rendered.
    polished = page.locator('[data-stage="polish"] pre.json').inner_text()
    assert json.loads(polished)["key_points"]
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
    assert cards.first.locator(".source-number").inner_text() == "[1]"
    assert cards.first.locator(".source-title").inner_text() == (
        "warranty: What the warranty does not cover"
    )
    # [1] and [2] in the answer (the stage's text and the result) link to the cards they cite
    for where in ('[data-stage="answer"]', '#run .outputs [data-output="answer"]'):
        links = page.locator(f"{where} a.citation")
        assert links.evaluate_all("ls => ls.map(l => [l.textContent, l.getAttribute('href')])") == [
            ["[1]", "#" + str(cards.nth(0).get_attribute("id"))],
            ["[2]", "#" + str(cards.nth(1).get_attribute("id"))],
        ]
    page.locator('[data-stage="search"] details.sources > summary').click()  # fold the cards
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


def test_mock_interview_streams_and_finishes_at_phone_width(page: Any, artifacts: Path) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_page(page)
    choose_chain(page, "mock_interview", "job_posting")
    example = json.loads((EXAMPLES / "mock_interview.json").read_text(encoding="utf-8"))
    page.fill("[name=job_posting]", example["job_posting"])
    page.fill("[name=resume]", example["resume"])
    page.fill("[name=num_questions]", "3")
    start(page, "fast")

    page.wait_for_selector(RUNNING_WITH_TEXT)
    wait_run_status(page, "succeeded")
    assert_all_succeeded(page)

    guides = page.locator('[data-stage="answer_guides"]')
    assert guides.locator(".stage-count").inner_text() == "3 / 3"
    assert guides.locator(".item pre.json").count() == 3
    questions = json.loads(page.locator('[data-stage="questions"] pre.json').inner_text())
    assert isinstance(questions, list) and questions
    # The brief (Markdown from the model) is rendered as DOM, not as markup text.
    assert page.locator('#run .outputs [data-output="brief"]').inner_text().strip()
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
    assert ask.locator("pre.json").inner_text() == '{\n  "count": 3\n}'


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
