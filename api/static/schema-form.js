// Form fields generated from a JSON Schema: a chain's `inputs_schema` (GET /v1/chains/{id})
// and the `schema` of an `input-required` event.
//
// An object schema gives one field per property; any other schema gives a single field named
// `answer` (a text area for a string). Long strings (`x-multiline: true`, or a maxLength over 500) get a text area and a
// file picker that loads a text file into it. Defaults are filled in and shown; descriptions
// become hints. `readValues` turns the fields back into typed JSON values.

const LONG_TEXT = 500;

/**
 * Build the fields of `schema` into `container` (emptied first).
 * @returns {{fields: Map<string, Field>, single: boolean}}
 */
export function buildFields(container, schema, { idPrefix = "f", focus = false } = {}) {
  container.replaceChildren();
  const fields = new Map();
  const isObject = schema && (schema.type === "object" || schema.properties);
  const single = !isObject;
  // A question's answer that is a string (the `input` stage's default schema) gets a text area.
  const answer = { type: "string", ...(schema || {}) };
  if (answer.type === "string" && !answer.enum) answer["x-multiline"] ??= true;
  const props = isObject ? schema.properties || {} : { answer };
  const required = new Set(isObject ? schema.required || [] : ["answer"]);
  for (const [name, prop] of Object.entries(props)) {
    const field = buildField(name, prop || {}, required.has(name), `${idPrefix}-${name}`, single);
    fields.set(name, field);
    container.append(field.root);
  }
  if (focus) fields.values().next().value?.control.focus();
  return { fields, single };
}

/** The typed values of the fields; throws nothing, reports problems per field. */
export function readValues({ fields, single }) {
  const values = {};
  const problems = {};
  for (const [name, field] of fields) {
    const result = field.read();
    if (result.problem) problems[name] = result.problem;
    else if (result.value !== undefined) values[name] = result.value;
  }
  return { values: single ? values.answer : values, problems };
}

/** Show per-field messages (from the form itself or a 422 answer); clears the others. */
export function showProblems({ fields }, problems) {
  for (const [name, field] of fields) field.setProblem(problems?.[name] || "");
}

function isLongText(prop) {
  return prop.type === "string" && (prop["x-multiline"] === true || (prop.maxLength ?? 0) > LONG_TEXT);
}

function buildField(name, prop, required, id, single) {
  const root = el("div", "field");
  root.dataset.field = name;
  const label = el("label", "field-label");
  label.htmlFor = id;
  label.textContent = single && !prop.title ? "Your answer" : prop.title || humanize(name);
  if (!required) {
    const opt = el("span", "field-optional");
    opt.textContent = "optional";
    label.append(" ", opt);
  }
  root.append(label);

  let control;
  const kind = prop.enum ? "enum" : prop.type || "string";
  if (prop.enum) {
    control = el("select");
    for (const value of prop.enum) {
      const option = el("option");
      option.value = JSON.stringify(value);
      option.textContent = String(value);
      control.append(option);
    }
    if (prop.default !== undefined) control.value = JSON.stringify(prop.default);
  } else if (kind === "boolean") {
    control = el("input");
    control.type = "checkbox";
    control.checked = prop.default === true;
    root.classList.add("field-check");
  } else if (kind === "integer" || kind === "number") {
    control = el("input");
    control.type = "number";
    control.inputMode = kind === "integer" ? "numeric" : "decimal";
    control.step = kind === "integer" ? "1" : "any";
    if (prop.minimum !== undefined) control.min = String(prop.minimum);
    if (prop.maximum !== undefined) control.max = String(prop.maximum);
    if (prop.default !== undefined && prop.default !== null) control.value = String(prop.default);
  } else if (kind === "array" || kind === "object") {
    control = el("textarea");
    control.rows = 4;
    control.spellcheck = false;
    control.classList.add("mono");
    if (prop.default !== undefined) control.value = JSON.stringify(prop.default, null, 2);
  } else if (isLongText(prop)) {
    control = el("textarea");
    control.rows = 8;
    if (typeof prop.default === "string") control.value = prop.default;
  } else {
    control = el("input");
    control.type = "text";
    if (typeof prop.default === "string") control.value = prop.default;
    if (Array.isArray(prop.examples) && prop.examples.length) {
      const list = el("datalist");
      list.id = `${id}-examples`;
      for (const example of prop.examples) {
        const option = el("option");
        option.value = String(example);
        list.append(option);
      }
      control.setAttribute("list", list.id);
      root.append(list);
    }
  }
  control.id = id;
  control.name = name;
  if (required && kind !== "boolean") control.required = true;
  if (prop.maxLength !== undefined && "maxLength" in control) control.maxLength = prop.maxLength;

  const hint = el("p", "field-hint");
  hint.id = `${id}-hint`;
  const parts = [];
  if (prop.description) parts.push(prop.description);
  if (prop.default !== undefined && prop.default !== "" && kind !== "boolean") {
    parts.push(`Default: ${typeof prop.default === "string" ? prop.default : JSON.stringify(prop.default)}.`);
  }
  hint.textContent = parts.join(" ");
  const problem = el("p", "field-problem");
  problem.id = `${id}-problem`;
  problem.setAttribute("role", "alert");
  control.setAttribute("aria-describedby", `${hint.id} ${problem.id}`);

  if (control.tagName === "TEXTAREA" && kind === "string") {
    root.append(control, filePicker(control, id));
  } else if (kind === "boolean") {
    label.prepend(control, " ");
  } else {
    root.append(control);
  }
  if (parts.length) root.append(hint);
  root.append(problem);

  return {
    root,
    control,
    setProblem(message) {
      problem.textContent = message;
      control.toggleAttribute("aria-invalid", Boolean(message));
      root.classList.toggle("has-problem", Boolean(message));
    },
    read() {
      if (prop.enum) return { value: JSON.parse(control.value) };
      if (kind === "boolean") return { value: control.checked };
      const raw = control.value;
      if (raw.trim() === "") {
        if (required) return { problem: "required" };
        return { value: kind === "string" && prop.default !== undefined ? raw : undefined };
      }
      if (kind === "integer" || kind === "number") {
        const n = Number(raw);
        if (!Number.isFinite(n) || (kind === "integer" && !Number.isInteger(n))) {
          return { problem: `expected ${kind === "integer" ? "a whole number" : "a number"}` };
        }
        return { value: n };
      }
      if (kind === "array" || kind === "object") {
        try {
          return { value: JSON.parse(raw) };
        } catch {
          return { problem: `expected JSON (${kind})` };
        }
      }
      return { value: raw };
    },
  };
}

function filePicker(textarea, id) {
  const row = el("div", "file-row");
  const input = el("input");
  input.type = "file";
  input.id = `${id}-file`;
  input.className = "visually-hidden";
  input.accept = ".txt,.md,.markdown,.csv,.json,.html,.xml,.yaml,.yml,.rst,.log,text/*";
  const button = el("label", "button button-quiet button-small");
  button.htmlFor = input.id;
  button.textContent = "Load a text file…";
  const status = el("span", "file-status");
  status.setAttribute("aria-live", "polite");
  input.addEventListener("change", async () => {
    const file = input.files?.[0];
    if (!file) return;
    try {
      textarea.value = await file.text();
      textarea.dispatchEvent(new Event("input", { bubbles: true }));
      status.textContent = `${file.name} · ${textarea.value.length.toLocaleString()} characters`;
    } catch (err) {
      status.textContent = `Could not read ${file.name}: ${err.message}`;
    }
    input.value = "";
  });
  row.append(button, input, status);
  return row;
}

export function humanize(name) {
  const words = String(name).replace(/[_-]+/g, " ").trim();
  return words.charAt(0).toUpperCase() + words.slice(1);
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}
