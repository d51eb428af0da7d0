// The live view of one run, driven by protocol-v1 events (docs/protocol.md), one `apply` per event.
//
// The view is a pure function of the events it was given: a reload replays the run from the
// start into a fresh view and ends up in the same state as a viewer who watched it live.
// Everything a model produced is put into the page as text (textContent, or the safe Markdown
// renderer); nothing from an event is ever parsed as HTML.
//
// Hooks for tests and assistive technology: the root carries `data-run-status`; every stage row
// `data-stage` and `data-status`; every map item `data-path` and `data-status`; progress bars
// are `role="progressbar"` with `aria-valuenow/min/max`; streamed text lives in `.stream`; the
// root carries `data-connection` (connecting, connected, reconnecting, ended, lost),
// `data-following` and `data-last-seq`.
//
// Following: the page keeps the active stage (a waiting question, at the end the result) in the
// viewport, below the sticky run bar, until the reader scrolls the page; then it stops and
// offers a "Follow the run" button that takes up following again.

import { renderMarkdown } from "./markdown.js";
import { buildFields, humanize, readValues, showProblems } from "./schema-form.js";

const STATUS_TEXT = {
  waiting: "Waiting",
  running: "Running",
  succeeded: "Done",
  failed: "Failed",
  skipped: "Skipped",
  cancelled: "Cancelled",
};

const CONNECTION_TEXT = {
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  ended: "Ended",
  lost: "Disconnected",
};

const LIVE = ["connecting", "running", "waiting_input"];
const ITEM_LABEL_MAX = 60;

const RUN_STATUS_TEXT = {
  connecting: "Connecting…",
  running: "Running",
  waiting_input: "Waiting for you",
  succeeded: "Finished",
  failed: "Failed",
  cancelled: "Cancelled",
};

export class RunView {
  /**
   * @param {HTMLElement} root  the run container (emptied and rebuilt by `reset`)
   * @param {{onCancel?: () => Promise<void>, onAnswer?: (answer: unknown) => Promise<void>}} hooks
   */
  constructor(root, hooks = {}) {
    this.root = root;
    this.hooks = hooks;
    this.timer = null;
    this.following = true;
    this.followQueued = false;
    this.userScrollAt = -Infinity;
    this.ownScrollY = null; // where the page's own last scroll put the window
    // What the reader does to scroll the page; a window scroll soon after one stops following
    // (the page's own scrolls come with none of these).
    const intent = () => {
      this.userScrollAt = performance.now();
    };
    addEventListener("wheel", intent, { passive: true });
    addEventListener("touchmove", intent, { passive: true });
    addEventListener("mousedown", (ev) => {
      if (ev.clientX >= document.documentElement.clientWidth) intent(); // the scrollbar
    });
    addEventListener("keydown", (ev) => {
      const keys = ["ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End", " "];
      const inField = ev.target instanceof Element && ev.target.closest("input, textarea, select");
      if (keys.includes(ev.key) && !inField) intent();
    });
    addEventListener(
      "scroll",
      () => {
        if (!this.following || Math.abs(scrollY - this.ownScrollY) < 2) return; // our own scroll
        if (performance.now() - this.userScrollAt < 1000) this.#setFollowing(false);
      },
      { passive: true },
    );
    addEventListener("resize", () => this.#queueFollow());
  }

  /** Start over for `runId` (a new run, or a replay after a reload). */
  reset(runId) {
    clearInterval(this.timer);
    this.runId = runId;
    this.lastSeq = 0;
    this.stages = new Map(); // stage id -> row parts
    this.streams = new Map(); // path key -> {node, text, attempt, box}
    this.sourceCards = new Map(); // "stage\u0000source id" -> its card
    this.sourceSerial = 0;
    this.citations = null; // the last llm stage-end citations, to link [n] in the result
    this.items = new Map(); // "map/index" -> the item's parts
    this.parts = new Map(); // path key of a stage inside a map item ("map/index/stage") -> its place
    this.inputs = new Map(); // path key -> input box
    this.progress = 0;
    this.runStartTs = null;
    this.runEndMs = null;
    this.status = "connecting";
    this.outputs = new Map(); // top-level stage id -> its output (to name map items)
    this.deadlines = new Map(); // path key -> {at, node} of an input with expires_at
    this.seqGaps = 0;
    this.target = null; // what following keeps in view

    const r = this.root;
    r.replaceChildren();
    r.hidden = false;
    r.dataset.runId = runId;
    r.dataset.lastSeq = "0";

    // The run bar sticks to the top of the viewport: status, connection and progress stay in
    // sight while the page follows the stages below it.
    this.barWrap = div("run-bar");
    const head = div("run-head");
    const titles = div("run-titles");
    this.titleEl = el("h2", "run-title");
    this.titleEl.textContent = "Run";
    titles.append(this.titleEl);
    const actions = div("run-actions");
    this.pillEl = el("span", "pill");
    this.pillEl.setAttribute("role", "status");
    this.connEl = el("span", "connection");
    this.connEl.setAttribute("role", "status");
    this.connEl.setAttribute("aria-live", "polite");
    this.cancelEl = el("button", "button button-quiet button-small");
    this.cancelEl.type = "button";
    this.cancelEl.dataset.action = "cancel";
    this.cancelEl.textContent = "Cancel run";
    this.cancelEl.addEventListener("click", () => this.#cancel());
    actions.append(this.pillEl, this.connEl, this.cancelEl);
    head.append(titles, actions);
    this.metaEl = el("p", "run-meta");
    this.metaEl.textContent = runId;

    const overall = div("overall");
    const overallHead = div("overall-head");
    const overallLabel = el("span", "overall-label");
    overallLabel.id = "overall-label";
    overallLabel.textContent = "Overall progress";
    this.percentEl = el("span", "overall-percent");
    this.elapsedEl = el("span", "overall-elapsed");
    overallHead.append(overallLabel, this.elapsedEl, this.percentEl);
    this.barEl = progressbar("overall-label");
    this.barEl.dataset.progress = "overall";
    this.barEl.classList.add("bar-large");
    overall.append(overallHead, this.barEl);
    this.barWrap.append(head, overall);

    this.errorEl = el("p", "notice notice-error");
    this.errorEl.hidden = true;
    this.errorEl.setAttribute("role", "alert");

    this.stagesEl = el("ol", "stages");
    this.stagesEl.setAttribute("aria-label", "Stages");

    this.outputsEl = el("section", "outputs");
    this.outputsEl.hidden = true;
    this.outputsEl.setAttribute("aria-label", "Result");

    this.followEl = el("button", "button button-primary follow");
    this.followEl.type = "button";
    this.followEl.dataset.action = "follow";
    this.followEl.textContent = "Follow the run";
    this.followEl.addEventListener("click", () => this.#setFollowing(true));

    r.append(this.barWrap, this.metaEl, this.errorEl, this.stagesEl, this.outputsEl, this.followEl);
    this.#setRunStatus("connecting");
    this.setConnection("connecting");
    this.#setProgress(0);
    this.#setFollowing(true);
  }

  /** The state of the event stream: connecting, connected, reconnecting, ended or lost. */
  setConnection(state) {
    this.root.dataset.connection = state;
    this.connEl.dataset.connection = state;
    this.connEl.textContent = CONNECTION_TEXT[state] || state;
    this.connEl.title =
      state === "reconnecting"
        ? "The connection was cut; resuming after the last event received (nothing is lost)."
        : "";
  }

  /** Show a problem that is not part of the run (a failed request, an unknown run). */
  showError(message) {
    this.errorEl.hidden = !message;
    this.errorEl.textContent = message || "";
  }

  apply(event) {
    if (!event || typeof event !== "object") return;
    if (typeof event.seq === "number") {
      if (event.seq <= this.lastSeq) return; // a replayed duplicate
      if (event.seq !== this.lastSeq + 1) this.root.dataset.seqGaps = String(++this.seqGaps);
      this.lastSeq = event.seq;
      this.root.dataset.lastSeq = String(event.seq);
    }
    this.#queueFollow();
    switch (event.type) {
      case "run-start":
        return this.#runStart(event);
      case "stage-start":
        return this.#stageStart(event);
      case "token":
        return this.#token(event);
      case "source":
        return this.#source(event);
      case "stage-progress":
        return this.#stageProgress(event);
      case "stage-retry":
        return this.#stageRetry(event);
      case "input-required":
        return this.#inputRequired(event);
      case "stage-end":
        return this.#stageEnd(event);
      case "run-end":
        return this.#runEnd(event);
      default:
        return undefined; // unknown types are ignored (docs/protocol.md)
    }
  }

  // -- events ------------------------------------------------------------------------------

  #runStart(e) {
    this.titleEl.textContent = e.chain?.title || e.chain?.id || "Run";
    this.metaEl.replaceChildren(
      meta("Model", e.model || "default"),
      meta("Run", this.runId || e.run_id),
    );
    this.runStartTs = e.ts;
    for (const step of e.plan || []) this.#addStage(step);
    this.#setRunStatus("running");
    clearInterval(this.timer);
    this.timer = setInterval(() => this.#tick(), 250);
    this.#tick();
  }

  #stageStart(e) {
    const row = this.#row(e);
    if (!row) return;
    this.#resumeIfWaiting(e);
    if (isTop(e)) {
      row.startTs = e.ts;
      row.startSeq = e.seq ?? 0;
      this.#setStatus(row, "running");
      if (row.plan.fan_out) return; // items get their own places
      this.#stream(e, row);
    } else {
      const item = this.#item(e, row);
      item.startTs ??= e.ts;
      item.startSeq = e.seq ?? 0;
      setStatus(item.root, "running", item.statusEl);
      if (typeof e.total === "number" && row.total == null) this.#setCount(row, 0, e.total);
      if (isPart(e)) {
        const part = this.#part(e, item);
        part.startTs = e.ts;
        part.startSeq = e.seq ?? 0;
        setStatus(part.root, "running", part.statusEl);
      }
      this.#stream(e, row);
    }
  }

  #token(e) {
    const row = this.#row(e);
    if (!row) return;
    this.#resumeIfWaiting(e);
    const stream = this.#stream(e, row);
    if ((e.attempt ?? 1) < stream.attempt) return; // a late token of a discarded attempt
    const box = stream.box;
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    stream.node.appendData(e.text ?? "");
    box.classList.remove("is-empty");
    if (stick) box.scrollTop = box.scrollHeight;
  }

  #source(e) {
    const row = this.#row(e);
    if (!row || !e.source) return;
    const s = e.source;
    const card = el("article", "source");
    card.dataset.sourceId = s.id ?? "";
    // numbered per stage, in arrival order: the [n] an answer cites (docs/protocol.md, citations)
    const number = row.sourcesEl.querySelectorAll(".source").length + 1;
    card.id = `source-${++this.sourceSerial}`;
    card.dataset.sourceNumber = String(number);
    this.sourceCards.set(`${e.stage}\u0000${s.id}`, card);
    const head = div("source-head");
    const badge = el("span", "source-number");
    badge.textContent = `[${number}]`;
    head.append(badge);
    const title = el("h4", "source-title");
    if (s.url && /^https?:/i.test(s.url)) {
      const a = el("a");
      a.href = s.url;
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      a.textContent = s.title || s.url;
      title.append(a);
    } else {
      title.textContent = s.title || s.id || "Source";
    }
    head.append(title);
    if (typeof s.score === "number") {
      const score = el("span", "source-score");
      score.textContent = `score ${s.score.toFixed(2)}`;
      head.append(score);
    }
    const snippet = el("p", "source-snippet");
    const text = String(s.text ?? "").replace(/\s+/g, " ").trim();
    snippet.textContent = text.length > 240 ? `${text.slice(0, 240)}…` : text;
    card.append(head, snippet);
    row.sourcesEl.hidden = false;
    row.sourcesEl.append(card);
    const count = row.sourcesEl.querySelectorAll(".source").length;
    row.sourcesCount.textContent = `${count} ${count === 1 ? "source" : "sources"}`;
  }

  #stageProgress(e) {
    const row = this.#row(e);
    if (!row) return;
    this.#setCount(row, e.completed, e.total);
    this.#settleItems(row, e, "succeeded");
  }

  #stageRetry(e) {
    const row = this.#row(e);
    if (!row) return;
    const stream = this.streams.get(key(e.path));
    if (stream) {
      stream.node.data = "";
      stream.box.classList.add("is-empty");
      stream.attempt = (e.attempt ?? 1) + 1;
    }
    const note = el("p", "note note-retry");
    const where = isTop(e) ? "" : `Item ${Number(e.path[1]) + 1}: `;
    const why = e.error ? `${e.error.message || e.error.type}` : "it failed";
    note.textContent = `${where}attempt ${e.attempt ?? 1} failed (${why}) — retrying; its text was discarded.`;
    note.dataset.attempt = String(e.attempt ?? 1);
    row.notesEl.append(note);
    row.root.dataset.retries = String(row.notesEl.querySelectorAll(".note-retry").length);
  }

  #inputRequired(e) {
    const row = this.#row(e);
    if (!row) return;
    const k = key(e.path);
    this.inputs.get(k)?.remove();
    const box = el("form", "input-box");
    box.noValidate = true;
    box.dataset.path = k;
    const prompt = div("input-prompt md");
    prompt.append(renderMarkdown(e.prompt || "Your answer:"));
    const fieldsEl = div("fields");
    const schema = e.schema && typeof e.schema === "object" ? e.schema : { type: "string" };
    const form = buildFields(fieldsEl, schema, { idPrefix: `in-${k.replace(/\W+/g, "-")}` });
    const actions = div("input-actions");
    const send = el("button", "button button-primary");
    send.type = "submit";
    send.textContent = "Send answer";
    const status = el("span", "input-status");
    status.setAttribute("aria-live", "polite");
    actions.append(send, status);
    box.append(prompt, fieldsEl, actions);
    if (typeof e.expires_at === "number") {
      const deadline = el("p", "input-deadline");
      deadline.setAttribute("aria-live", "off");
      box.insertBefore(deadline, actions);
      this.deadlines.set(k, { at: e.expires_at, node: deadline });
      this.#showDeadline(this.deadlines.get(k));
    }
    box.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const { values, problems } = readValues(form);
      showProblems(form, problems);
      if (Object.keys(problems).length) return;
      send.disabled = true;
      status.textContent = "Sending…";
      try {
        await this.hooks.onAnswer?.(values, e);
        status.textContent = "Sent — the run continues.";
        box.classList.add("is-sent");
      } catch (err) {
        // 422 invalid_answer: the run keeps waiting, the problems go to their fields ("" is the
        // answer as a whole). 409 not_waiting_input: the question is gone; say so.
        const closed = err.code === "not_waiting_input";
        send.disabled = closed;
        const fields = err.fields || {};
        let message = err.message || "Could not send the answer.";
        if (form.single) {
          showProblems(form, { answer: fields[""] ?? firstValue(fields) ?? "" });
        } else {
          // a problem at a field of the form goes there; the others (the answer as a whole, a
          // nested field) are said next to the button
          const at = Object.entries(fields).filter(([name]) => form.fields.has(name));
          showProblems(form, Object.fromEntries(at));
          const rest = Object.entries(fields).filter(([name]) => !form.fields.has(name));
          if (rest.length) message += ` (${rest.map(([n, p]) => (n ? `${n}: ${p}` : p)).join("; ")})`;
        }
        status.textContent = message;
        box.classList.toggle("is-closed", closed);
      }
    });
    const place = this.#place(e, row);
    place.inputEl.append(box); // in place: in the map item (and its stage) that asks
    if (place.statusEl) place.statusEl.textContent = "Waiting for you";
    this.inputs.set(k, box);
    row.root.dataset.awaiting = "input";
    this.#setRunStatus("waiting_input");
  }

  #stageEnd(e) {
    const row = this.#row(e);
    if (!row) return;
    this.#resumeIfWaiting(e);
    if (typeof e.progress === "number") this.#setProgress(Math.max(this.progress, e.progress));
    if (isTop(e)) {
      row.durationMs = e.duration_ms;
      this.#setStatus(row, e.status);
      row.timeEl.textContent = seconds(e.duration_ms);
      if (e.status === "succeeded") this.outputs.set(e.stage, e.output);
      showUsage(row.usageEl, e.usage, row.plan.kind);
      if (row.plan.fan_out && row.total != null && e.status === "succeeded") {
        this.#setCount(row, row.total, row.total);
      }
      if (row.plan.fan_out) this.#settleItems(row, e, e.status === "succeeded" ? "succeeded" : e.status, true);
      if (!row.plan.fan_out) this.#showOutput(e, row);
      if (Array.isArray(e.citations)) {
        this.citations = e.citations;
        const box = this.streams.get(key(e.path))?.box ?? row.bodyEl;
        this.#linkCitations(box, e.citations);
      }
    } else if (isPart(e)) {
      // a stage inside a map item that runs several: the item is done when the map says so
      if (!this.parts.has(key(e.path)) && e.status === "skipped") return; // never started: no place
      const item = this.#item(e, row);
      const part = this.#part(e, item);
      setStatus(part.root, e.status, part.statusEl);
      part.timeEl.textContent = seconds(e.duration_ms);
      part.usage = e.usage;
      showUsage(part.usageEl, e.usage, e.kind ?? "llm");
      showUsage(item.usageEl, sumUsage([...item.parts.values()].map((x) => x.usage)), "llm");
      if (e.status === "failed" || e.status === "cancelled") setStatus(item.root, e.status, item.statusEl);
      this.#showOutput(e, row);
    } else {
      const item = this.#item(e, row);
      setStatus(item.root, e.status, item.statusEl);
      item.timeEl.textContent = seconds(e.duration_ms);
      showUsage(item.usageEl, e.usage, e.kind ?? "llm");
      item.durationMs = e.duration_ms;
      this.#showOutput(e, row);
    }
    if (e.error) {
      const note = el("p", "note note-error");
      const where = isTop(e) ? "" : `Item ${Number(e.path[1]) + 1}: `;
      note.textContent = `${where}${e.error.message || e.error.type}`;
      row.notesEl.append(note);
    }
  }

  #runEnd(e) {
    clearInterval(this.timer);
    this.runEndMs = e.duration_ms;
    for (const row of this.stages.values()) {
      if (row.root.dataset.status === "waiting" || row.root.dataset.status === "running") {
        // Stages that never started: cancelled with the run, or not reached after a failure.
        this.#setStatus(row, e.status === "cancelled" ? "cancelled" : "skipped");
        if (!row.durationMs) row.timeEl.textContent = "";
      }
    }
    for (const box of this.inputs.values()) box.remove();
    this.inputs.clear();
    if (e.status === "succeeded") this.#setProgress(1);
    this.#setRunStatus(e.status);
    this.elapsedEl.textContent = seconds(e.duration_ms);
    this.cancelEl.hidden = true;
    if (e.error) this.showError(`The run failed${e.error.stage ? ` in “${e.error.stage}”` : ""}: ${e.error.message}`);
    const parts = [`${seconds(e.duration_ms)}`];
    const usage = usageText(e.usage, "llm");
    if (usage) parts.push(usage);
    this.metaEl.append(meta("Took", parts.join(" · ")));
    if (e.status === "succeeded") this.#renderOutputs(e.outputs);
    this.deadlines.clear();
    this.#setFollowing(this.following); // the button now offers the result
  }

  // -- parts -------------------------------------------------------------------------------

  #addStage(step) {
    if (this.stages.has(step.stage)) return;
    const root = el("li", "stage");
    root.dataset.stage = step.stage;
    root.dataset.kind = step.kind;
    const head = div("stage-head");
    const icon = el("span", "stage-icon");
    icon.setAttribute("aria-hidden", "true");
    const titles = div("stage-titles");
    const label = el("h3", "stage-label");
    label.textContent = step.label || step.stage;
    const kind = el("span", "stage-kind");
    kind.textContent = step.fan_out ? `${step.kind} · parallel` : step.kind;
    titles.append(label, kind);
    const metaEl = div("stage-meta");
    const countEl = el("span", "stage-count");
    const statusEl = el("span", "stage-status");
    const usageEl = el("span", "stage-usage");
    const timeEl = el("span", "stage-time");
    metaEl.append(countEl, statusEl, usageEl, timeEl);
    head.append(icon, titles, metaEl);
    root.append(head);

    const row = { root, plan: step, statusEl, timeEl, countEl, usageEl, total: null, startTs: null, durationMs: null };
    if (step.fan_out) {
      row.barEl = progressbar(null, `${step.label || step.stage}: items done`);
      row.barEl.classList.add("bar-small");
      root.append(row.barEl);
    }
    row.notesEl = div("stage-notes");
    row.inputEl = div("stage-input");
    row.bodyEl = div("stage-body");
    if (step.fan_out) {
      row.itemsEl = el("ol", "items");
      row.bodyEl.append(row.itemsEl);
    }
    // Sources are folded to their count (they would fill the viewport); a click, or following
    // a citation, unfolds them.
    row.sourcesEl = el("details", "sources");
    row.sourcesEl.hidden = true;
    row.sourcesEl.open = false;
    const summary = el("summary");
    row.sourcesCount = el("span", "sources-count");
    summary.append(row.sourcesCount);
    row.sourcesEl.append(summary);
    row.outputEl = div("stage-output");
    root.append(row.notesEl, row.inputEl, row.bodyEl, row.sourcesEl, row.outputEl);
    this.stages.set(step.stage, row);
    this.#setStatus(row, "waiting");
    this.stagesEl.append(root);
  }

  #row(e) {
    const id = e.stage ?? (Array.isArray(e.path) ? e.path[0] : null);
    if (id == null) return null;
    if (!this.stages.has(id)) {
      // Not in the plan (should not happen in protocol v1): draw it anyway rather than drop it.
      this.#addStage({ stage: id, label: e.label || id, kind: e.kind || "stage", fan_out: false });
    }
    return this.stages.get(id);
  }

  #item(e, row) {
    const k = key(e.path.slice(0, 2));
    let item = this.items.get(k);
    if (item) return item;
    const root = el("li", "item");
    root.dataset.path = k;
    const head = div("item-head");
    const name = el("span", "item-name");
    const index = Number(e.path[1]);
    name.textContent = `#${index + 1}`;
    head.append(name);
    // Named by its item (the value the map gave it), when the page has seen that value.
    const value = this.#mapItems(row, e.total)?.[index];
    // a number that is only the item's position (a map over range(n)) names nothing
    const full = typeof value === "number" && (value === index || value === index + 1) ? "" : describeItem(value);
    if (full) {
      const title = el("span", "item-title");
      title.textContent = full.length > ITEM_LABEL_MAX ? `${full.slice(0, ITEM_LABEL_MAX - 1)}…` : full;
      title.title = full;
      head.append(title);
      root.dataset.label = title.textContent;
    }
    const statusEl = el("span", "item-status");
    const usageEl = el("span", "item-usage");
    const timeEl = el("span", "item-time");
    const metaEl = div("item-meta");
    metaEl.append(statusEl, usageEl, timeEl);
    head.append(metaEl);
    const inputEl = div("stage-input");
    root.append(head, inputEl);
    item = { root, statusEl, timeEl, usageEl, inputEl, index, parts: new Map(), startTs: null, durationMs: null, startSeq: e.seq ?? 0 };
    setStatus(root, "waiting", statusEl);
    // keep items in index order even when they start out of order
    const after = [...row.itemsEl.children].find((c) => Number(c.dataset.index) > index);
    root.dataset.index = String(index);
    row.itemsEl.insertBefore(root, after || null);
    this.items.set(k, item);
    return item;
  }

  /** The place of a stage inside a map item that runs several stages: a labelled part. */
  #part(e, item) {
    const k = key(e.path);
    let part = this.parts.get(k);
    if (part) return part;
    const root = div("part");
    root.dataset.path = k;
    root.dataset.stagePart = String(e.path.slice(2).join("/"));
    const head = div("part-head");
    const label = el("span", "part-label");
    label.textContent = e.label || String(e.path[e.path.length - 1]);
    const statusEl = el("span", "part-status");
    const usageEl = el("span", "item-usage");
    const timeEl = el("span", "item-time");
    const metaEl = div("item-meta");
    metaEl.append(statusEl, usageEl, timeEl);
    head.append(label, metaEl);
    const inputEl = div("stage-input");
    const bodyEl = div("part-body");
    root.append(head, inputEl, bodyEl);
    item.root.append(root);
    part = { root, statusEl, usageEl, timeEl, inputEl, bodyEl, startTs: null, startSeq: e.seq ?? 0, usage: null };
    setStatus(root, "waiting", statusEl);
    item.parts.set(k, part);
    this.parts.set(k, part);
    return part;
  }

  /** Where a path's text, output and questions go: the stage, its map item, or a part of it. */
  #place(e, row) {
    if (isTop(e)) return row;
    const item = this.#item(e, row);
    if (!isPart(e)) return { bodyEl: item.root, inputEl: item.inputEl };
    return this.#part(e, item);
  }

  /**
   * Items of a map whose stages (several per item) all ended well are done; at the map's end
   * (`final`) every item still open takes the map's status.
   */
  #settleItems(row, e, status, final = false) {
    for (const item of this.items.values()) {
      if (item.root.parentElement !== row.itemsEl || !item.parts.size) continue;
      const state = item.root.dataset.status;
      if (state !== "running" && state !== "waiting") continue;
      const open = [...item.parts.values()].some((p) => ["running", "waiting"].includes(p.root.dataset.status));
      if (open && !final) continue;
      if (this.inputs.size && [...this.inputs.keys()].some((k) => k.startsWith(`${item.root.dataset.path}/`))) continue;
      setStatus(item.root, final ? status : "succeeded", item.statusEl);
      if (item.startTs && typeof e.ts === "number") item.timeEl.textContent = seconds(e.ts - item.startTs);
    }
  }

  #stream(e, row) {
    const k = key(e.path);
    let stream = this.streams.get(k);
    if (stream) return stream;
    const box = div("stream is-empty");
    box.dataset.path = k;
    box.setAttribute("aria-live", "off");
    const node = document.createTextNode("");
    box.append(node);
    stream = { box, node, attempt: e.attempt ?? 1 };
    this.#place(e, row).bodyEl.append(box);
    this.streams.set(k, stream);
    return stream;
  }

  #showOutput(e, row) {
    if (e.status !== "succeeded") return;
    const out = e.output;
    const k = key(e.path);
    const stream = this.streams.get(k);
    if (row.plan.kind === "split" && Array.isArray(out)) {
      // The chunks are the stage's sources; a count is enough here, if there are no cards.
      if (!row.sourcesEl.hidden) return;
      row.outputEl.textContent = `${out.length} ${out.length === 1 ? "part" : "parts"}`;
      row.outputEl.classList.add("stage-output-quiet");
      return;
    }
    if (out === null || out === undefined) return;
    let box = stream?.box;
    if (!box) {
      box = div("stream");
      box.dataset.path = k;
      this.#place(e, row).bodyEl.append(box);
    }
    box.classList.remove("is-empty");
    box.classList.add("is-final");
    if (typeof out === "string") {
      box.classList.add("md");
      box.replaceChildren(renderMarkdown(out));
    } else {
      box.classList.add("is-json");
      box.replaceChildren(jsonBlock(out));
    }
    box.scrollTop = 0; // the finished text is read from its start
  }

  /** Turn each `[n]` in the text under `root` into a link to the source card it cites. */
  #linkCitations(root, citations) {
    const byMarker = new Map(citations.map((c) => [c.marker, c]));
    const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
    const nodes = [];
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
      if (/\[\d/.test(n.data) && !n.parentElement?.closest("a, code, pre")) nodes.push(n);
    }
    for (const node of nodes) {
      const parts = node.data.split(/(\[\d{1,4}(?:\s*,\s*\d{1,4})*\])/);
      if (parts.length === 1) continue;
      const frag = document.createDocumentFragment();
      for (const part of parts) {
        const m = /^\[([\d,\s]+)\]$/.exec(part);
        if (!m) {
          if (part) frag.append(document.createTextNode(part));
          continue;
        }
        const numbers = m[1].split(",").map((x) => Number(x.trim()));
        numbers.forEach((marker, i) => {
          const c = byMarker.get(marker);
          const card = c && c.source_id != null ? this.sourceCards.get(`${c.stage}\u0000${c.source_id}`) : null;
          if (card) {
            const a = el("a", "citation");
            a.href = `#${card.id}`;
            a.textContent = `[${marker}]`;
            a.title = card.querySelector(".source-title")?.textContent || c.source_id;
            a.addEventListener("click", (ev) => {
              ev.preventDefault();
              if (LIVE.includes(this.status)) this.#setFollowing(false); // the reader looks back
              const details = card.closest("details");
              if (details) details.open = true;
              card.scrollIntoView({ block: "nearest", behavior: "smooth" });
              card.classList.remove("is-cited");
              void card.offsetWidth; // restart the highlight
              card.classList.add("is-cited");
            });
            frag.append(a);
          } else {
            const span = el("span", "citation citation-unmatched");
            span.textContent = `[${marker}]`;
            span.title = "This marker matches no source the stage was given.";
            frag.append(span);
          }
          if (i < numbers.length - 1) frag.append(document.createTextNode(" "));
        });
      }
      node.replaceWith(frag);
    }
  }

  #renderOutputs(outputs) {
    const o = this.outputsEl;
    o.replaceChildren();
    const h = el("h2", "outputs-title");
    h.textContent = "Result";
    o.append(h);
    const named = outputs && typeof outputs === "object" && !Array.isArray(outputs);
    const entries = named ? Object.entries(outputs) : [["output", outputs]];
    for (const [name, value] of entries) {
      const block = el("section", "output");
      block.dataset.output = name;
      const title = el("h3", "output-name");
      title.textContent = humanize(name);
      block.append(title, renderValue(value));
      if (this.citations) this.#linkCitations(block, this.citations);
      o.append(block);
    }
    o.hidden = false;
  }

  // -- state -------------------------------------------------------------------------------

  #setStatus(row, status) {
    setStatus(row.root, status, row.statusEl);
  }

  #setCount(row, completed, total) {
    row.total = total;
    row.countEl.textContent = `${completed} / ${total}`;
    if (row.barEl) setBar(row.barEl, total ? completed / total : 0);
  }

  #setProgress(fraction) {
    this.progress = Math.min(1, Math.max(0, fraction));
    setBar(this.barEl, this.progress);
    this.percentEl.textContent = `${Math.round(this.progress * 100)}%`;
  }

  #setRunStatus(status) {
    this.status = status;
    this.root.dataset.runStatus = status;
    this.pillEl.dataset.status = status;
    this.pillEl.textContent = RUN_STATUS_TEXT[status] || status;
    this.cancelEl.hidden = !LIVE.includes(status);
  }

  #resumeIfWaiting(e) {
    const k = key(e.path);
    const box = this.inputs.get(k);
    if (box && (e.type !== "stage-start" || isTop(e))) {
      box.remove();
      this.inputs.delete(k);
      this.deadlines.delete(k);
      const row = this.stages.get(e.stage);
      const asking = [...this.inputs.keys()].some((other) => other.split("/")[0] === e.stage);
      if (row && !asking) delete row.root.dataset.awaiting;
    }
    if (this.status === "waiting_input" && this.inputs.size === 0) this.#setRunStatus("running");
  }

  #tick() {
    const now = Date.now();
    if (this.runStartTs && this.runEndMs == null) this.elapsedEl.textContent = seconds(now - this.runStartTs);
    for (const row of this.stages.values()) {
      if (row.root.dataset.status === "running" && row.startTs) row.timeEl.textContent = seconds(now - row.startTs);
    }
    for (const item of this.items.values()) {
      if (item.root.dataset.status === "running" && item.startTs) item.timeEl.textContent = seconds(now - item.startTs);
    }
    for (const part of this.parts.values()) {
      if (part.root.dataset.status === "running" && part.startTs) part.timeEl.textContent = seconds(now - part.startTs);
    }
    for (const d of this.deadlines.values()) this.#showDeadline(d, now);
  }

  #showDeadline(d, now = Date.now()) {
    const left = Math.max(0, Math.ceil((d.at - now) / 1000));
    d.node.dataset.secondsLeft = String(left);
    d.node.textContent = left > 0 ? `Answer within ${clock(left)}` : "Time is up: the run goes on without your answer.";
    d.node.classList.toggle("is-late", left <= 10);
  }

  /** The items a map stage iterates over, when one of the stages it needs gave a list. */
  #mapItems(row, total) {
    if (row.items !== undefined) return row.items;
    const lists = (row.plan.needs || []).map((id) => this.outputs.get(id)).filter(Array.isArray);
    row.items = lists.find((list) => list.length >= (total ?? 0)) ?? null;
    return row.items;
  }

  // -- following ---------------------------------------------------------------------------

  #setFollowing(on) {
    this.following = on;
    this.root.dataset.following = String(on);
    this.followEl.hidden = on;
    this.followEl.textContent = LIVE.includes(this.status) ? "Follow the run ↓" : "Show the result ↓";
    if (on) {
      this.userScrollAt = -Infinity; // the click that asked for it is no scroll away
      this.#follow();
    }
  }

  #queueFollow() {
    if (!this.following || this.followQueued) return;
    this.followQueued = true;
    requestAnimationFrame(() => {
      this.followQueued = false;
      if (this.following) this.#follow();
    });
  }

  /** What to keep in view: a question waiting, the stage that started last, the result. */
  #followTarget() {
    if (!this.outputsEl.hidden) return this.outputsEl;
    const asking = [...this.inputs.values()].at(-1);
    if (asking) return asking;
    let row = null;
    for (const r of this.stages.values()) {
      if (r.root.dataset.status === "running" && (!row || (r.startSeq ?? 0) >= (row.startSeq ?? 0))) row = r;
    }
    if (!row) return this.target?.isConnected ? this.target : null;
    if (!row.plan.fan_out) return row.root;
    // a map: the whole stage when it fits, else its first running item
    const room = innerHeight - this.barWrap.offsetHeight - 24;
    if (row.root.offsetHeight <= room) return row.root;
    const item = row.itemsEl.querySelector('.item[data-status="running"]');
    if (!item) return row.root;
    if (item.offsetHeight <= room) return item;
    const parts = [...item.querySelectorAll(':scope > .part[data-status="running"]')];
    return parts.at(-1) || item;
  }

  #follow() {
    const target = this.#followTarget();
    if (!target || this.root.hidden) return;
    this.target = target;
    const top = this.barWrap.offsetHeight + 12; // below the sticky run bar
    const bottom = innerHeight - 12;
    const r = target.getBoundingClientRect();
    let dy = 0;
    // the result is read from its start; a stage is only brought (wholly, if it fits) into view
    if (target === this.outputsEl || r.top < top || r.height > bottom - top) dy = r.top - top;
    else if (r.bottom > bottom) dy = r.bottom - bottom;
    if (Math.abs(dy) >= 1) {
      scrollBy({ top: dy, behavior: "instant" });
      this.ownScrollY = scrollY;
    }
  }

  async #cancel() {
    this.cancelEl.disabled = true;
    this.cancelEl.textContent = "Cancelling…";
    try {
      await this.hooks.onCancel?.();
    } catch (err) {
      this.cancelEl.disabled = false;
      this.cancelEl.textContent = "Cancel run";
      this.showError(err.message || "Could not cancel the run.");
    }
  }
}

// -- helpers ---------------------------------------------------------------------------------

function renderValue(value) {
  if (typeof value === "string") {
    const box = div("md");
    box.append(renderMarkdown(value));
    return box;
  }
  if (Array.isArray(value) && value.every((v) => typeof v === "string")) {
    const list = el("ul", "md-list");
    for (const v of value) {
      const li = el("li");
      li.append(renderMarkdown(v));
      list.append(li);
    }
    return list;
  }
  if (value === null || value === undefined) {
    const p = el("p", "muted");
    p.textContent = "(none)";
    return p;
  }
  if (typeof value !== "object") {
    const p = el("p", "output-scalar");
    p.textContent = String(value);
    return p;
  }
  return jsonBlock(value);
}

/**
 * A JSON value shown readably (objects as labelled fields, lists as lists, strings as safe
 * Markdown), with a button that shows it raw (`pre.json`, always in the DOM) instead.
 */
function jsonBlock(value) {
  const wrap = div("json-block");
  const pretty = div("json-pretty");
  pretty.append(renderData(value, 0));
  const raw = el("pre", "json");
  raw.textContent = JSON.stringify(value, null, 2);
  raw.hidden = true;
  const toggle = el("button", "button button-quiet button-small json-toggle");
  toggle.type = "button";
  toggle.dataset.action = "raw";
  toggle.textContent = "Raw JSON";
  toggle.setAttribute("aria-pressed", "false");
  toggle.addEventListener("click", () => {
    const showRaw = raw.hidden;
    raw.hidden = !showRaw;
    pretty.hidden = showRaw;
    toggle.textContent = showRaw ? "Formatted" : "Raw JSON";
    toggle.setAttribute("aria-pressed", String(showRaw));
  });
  wrap.append(toggle, pretty, raw);
  return wrap;
}

function renderData(value, depth) {
  if (value === null || value === undefined) {
    const span = el("span", "json-null");
    span.textContent = "none";
    return span;
  }
  if (typeof value === "string") {
    if (!value.includes("\n") && value.length <= 200) {
      const span = el("span", "json-string");
      span.textContent = value;
      return span;
    }
    const box = div("md json-text");
    box.append(renderMarkdown(value));
    return box;
  }
  if (typeof value !== "object") {
    const span = el("span", "json-scalar");
    span.textContent = String(value);
    return span;
  }
  if (depth >= 6) {
    const pre = el("pre", "json json-deep");
    pre.textContent = JSON.stringify(value, null, 2);
    return pre;
  }
  if (Array.isArray(value)) {
    if (!value.length) {
      const span = el("span", "json-null");
      span.textContent = "(empty list)";
      return span;
    }
    const list = el(value.every((v) => v === null || typeof v !== "object") ? "ul" : "ol", "json-list");
    for (const v of value) {
      const li = el("li");
      li.append(renderData(v, depth + 1));
      list.append(li);
    }
    return list;
  }
  const entries = Object.entries(value);
  if (!entries.length) {
    const span = el("span", "json-null");
    span.textContent = "(empty)";
    return span;
  }
  const dl = el("dl", "json-object");
  for (const [k, v] of entries) {
    const dt = el("dt");
    dt.textContent = humanize(k);
    dt.title = k;
    const dd = el("dd");
    dd.append(renderData(v, depth + 1));
    dl.append(dt, dd);
  }
  return dl;
}

/**
 * `usage {input_tokens, output_tokens, cost, reported}` as text: "1,234 in · 56 out · $0.0012".
 * `reported: false` means a model call did not report its usage: "usage unknown", never 0 (and
 * no cost, which cannot be known then); a null cost means the model has no prices: no cost
 * shown. Stages that called no model (0 and 0) show nothing. (A null count, which no server
 * sends, is treated as unreported too.)
 */
function usageText(usage, kind) {
  if (!usage || typeof usage !== "object") return "";
  const { input_tokens: tin, output_tokens: tout, cost } = usage;
  if (tin === undefined && tout === undefined) return "";
  const count = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "?");
  if (usage.reported === false || tin == null || tout == null) {
    if (kind !== "llm" && kind !== "map") return "";
    return !tin && !tout ? "usage unknown" : `${count(tin)} in · ${count(tout)} out · usage partly unknown`;
  }
  if (tin === 0 && tout === 0 && typeof cost !== "number") return "";
  const parts = [`${count(tin)} in`, `${count(tout)} out`];
  if (typeof cost === "number") parts.push(`$${cost.toFixed(4)}`);
  return parts.join(" · ");
}

/** The usage of several stages: counts added up, unknown when any part is unknown. */
function sumUsage(usages) {
  const known = usages.filter((u) => u && typeof u === "object" && "input_tokens" in u);
  if (!known.length) return null;
  const total = { input_tokens: 0, output_tokens: 0, cost: null, reported: true };
  for (const u of known) {
    for (const name of ["input_tokens", "output_tokens"]) total[name] += u[name] ?? 0;
    if (u.reported === false || u.input_tokens == null || u.output_tokens == null) total.reported = false;
    if (typeof u.cost === "number") total.cost = (total.cost ?? 0) + u.cost;
  }
  if (!total.reported) total.cost = null;
  return total;
}

function showUsage(node, usage, kind) {
  const text = usageText(usage, kind);
  node.textContent = text;
  node.title = text ? "tokens in, tokens out (and cost, when the model has prices)" : "";
  if (text === "usage unknown") node.title = "The provider did not report token usage.";
  node.dataset.usage = text === "usage unknown" ? "unknown" : text ? "known" : "none";
}

/** A short name for a map item: a title-like field, the first heading or line of its text. */
function describeItem(item) {
  if (item === null || item === undefined) return "";
  if (typeof item === "number" || typeof item === "boolean") return String(item);
  if (typeof item === "string") return firstLine(item);
  if (typeof item !== "object") return "";
  if (Array.isArray(item)) return item.length ? describeItem(item[0]) : "";
  for (const name of ["title", "name", "question", "heading", "label", "topic", "text", "content"]) {
    if (typeof item[name] === "string" && item[name].trim()) return firstLine(item[name]);
  }
  const first = Object.values(item).find((v) => typeof v === "string" && v.trim());
  return first ? firstLine(first) : "";
}

function firstLine(text) {
  const heading = /^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$/m.exec(text);
  const line = heading ? heading[1] : text.split("\n").find((l) => l.trim()) || "";
  return line.replace(/[*_`]+/g, "").replace(/\s+/g, " ").trim();
}

function clock(totalSeconds) {
  const m = Math.floor(totalSeconds / 60);
  const s = totalSeconds % 60;
  return m ? `${m}:${String(s).padStart(2, "0")}` : `${s} s`;
}

function progressbar(labelledBy, label) {
  const bar = div("bar");
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-valuenow", "0");
  if (labelledBy) bar.setAttribute("aria-labelledby", labelledBy);
  if (label) bar.setAttribute("aria-label", label);
  bar.append(div("bar-fill"));
  return bar;
}

function setBar(bar, fraction) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction)) * 100);
  bar.setAttribute("aria-valuenow", String(pct));
  bar.firstChild.style.width = `${Math.min(1, Math.max(0, fraction)) * 100}%`;
}

function setStatus(node, status, statusEl) {
  node.dataset.status = status;
  if (statusEl) statusEl.textContent = STATUS_TEXT[status] || status;
}

function meta(name, value) {
  const span = el("span", "meta");
  const k = el("span", "meta-key");
  k.textContent = name;
  const v = el("span", "meta-value");
  v.textContent = value;
  span.append(k, " ", v);
  return span;
}

function seconds(ms) {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) return "";
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  const m = Math.floor(ms / 60_000);
  return `${m} min ${Math.floor((ms % 60_000) / 1000)} s`;
}

function key(path) {
  return Array.isArray(path) ? path.join("/") : String(path ?? "");
}

function isTop(e) {
  return !Array.isArray(e.path) || e.path.length <= 1;
}

/** A stage inside a map item that runs several stages: `["interview", 0, "question"]`. */
function isPart(e) {
  return Array.isArray(e.path) && e.path.length > 2;
}

function firstValue(obj) {
  return obj && typeof obj === "object" ? Object.values(obj)[0] : String(obj ?? "");
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function div(className) {
  return el("div", className);
}
