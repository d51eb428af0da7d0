// What the page needs from the server, on top of the project's JS client (/static/stagecast.js).
//
// stagecast.js does chains, runs, models, cancel, answers and following (EventSource with
// automatic resume); this module binds it to the page's origin and explains stream errors.

import * as client from "./stagecast.js";

export const { listChains, getChain, startRun, cancelRun, getRun, StagecastError } = client;

/**
 * Follow a run from its first event (replay, then live) until `run-end`.
 * `onConnection(state)`: "connecting", "connected", "reconnecting" (the stream was cut;
 * EventSource resumes by itself after the last event it saw), "ended" (after run-end),
 * "lost" (it gave up: the run is unknown or expired).
 * @returns {{close: () => void}}
 */
export function followRun(runId, { onEvent, onError, onConnection }) {
  let sawEvent = false;
  onConnection?.("connecting");
  return client.followRun("", runId, {
    onEvent: (event) => {
      sawEvent = true;
      onEvent(event);
    },
    onStatus: (status) => {
      const state = { open: "connected", reconnecting: "reconnecting", ended: "ended" }[status];
      onConnection?.(state || "lost");
    },
    onError: async () => {
      if (!sawEvent) onError(await explain(runId));
    },
  });
}

/**
 * Answer the `input-required` event `event` with `value` (202), or throw: the error's
 * `fields` maps an answer field to its problem ("" for the answer as a whole), from a 422
 * `invalid_answer`; a 409 `not_waiting_input` has only its message.
 */
export async function answerInput(runId, event, value) {
  try {
    return await client.answerInput("", runId, { stage: event.stage, path: event.path, value });
  } catch (err) {
    err.fields = client.answerProblems(err);
    throw err;
  }
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

/** Field problems of a 422 to POST /v1/runs, keyed by input name (`inputs.document` -> `document`). */
export function fieldProblems(err) {
  const fields = err?.details?.fields;
  if (!fields || typeof fields !== "object") return null;
  const out = {};
  for (const [path, problem] of Object.entries(fields)) {
    out[path.replace(/^(body\.)?inputs\.?/, "")] = problem;
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
