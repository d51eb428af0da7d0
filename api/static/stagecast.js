// stagecast.js — a tiny ES module client for the Stagecast HTTP API (event protocol v1).
//
//   import { startRun, followRun, cancelRun } from "/static/stagecast.js";
//
//   const run = await startRun("", { chain: "advanced_summary", inputs: { document }, model: "demo" });
//   const stream = followRun("", run.run_id, {
//     on: {
//       "run-start": (e) => drawPlan(e.plan),
//       "token": (e) => appendText(e.path, e.text),
//       "source": (e) => { sources.push(e); addCard(e.stage, e.source); },
//       "stage-end": (e) => {
//         setProgress(e.progress);
//         // llm stages given retrieved sources: [{marker, source, stage}], source null = unmatched
//         if (e.citations) linkMarkers(e.path, resolveCitations(e, sources));
//       },
//     },
//     onEvent: (e) => log(e),            // every known event, before its typed handler
//     onEnd: (runEnd) => done(runEnd),   // after run-end; the stream is closed by then
//     onError: (err) => warn(err),       // the run is unknown/expired, or the stream failed
//     onStatus: (s) => show(s),          // "open", "reconnecting" (resuming by itself),
//                                        // "ended" (after run-end), "closed" (gave up)
//   });
//   stream.close();                      // stop watching (the run goes on)
//   await cancelRun("", run.run_id);     // stop the run (it ends `cancelled`)
//   // answer an input-required event e (202; 422 invalid_answer, see answerProblems; 409)
//   await answerInput("", run.run_id, { stage: e.stage, path: e.path, value: answer });
//
// baseUrl is "" for the same origin, else e.g. "http://127.0.0.1:8000".
// Resume: followRun uses EventSource, which reconnects by itself and sends Last-Event-ID, so
// nothing is lost or doubled (events carry `seq`; anything at or below the last seen seq is
// dropped as a safety net). Pass `after` to start after a known seq (e.g. from a status call).
// Unknown event types are ignored, as the protocol asks. With API keys, pass `apiKey` in the
// options (sent as a Bearer header on fetch, as `?api_key=` on the EventSource URL).
// Errors from fetch calls throw StagecastError {status, code, message, details}.
//
// Types: stagecast.d.ts beside this file declares every event, every HTTP body and these
// functions (generated from the committed JSON Schemas); editors pick it up for this module, and
// the typedefs below bring the types into this file's JSDoc.

/** @typedef {import("./stagecast.js").RunEvent} RunEvent */
/** @typedef {import("./stagecast.js").StageEnded} StageEnded */
/** @typedef {import("./stagecast.js").SourceFound} SourceFound */
/** @typedef {import("./stagecast.js").RunCreated} RunCreated */
/** @typedef {import("./stagecast.js").RunStatusModel} RunStatusModel */
/** @typedef {import("./stagecast.js").StartRunOptions} StartRunOptions */
/** @typedef {import("./stagecast.js").FollowOptions} FollowOptions */
/** @typedef {import("./stagecast.js").FollowHandle} FollowHandle */
/** @typedef {import("./stagecast.js").RecordingSummary} RecordingSummary */
/** @typedef {import("./stagecast.js").ClientOptions} ClientOptions */

export const EVENT_TYPES = Object.freeze([
  "run-start",
  "stage-start",
  "token",
  "source",
  "stage-progress",
  "stage-retry",
  "input-required",
  "stage-end",
  "run-end",
]);

/**
 * The citations of a `stage-end` with the source events they point at.
 *
 * `stageEnd.citations` is `[{marker, source_id, stage}]` for an llm stage that was given
 * retrieved sources (null otherwise); `sourceEvents` are the `source` events seen so far.
 * Returns `[{marker, stage, source}]` in marker order of appearance, `source` being the source
 * object of that stage and id, or null for a marker that matches no source (an unmatched `[7]`).
 */
/**
 * @param {StageEnded | null | undefined} stageEnd
 * @param {SourceFound[]} sourceEvents
 */
export function resolveCitations(stageEnd, sourceEvents) {
  if (!stageEnd || !Array.isArray(stageEnd.citations)) return [];
  const byKey = new Map();
  for (const e of sourceEvents || []) {
    if (e && e.source) byKey.set(`${e.stage}\u0000${e.source.id}`, e.source);
  }
  return stageEnd.citations.map((c) => ({
    marker: c.marker,
    stage: c.stage,
    source: c.source_id == null ? null : byKey.get(`${c.stage}\u0000${c.source_id}`) ?? null,
  }));
}

export class StagecastError extends Error {
  constructor(status, code, message, details) {
    super(message);
    this.name = "StagecastError";
    this.status = status;
    this.code = code;
    this.details = details || {};
  }
}

function url(baseUrl, path) {
  return (baseUrl || "").replace(/\/+$/, "") + path;
}

async function request(baseUrl, method, path, body, apiKey) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (apiKey) headers["Authorization"] = `Bearer ${apiKey}`;
  const response = await fetch(url(baseUrl, path), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const err = (data && data.error) || {};
    throw new StagecastError(
      response.status,
      err.code || "http_error",
      err.message || `${response.status} ${response.statusText}`,
      err.details,
    );
  }
  return data;
}

/**
 * List the chains: [{id, title, description, version, file, error}].
 * @param {string} baseUrl
 * @param {ClientOptions} [options]
 */
export async function listChains(baseUrl, { apiKey } = {}) {
  return (await request(baseUrl, "GET", "/v1/chains", undefined, apiKey)).chains;
}

/**
 * One chain: {..., inputs_schema, plan}.
 * @param {string} baseUrl
 * @param {string} chainId
 * @param {ClientOptions} [options]
 */
export async function getChain(baseUrl, chainId, { apiKey } = {}) {
  return request(baseUrl, "GET", `/v1/chains/${encodeURIComponent(chainId)}`, undefined, apiKey);
}

/**
 * Start a run: resolves to {run_id, status, events_url, status_url, cancel_url}. With `reuse`
 * ({run_id} or {recording}, and `from`), unchanged stages of that earlier run are reused.
 * @param {string} baseUrl
 * @param {StartRunOptions} options
 * @returns {Promise<RunCreated>}
 */
export async function startRun(baseUrl, { chain, inputs = {}, model, onDisconnect, reuse, apiKey }) {
  /** @type {Record<string, unknown>} */
  const body = { chain, inputs };
  if (model) body.model = model;
  if (onDisconnect) body.on_disconnect = onDisconnect;
  if (reuse) body.reuse = reuse;
  return request(baseUrl, "POST", "/v1/runs", body, apiKey);
}

/**
 * The recordings the server can replay (`stagecast serve --recordings DIR`).
 * @param {string} baseUrl
 * @param {ClientOptions} [options]
 * @returns {Promise<RecordingSummary[]>}
 */
export async function listRecordings(baseUrl, { apiKey } = {}) {
  return (await request(baseUrl, "GET", "/v1/recordings", undefined, apiKey)).recordings;
}

/**
 * Serve a recording as a new live run (follow it like any run: followRun, cancelRun).
 * @param {string} baseUrl
 * @param {string} recording a name from listRecordings
 * @param {ClientOptions & {speed?: number | "max"}} [options]
 * @returns {Promise<RunCreated>}
 */
export async function startReplay(baseUrl, recording, { speed, apiKey } = {}) {
  const body = speed === undefined ? { recording } : { recording, speed };
  return request(baseUrl, "POST", "/v1/replays", body, apiKey);
}

/**
 * A run's status: {status, stages, outputs, usage, last_seq, ...}.
 * @param {string} baseUrl
 * @param {string} runId
 * @param {ClientOptions} [options]
 */
export async function getRun(baseUrl, runId, { apiKey } = {}) {
  return request(baseUrl, "GET", `/v1/runs/${encodeURIComponent(runId)}`, undefined, apiKey);
}

/**
 * Cancel a run (idempotent).
 * @param {string} baseUrl
 * @param {string} runId
 * @param {ClientOptions} [options]
 */
export async function cancelRun(baseUrl, runId, { apiKey } = {}) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/cancel`;
  return request(baseUrl, "POST", path, undefined, apiKey);
}

/**
 * Answer a run's pending `input-required` event: `POST /v1/runs/{id}/input` with
 * `{stage, path, value}` (the event's `stage` and `path`, and the answer). Resolves on 202;
 * throws StagecastError: 422 `invalid_answer` (the run keeps waiting; `details.fields` maps
 * `value` or `value.<field>` to the problem, see answerProblems) or 409 `not_waiting_input`.
 * @param {string} baseUrl
 * @param {string} runId
 * @param {{stage: string, path?: (string | number)[] | null, value: unknown}} answer
 * @param {ClientOptions} [options]
 */
export async function answerInput(baseUrl, runId, { stage, path, value }, { apiKey } = {}) {
  const url_ = `/v1/runs/${encodeURIComponent(runId)}/input`;
  return request(baseUrl, "POST", url_, { stage, path: path ?? null, value }, apiKey);
}

/**
 * The problems of a refused answer by answer field: `{"value.count": "required"}` ->
 * `{count: "required"}`, a bare `value` (the answer as a whole) -> `{"": problem}`.
 * Returns null when the error names no fields.
 */
export function answerProblems(err) {
  const fields = err && err.details && err.details.fields;
  if (!fields || typeof fields !== "object") return null;
  const out = {};
  for (const [where, problem] of Object.entries(fields)) {
    const m = /^(?:body\.)?value(?:\.(.+))?$/.exec(where);
    if (m) out[m[1] ?? ""] = problem;
  }
  return Object.keys(out).length ? out : null;
}

/**
 * The models a server offers: [{name, description, usable, ...}] (never a secret).
 * @param {string} baseUrl
 * @param {ClientOptions} [options]
 */
export async function listModels(baseUrl, { apiKey } = {}) {
  const data = await request(baseUrl, "GET", "/v1/models", undefined, apiKey);
  return data.models;
}

/**
 * Follow a run's events with EventSource (replay, then live; automatic resume).
 * Returns {close(), get lastSeq(), get closed()}.
 * @param {string} baseUrl
 * @param {string} runId
 * @param {FollowOptions} [options]
 * @returns {FollowHandle}
 */
export function followRun(baseUrl, runId, options = {}) {
  const { on = {}, onEvent, onEnd, onError, onStatus, after, apiKey } = options;
  const params = new URLSearchParams();
  if (after) params.set("after", String(after));
  if (apiKey) params.set("api_key", apiKey);
  const query = params.toString();
  const path = `/v1/runs/${encodeURIComponent(runId)}/events${query ? `?${query}` : ""}`;
  const source = new EventSource(url(baseUrl, path));
  let lastSeq = after || 0;
  let closed = false;

  function close() {
    if (!closed) {
      closed = true;
      source.close();
    }
  }

  function handle(message) {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    if (typeof event.seq !== "number" || event.seq <= lastSeq) return;
    lastSeq = event.seq;
    if (onEvent) onEvent(event);
    const typed = on[event.type];
    if (typed) typed(event);
    if (event.type === "run-end") {
      close(); // without this EventSource would reconnect after the server ends the stream
      if (onStatus) onStatus("ended");
      if (onEnd) onEnd(event);
    }
  }

  for (const type of EVENT_TYPES) source.addEventListener(type, handle);
  source.onopen = () => {
    if (onStatus) onStatus("open");
  };
  source.onerror = () => {
    if (onStatus && !closed) {
      onStatus(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
    }
    // readyState CONNECTING: EventSource is resuming by itself. CLOSED: it gave up (the run is
    // unknown or expired: 404, or the server answered 204 after the end).
    if (source.readyState === EventSource.CLOSED && !closed) {
      closed = true;
      if (onError) onError(new StagecastError(0, "stream_closed", "the event stream closed"));
    }
  };

  return {
    close,
    get lastSeq() {
      return lastSeq;
    },
    get closed() {
      return closed;
    },
  };
}
