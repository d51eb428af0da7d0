// "Play a recording": the demo page's control for the recordings a server was started with
// (`stagecast serve --recordings DIR`). It shows only when GET /v1/recordings lists some; playing
// one is POST /v1/replays, and the replay is then watched like any run (same routes, same SSE).
//
//   mountRecordings(document.querySelector(".card.start"), { onStarted: (runId) => watch(runId) });
//
// Self-contained on purpose (its own elements, no page layout assumptions) so the page's layout
// can change around it.

import { listRecordings, startReplay } from "./stagecast.js";

const SPEEDS = [
  ["1", "recorded pace"],
  ["4", "4× faster"],
  ["max", "as fast as possible"],
];

/**
 * @param {HTMLElement} container where the control goes (appended at its end)
 * @param {{onStarted: (runId: string) => void}} options
 */
export async function mountRecordings(container, { onStarted }) {
  let recordings;
  try {
    recordings = await listRecordings("");
  } catch {
    return; // an older server, or none: no control
  }
  if (!recordings.length) return;
  const box = document.createElement("form");
  box.id = "recordings";
  box.className = "field";
  box.noValidate = true;
  const title = document.createElement("label");
  title.className = "field-label";
  title.htmlFor = "recording";
  title.textContent = "Or play a recording";
  const select = document.createElement("select");
  select.id = "recording";
  for (const r of recordings) {
    const option = document.createElement("option");
    option.value = r.name;
    const chain = r.chain ? ` · ${r.chain.title || r.chain.id}` : "";
    option.textContent = `${r.name}${chain}`;
    select.append(option);
  }
  const speed = document.createElement("select");
  speed.id = "recording-speed";
  speed.setAttribute("aria-label", "Replay speed");
  for (const [value, label] of SPEEDS) {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    speed.append(option);
  }
  const play = document.createElement("button");
  play.id = "play-recording";
  play.type = "submit";
  play.className = "button button-quiet";
  play.textContent = "Play";
  const problem = document.createElement("p");
  problem.className = "notice notice-error";
  problem.setAttribute("role", "alert");
  problem.hidden = true;
  const hint = document.createElement("p");
  hint.className = "field-hint";
  hint.textContent = "A recorded run, served as a new live run: no model and no key needed.";
  const row = document.createElement("div");
  row.className = "form-actions";
  row.append(select, speed, play);
  box.append(title, row, hint, problem);
  container.append(box);

  box.addEventListener("submit", async (event) => {
    event.preventDefault();
    play.disabled = true;
    problem.hidden = true;
    try {
      const value = speed.value === "max" ? "max" : Number(speed.value);
      const created = await startReplay("", select.value, { speed: value });
      onStarted(created.run_id);
    } catch (err) {
      problem.textContent = err.message;
      problem.hidden = false;
    } finally {
      play.disabled = false;
    }
  });
}
