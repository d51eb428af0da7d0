// Runs one foreign SSE client against a Stagecast server and prints what it received, as JSON.
//   node clients.mjs eventsource      <server> <proxy> <body-json>
//   node clients.mjs fetch-event-source <server> <proxy> <body-json>
// eventsource (npm): the run is created at <server> with POST /v1/runs, then followed at
// <proxy>/v1/runs/{id}/events; the library reconnects with Last-Event-ID by itself.
// fetch-event-source: POST <proxy>/v1/runs?stream=true with an Idempotency-Key; the library
// re-sends the same POST (with Last-Event-ID) after every cut.
// Every dispatched message is recorded as it came, duplicates included: the test checks them.
import { EventSource } from "eventsource";
import { fetchEventSource } from "@microsoft/fetch-event-source";

const [which, server, proxy, bodyJson] = process.argv.slice(2);
const body = JSON.parse(bodyJson);
const seqs = [];
const types = [];
let empty = 0;
let opens = 0;
let errors = 0;
const deadline = setTimeout(() => finish("timeout"), 60000);

function finish(outcome) {
  clearTimeout(deadline);
  process.stdout.write(JSON.stringify({ outcome, seqs, types, empty, opens, errors }) + "\n");
  process.exit(0);
}

function record(data) {
  if (!data) {  // the documented client-side guard; counted, since the server should send none
    empty += 1;
    return null;
  }
  const event = JSON.parse(data);
  seqs.push(event.seq);
  types.push(event.type);
  return event;
}

if (which === "eventsource") {
  const created = await fetch(`${server}/v1/runs`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const run = await created.json();
  const source = new EventSource(`${proxy}${run.events_url}`);
  source.onopen = () => { opens += 1; };
  source.onerror = () => { errors += 1; };
  const onEvent = (m) => {
    const event = record(m.data);
    if (event && event.type === "run-end") {
      source.close();
      finish("run-end");
    }
  };
  for (const type of ["run-start", "stage-start", "token", "source", "stage-progress",
    "stage-retry", "stage-end", "run-end", "message"]) {
    source.addEventListener(type, onEvent);
  }
} else if (which === "fetch-event-source") {
  // the library is written for browsers: it needs window's timers and a document
  globalThis.window = globalThis;
  globalThis.document = { hidden: false, addEventListener() {}, removeEventListener() {} };
  const controller = new AbortController();
  const key = `conformance-${process.pid}-${Date.now()}`;
  await fetchEventSource(`${proxy}/v1/runs?stream=true`, {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": key },
    body: JSON.stringify(body),
    signal: controller.signal,
    openWhenHidden: true,
    fetch: globalThis.fetch,
    async onopen(response) {
      opens += 1;
      if (response.status === 204) {  // the run ended and we have its last event
        controller.abort();
        finish("no-content");
      }
      if (response.status !== 200) {
        throw new Error(`fatal: HTTP ${response.status} ${await response.text()}`);
      }
    },
    onmessage(m) {
      const event = record(m.data);
      if (event && event.type === "run-end") {
        controller.abort();
        finish("run-end");
      }
    },
    onclose() {
      throw new Error("the stream ended before run-end");  // retry, as the library's docs say
    },
    onerror(err) {
      errors += 1;
      if (String(err).includes("fatal:")) {
        throw err;
      }
      return 100;  // ms before the library re-sends the request
    },
  }).catch((err) => finish(`failed: ${err}`));
} else {
  console.error(`unknown client ${which}`);
  process.exit(2);
}
