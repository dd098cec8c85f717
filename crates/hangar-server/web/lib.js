// Small DOM and formatting helpers shared by every page.
//
// Contract: nothing here ever parses markup. `h` builds elements from a tag, attributes and
// children; text from the server goes in as text nodes, so no value can become markup.

/**
 * Makes an element: `h("a", {href: "#/vms", "data-nav": "vms"}, "VMs")`.
 * Attributes: `class`, `dataset`-style `data-*`, `on*` functions as listeners, booleans
 * as present/absent, everything else as attributes. Children: nodes, strings, numbers,
 * arrays (flattened), null/undefined/false (skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "value") {
      el.value = value;
    } else if (key === "checked") {
      el.checked = Boolean(value);
    } else if (value === true) {
      el.setAttribute(key, "");
    } else {
      el.setAttribute(key, String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** Replaces all of `el`'s children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** Sets `el`'s text if it differs (keeps selection and avoids needless layout). */
export function setText(el, text) {
  const value = text === undefined || text === null ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

/** `1536` → `1.5 KiB`. */
export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value >= 10 || unit === 0 ? value.toFixed(0) : value.toFixed(1)} ${units[unit]}`;
}

/** Milliseconds as a short duration: `950 ms`, `12 s`, `4 min`, `3 h`, `2 d`. */
export function duration(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 90) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

/** An RFC 3339 time or epoch milliseconds, as "5 min ago" with the full time as title. */
export function ago(when) {
  if (when === null || when === undefined || when === "") return h("span", {}, "–");
  const at = typeof when === "number" ? new Date(when) : new Date(when);
  const age = Date.now() - at.getTime();
  return h("time", { datetime: at.toISOString(), title: at.toLocaleString() },
    age < 0 ? "just now" : `${duration(age)} ago`);
}

/** A state word as a coloured badge (`data-state` for styling and tests). */
export function badge(state) {
  return h("span", { class: "badge", "data-state": state }, state);
}

/** Copies `text` to the clipboard; returns whether it worked. */
export async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h("textarea", { class: "offscreen", readonly: true }, text);
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

/** A button that copies `text`, saying so for a moment. */
export function copyButton(text, label = "Copy") {
  const button = h("button", {
    type: "button", class: "quiet small", "data-action": "copy",
    "aria-label": `${label} ${text}`,
  }, "Copy");
  button.addEventListener("click", async () => {
    const ok = await copy(text);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = "Copy"; }, 1500);
  });
  return button;
}

/**
 * Keeps `tbody`'s rows equal to `items`, keyed by `key(item)` in attribute `attr`:
 * new rows come from `build(item)`, existing ones are passed to `update(row, item)`,
 * rows of items gone are removed, and the order follows `items`.
 */
export function syncRows(tbody, items, attr, key, build, update) {
  const existing = new Map();
  for (const row of tbody.querySelectorAll(`:scope > tr[${attr}]`)) {
    existing.set(row.getAttribute(attr), row);
  }
  const rows = [];
  for (const item of items) {
    const id = key(item);
    let row = existing.get(id);
    if (row) {
      existing.delete(id);
      update(row, item);
    } else {
      row = build(item);
      row.setAttribute(attr, id);
      label(row, tbody);
      update(row, item);
    }
    rows.push(row);
  }
  for (const row of existing.values()) row.remove();
  // Re-append only when the order differs (appendChild moves a node).
  let i = 0;
  for (const row of rows) {
    if (tbody.children[i] !== row) tbody.insertBefore(row, tbody.children[i] || null);
    i += 1;
  }
}

/** Names each cell of a new row after its column (`data-label`, shown on narrow screens). */
function label(row, tbody) {
  const heads = tbody.parentElement?.tHead?.rows[0]?.cells;
  if (!heads) return;
  [...row.children].forEach((cell, i) => {
    if (heads[i] && !cell.hasAttribute("data-label")) cell.setAttribute("data-label", heads[i].textContent);
  });
}

/** `n` and a noun, plural when `n` is not 1: `plural(2, "VM")` → `2 VMs`. */
export function plural(n, noun, many = `${noun}s`) {
  return `${n} ${n === 1 ? noun : many}`;
}

/** Runs `fn` at most once per `ms`, on the trailing edge. */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** A table with a caption (for screen readers), headers and an empty body. */
export function table(id, caption, headers) {
  const tbody = h("tbody");
  const el = h("table", { id },
    h("caption", { class: "sr-only" }, caption),
    h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
    tbody);
  return { el, tbody, wrap: h("div", { class: "table-wrap" }, el) };
}

/** A page heading with an optional line under it. */
export function heading(title, ...lead) {
  return [h("h1", {}, title), lead.length ? h("p", { class: "lead" }, ...lead) : null];
}

/** An empty state: what is missing and what to do. */
export function empty(id, title, ...what) {
  return h("div", { class: "empty", id }, h("h2", {}, title), h("p", {}, ...what));
}
