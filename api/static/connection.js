// What the page needs from the server, on top of the project's JS client (/static/stagecast.js).
//
// stagecast.js does chains, runs, cancel and following (EventSource with automatic resume).
// Two small things it does not offer yet live here: answering an `input-required`
// (POST /v1/runs/{id}/input) and listing models (GET /v1/models, when a server has it).

import * as client from "./stagecast.js";

export const { listChains, getChain, startRun, cancelRun, getRun, StagecastError } = client;

/**
 * Follow a run from its first event (replay, then live) until `run-end`.
 * @returns {{close: () => void}}
 */
export function followRun(runId, { onEvent, onError }) {
  let sawEvent = false;
  return client.followRun("", runId, {
    onEvent: (event) => {
      sawEvent = true;
      onEvent(event);
    },
    onError: async () => {
      if (!sawEvent) onError(await explain(runId));
    },
  });
}

/** Answer a pending `input-required` (202), or throw with the reason (422). */
export async function answerInput(runId, answer) {
  const response = await fetch(`/v1/runs/${encodeURIComponent(runId)}/input`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ answer }),
  });
  if (response.ok) return;
  let info = {};
  try {
    info = (await response.json()).error || {};
  } catch {
    // not JSON: keep the status line
  }
  throw new StagecastError(response.status, info.code || "http_error", info.message || `HTTP ${response.status}`, info.details);
}

/** Models a server offers, or null when it has no models route. */
export async function listModels() {
  try {
    const response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
    if (!response.ok) return null;
    const data = await response.json();
    const list = Array.isArray(data) ? data : data?.models;
    if (!Array.isArray(list)) return null;
    const models = list.map((m) => (typeof m === "string" ? { name: m } : m)).filter((m) => m?.name);
    return models.length ? models : null;
  } catch {
    return null;
  }
}

/** Field problems of a 422 answer, keyed by input name (`inputs.document` -> `document`). */
export function fieldProblems(err) {
  const fields = err?.details?.fields;
  if (!fields || typeof fields !== "object") return null;
  const out = {};
  for (const [path, problem] of Object.entries(fields)) {
    out[path.replace(/^(body\.)?(inputs|answer)\.?/, "") || "answer"] = problem;
  }
  return out;
}

async function explain(runId) {
  try {
    await getRun("", runId);
    return "The run's event stream could not be opened; reload to try again.";
  } catch (err) {
    return err.status === 404
      ? `Run ${runId} is not known here any more (finished runs expire). Start a new one.`
      : err.message;
  }
}
