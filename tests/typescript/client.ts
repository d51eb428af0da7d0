// A small frontend written against stagecast.d.ts: tsc --noEmit must accept it as it is
// (test_declarations.py), and must reject it once a deliberate type error is put in.
import {
  type EventOf,
  type RunEvent,
  type RunRequest,
  followRun,
  listRecordings,
  resolveCitations,
  startReplay,
  startRun,
} from "../../api/static/stagecast.js";

const texts = new Map<string, string>();

function describe(event: RunEvent): string {
  switch (event.type) {
    case "run-start":
      return `${event.chain.id} v${event.chain.version ?? "?"}: ${event.plan.length} stages`;
    case "token":
      return `${event.path?.join("/")}: ${event.text}`;
    case "stage-end":
      return `${event.stage} ${event.status}${event.reused ? " (reused)" : ""} ${event.progress}`;
    case "run-end":
      return `${event.status} ${event.usage.output_tokens} tokens`;
    default:
      return event.type;
  }
}

export async function watch(chain: string, document: string): Promise<void> {
  const body: RunRequest = { chain, inputs: { document }, model: "offline" };
  const run = await startRun("", { chain: body.chain, inputs: body.inputs, model: "offline" });
  const sources: EventOf<"source">[] = [];
  followRun("", run.run_id, {
    on: {
      token: (e) => texts.set(String(e.path), (texts.get(String(e.path)) ?? "") + e.text),
      source: (e) => sources.push(e),
      "stage-end": (e) => {
        for (const c of resolveCitations(e, sources)) console.log(c.marker, c.source?.title);
      },
    },
    onEvent: (e) => console.log(describe(e)),
    onEnd: (end) => console.log(end.outputs, end.error?.message),
  });
}

export async function replayFirst(): Promise<string | undefined> {
  const [first] = await listRecordings("");
  if (first === undefined) return undefined;
  const replay = await startReplay("", first.name, { speed: "max" });
  return replay.events_url;
}
