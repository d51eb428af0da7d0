// What the page needs from the server, on top of the project's JS client (/static/stagecast.js).
//
// stagecast.js does chains, runs, models, cancel, answers and following (EventSource with
// automatic resume); this module binds it to the page's origin and explains stream errors.

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
export function answerInput(runId, answer) {
  return client.answerInput("", runId, answer);
}

/** Models the server offers, or null when it cannot say (older server, error). */
export async function listModels() {
  try {
    const models = await client.listModels("");
    return Array.isArray(models) && models.length ? models : null;
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
