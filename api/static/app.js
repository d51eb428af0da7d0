// The Stagecast demo page: pick a chain, fill in its inputs, start a run and watch it.
//
//   GET  /v1/chains, /v1/chains/{id}   the chain picker and the generated input form
//   POST /v1/runs                      start a run; its id goes into the URL (/?run=<id>)
//   GET  /v1/runs/{id}/events          followed with EventSource (replay, then live; resumes
//                                      by itself after a cut, shown as the connection state)
//   POST /v1/runs/{id}/cancel | /input the cancel button and input-required forms
//   GET /v1/recordings, POST /v1/replays  "play a recording" (recordings.js), when there are any
//
// Plain ES modules, no build step. Server calls go through the project's JS client
// (stagecast.js, via connection.js); the run's live view is run-view.js; the form generator is
// schema-form.js; the safe Markdown renderer is markdown.js.

import { mountRecordings } from "./recordings.js";
import { RunView } from "./run-view.js";
import { buildFields, readValues, showProblems } from "./schema-form.js";
import {
  answerInput,
  cancelRun,
  fieldProblems,
  followRun,
  getChain,
  listChains,
  listModels,
  startRun,
} from "./connection.js";

const $ = (selector) => document.querySelector(selector);

const FALLBACK_MODELS = [
  { name: "demo", description: "The offline model at ~25 ms per token, to watch progress." },
  { name: "offline", description: "Deterministic placeholder text, instantly. No key, no network." },
  { name: "auto", description: "OpenAI when the server has a key, else the offline model." },
];

const state = {
  chains: [],
  chain: null, // the chain detail shown in the form
  form: null, // the generated fields
  runId: null,
  follower: null,
};

const view = new RunView($("#run"), {
  onCancel: () => cancelRun("", state.runId),
  onAnswer: (value, event) => answerInput(state.runId, event, value),
});

async function main() {
  $("#run-form").addEventListener("submit", onSubmit);
  $("#chain").addEventListener("change", () =>
    selectChain($("#chain").value).catch((err) => formError(`Could not load the chain: ${err.message}`)),
  );
  const params = new URLSearchParams(location.search);
  const runId = params.get("run");
  const models = loadModels();
  try {
    await loadChains(params.get("chain"));
  } catch (err) {
    formError(`Could not load the chains: ${err.message}`);
  }
  await models;
  await mountRecordings($("#run-form").parentElement, { onStarted: watchReplay });
  if (runId) watch(runId, { replay: true });
  document.body.dataset.ready = "true"; // the form is built (tests wait for this)
}

async function loadChains(preferred) {
  const chains = await listChains("");
  state.chains = chains;
  const select = $("#chain");
  select.replaceChildren();
  for (const c of chains) {
    const option = document.createElement("option");
    option.value = c.id;
    option.textContent = c.error ? `${c.title || c.id} (does not load)` : c.title || c.id;
    option.disabled = Boolean(c.error);
    select.append(option);
  }
  const usable = chains.filter((c) => !c.error);
  const pick = usable.find((c) => c.id === preferred) || usable[0];
  if (!pick) {
    formError("No chains are available on this server.");
    return;
  }
  select.value = pick.id;
  await selectChain(pick.id);
}

async function selectChain(id) {
  if (state.chain?.id === id) return;
  const form = $("#run-form");
  delete form.dataset.chain;
  state.chain = null;
  state.loading = id;
  const detail = await getChain("", id);
  if (state.loading !== id) return; // another chain was picked meanwhile
  state.chain = detail;
  $("#chain-description").textContent = detail.description || "";
  const plan = $("#chain-plan");
  plan.replaceChildren();
  for (const step of detail.plan || []) {
    const li = document.createElement("li");
    li.textContent = step.label || step.stage;
    if (step.fan_out) li.dataset.fanOut = "true";
    plan.append(li);
  }
  state.form = buildFields($("#inputs"), detail.inputs_schema, { idPrefix: "input" });
  form.dataset.chain = id; // the form shows this chain's inputs (tests wait for this)
  formError("");
}

async function loadModels() {
  // Without a models route on the server, offer the built-in names in a free text field.
  const offered = await listModels();
  const fallback = !offered;
  const models = offered || FALLBACK_MODELS;
  const field = $("#model-field");
  const old = $("#model");
  let control;
  if (fallback) {
    control = document.createElement("input");
    control.type = "text";
    control.value = "demo";
    control.setAttribute("list", "model-names");
    const list = document.createElement("datalist");
    list.id = "model-names";
    for (const m of models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.label = m.description || "";
      list.append(option);
    }
    field.append(list);
  } else {
    control = document.createElement("select");
    for (const m of models) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = m.description ? `${m.name} — ${m.description}` : m.name;
      control.append(option);
    }
    control.value = models.some((m) => m.name === "demo") ? "demo" : models[0].name;
  }
  control.id = "model";
  control.name = "model";
  control.setAttribute("aria-describedby", "model-hint");
  old.replaceWith(control);
}

async function onSubmit(event) {
  event.preventDefault();
  if (!state.chain || !state.form) return;
  const { values, problems } = readValues(state.form);
  showProblems(state.form, problems);
  if (Object.keys(problems).length) {
    formError("Please check the highlighted fields.");
    return;
  }
  const button = $("#start");
  button.disabled = true;
  formError("");
  try {
    const model = $("#model").value.trim() || undefined;
    const created = await startRun("", { chain: state.chain.id, inputs: values, model });
    history.replaceState(null, "", `?run=${encodeURIComponent(created.run_id)}`);
    watch(created.run_id, { replay: false });
  } catch (err) {
    const fields = fieldProblems(err);
    if (fields) showProblems(state.form, fields);
    formError(err.message);
  } finally {
    button.disabled = false;
  }
}

function watch(runId, { replay }) {
  state.follower?.close();
  state.runId = runId;
  view.reset(runId); // the view follows the run from here (until the reader scrolls away)
  state.follower = followRun(runId, {
    onConnection: (connection) => view.setConnection(connection),
    onEvent: (e) => {
      view.apply(e);
      if (e.type === "run-start") preselectChain(e.chain?.id);
    },
    onError: (message) => {
      view.showError(message);
      if (replay) {
        $("#run").dataset.runStatus = "unknown";
        history.replaceState(null, "", location.pathname);
      }
    },
  });
}

function watchReplay(runId) {
  history.replaceState(null, "", `?run=${encodeURIComponent(runId)}`);
  watch(runId, { replay: false });
}

function preselectChain(id) {
  if (!id || state.chain?.id === id) return;
  if (state.chains.some((c) => c.id === id && !c.error)) {
    $("#chain").value = id;
    selectChain(id).catch(() => {});
  }
}

function formError(message) {
  const box = $("#form-error");
  box.textContent = message || "";
  box.hidden = !message;
}

main();
