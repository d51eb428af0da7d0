// A small, safe Markdown renderer: it builds DOM nodes and sets text with textContent only.
//
// Model output is untrusted. Nothing here ever assigns innerHTML or creates an element whose
// tag or attributes come from the text, so `<script>` or `<img onerror=…>` in a model's answer
// shows up as literal text. Links are kept only for http(s) and mailto URLs.
//
// Supported: ATX headings (# … ######), paragraphs, unordered (- * +) and ordered (1.) lists
// with one level of nesting by indentation, fenced code blocks (```), block quotes (>),
// horizontal rules (---), and inline **bold**, __bold__, *italic*, _italic_, `code`, [text](url).

const SAFE_URL = /^(https?:|mailto:)/i;

/** Render `text` as Markdown into a new DocumentFragment. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (/^\s*$/.test(line)) {
      i += 1;
      continue;
    }
    const fence = /^\s*(```|~~~)\s*([\w+-]*)\s*$/.exec(line);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end)
      const pre = el("pre", "md-code");
      const code = el("code");
      if (fence[2]) code.dataset.lang = fence[2];
      code.textContent = body.join("\n");
      pre.append(code);
      fragment.append(pre);
      continue;
    }
    const heading = /^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$/.exec(line);
    if (heading) {
      const h = el(`h${Math.min(6, heading[1].length + 1)}`, "md-h");
      renderInline(heading[2], h);
      fragment.append(h);
      i += 1;
      continue;
    }
    if (/^\s{0,3}([-*_])(\s*\1){2,}\s*$/.test(line)) {
      fragment.append(el("hr"));
      i += 1;
      continue;
    }
    if (/^\s{0,3}>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s{0,3}>/.test(lines[i])) {
        quoted.push(lines[i].replace(/^\s{0,3}>\s?/, ""));
        i += 1;
      }
      const quote = el("blockquote");
      quote.append(renderMarkdown(quoted.join("\n")));
      fragment.append(quote);
      continue;
    }
    if (listItem(line)) {
      i = renderList(lines, i, fragment);
      continue;
    }
    const para = [];
    while (
      i < lines.length &&
      !/^\s*$/.test(lines[i]) &&
      !/^\s{0,3}(#{1,6}\s|>|```|~~~)/.test(lines[i]) &&
      !(para.length && listItem(lines[i]))
    ) {
      para.push(lines[i].trim());
      i += 1;
    }
    const p = el("p");
    renderInline(para.join("\n"), p);
    fragment.append(p);
  }
  return fragment;
}

function listItem(line) {
  const m = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/.exec(line);
  if (!m) return null;
  return { indent: m[1].replace(/\t/g, "    ").length, ordered: /\d/.test(m[2]), text: m[3], start: parseInt(m[2], 10) };
}

function renderList(lines, i, parent) {
  const first = listItem(lines[i]);
  const list = el(first.ordered ? "ol" : "ul");
  if (first.ordered && first.start > 1) list.start = first.start;
  let current = null;
  while (i < lines.length) {
    const line = lines[i];
    const item = listItem(line);
    if (item && item.indent <= first.indent + 1 && item.ordered === first.ordered) {
      current = el("li");
      renderInline(item.text, current);
      list.append(current);
      i += 1;
    } else if (item && item.indent > first.indent + 1 && current) {
      i = renderList(lines, i, current);
    } else if (!item && current && /^\s+\S/.test(line)) {
      current.append(document.createTextNode(" "));
      renderInline(line.trim(), current);
      i += 1;
    } else {
      break;
    }
  }
  parent.append(list);
  return i;
}

// Inline spans, earliest match first; the content of bold, italic and links is parsed again.
const INLINE = [
  { re: /`([^`\n]+)`/, make: (m) => text(el("code"), m[1]) },
  { re: /\*\*(?=\S)([\s\S]*?\S)\*\*/, make: (m) => inline(el("strong"), m[1]) },
  { re: /(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/, lead: 1, make: (m) => inline(el("strong"), m[2]) },
  { re: /\*(?=[^\s*])([^*]*?[^\s*])\*/, make: (m) => inline(el("em"), m[1]) },
  { re: /(^|[^\w])_(?=\S)([^_]*?\S)_(?!\w)/, lead: 1, make: (m) => inline(el("em"), m[2]) },
  { re: /\[([^\]\n]+)\]\(([^)\s]+)\)/, make: makeLink },
];

function renderInline(source, parent) {
  let rest = source;
  while (rest) {
    let best = null;
    for (const rule of INLINE) {
      const m = rule.re.exec(rest);
      if (!m) continue;
      const lead = rule.lead ? m[rule.lead].length : 0;
      const at = m.index + lead;
      if (!best || at < best.at) best = { at, m, rule, lead };
    }
    if (!best) {
      appendText(parent, rest);
      return;
    }
    appendText(parent, rest.slice(0, best.at));
    parent.append(best.rule.make(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
}

function appendText(parent, value) {
  if (!value) return;
  const parts = value.split("\n");
  parts.forEach((part, n) => {
    if (n > 0) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function makeLink(m) {
  const url = m[2];
  if (!SAFE_URL.test(url)) return document.createTextNode(m[0]);
  const a = el("a");
  a.href = url;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  return inline(a, m[1]);
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function text(node, value) {
  node.textContent = value;
  return node;
}

function inline(node, value) {
  renderInline(value, node);
  return node;
}
