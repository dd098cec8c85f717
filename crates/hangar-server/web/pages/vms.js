// VMs: the list (mine, or all for an admin), and one VM's page with its serial console.
//
// Lists follow `vm` events and re-read the list (debounced), patching rows in place so
// focus and selection survive. Actions are the ones the VM's state allows.

import { api, get, events } from "../api.js";
import { h, fill, setText, heading, table, syncRows, ago, badge, duration, bytes, copyButton, empty, debounce, plural } from "../lib.js";
import { flash, go, may, session } from "../app.js";

/** The actions a VM in `state` offers: [action, label]. */
function actionsFor(state) {
  switch (state) {
    case "active": return [["sleep", "Sleep"], ["archive", "Archive"], ["delete", "Delete"]];
    case "sleeping": return [["wake", "Wake"], ["archive", "Archive"], ["delete", "Delete"]];
    case "archived": return [["wake", "Wake"], ["delete", "Delete"]];
    case "deleted": return [];
    default: return [["delete", "Delete"]];
  }
}

const DOING = { sleep: "Sleeping…", archive: "Archiving…", wake: "Waking…", delete: "Deleting…" };

/** Asks to confirm with a modal dialog; resolves to whether the user said yes. */
function confirmDialog(question, yes) {
  return new Promise((resolve) => {
    const ok = h("button", { type: "submit", id: "confirm-ok", class: "danger", value: "ok" }, yes);
    const no = h("button", { type: "submit", id: "confirm-cancel", value: "cancel", class: "quiet" }, "Keep it");
    const dialog = h("dialog", { "aria-labelledby": "confirm-text" },
      h("form", { method: "dialog" }, h("p", { id: "confirm-text" }, question), h("div", { class: "row" }, no, ok)));
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok");
      dialog.remove();
    });
    document.body.appendChild(dialog);
    dialog.showModal();
    no.focus();
  });
}

/** Runs `action` on VM `id` (asking first for delete); `after` runs when it is done. */
async function act(id, action, button, after) {
  if (action === "delete" && !(await confirmDialog(`Delete VM ${id}? Its disk and archives are removed; this cannot be undone.`, "Delete"))) return;
  const label = button.textContent;
  button.disabled = true;
  button.textContent = DOING[action];
  try {
    const path = `/v1/vms/${encodeURIComponent(id)}`;
    if (action === "delete") await api("DELETE", path);
    else if (action === "archive") await api("POST", `${path}/archive`, {});
    else await api("POST", `${path}/${action}`);
    if (after) after(action);
  } catch (err) {
    flash(err);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

function actionButtons(vm, after) {
  if (!may("provisioner")) return [];
  const own = vm.owner === session().user || may("admin");
  if (!own) return [];
  return actionsFor(vm.state).map(([action, label]) => {
    const button = h("button", {
      type: "button", class: `small ${action === "delete" ? "danger" : "quiet"}`, "data-action": action,
      "aria-label": `${label} ${vm.id}`,
    }, label);
    button.addEventListener("click", () => act(vm.id, action, button, after));
    return button;
  });
}

function firstEndpoint(vm) {
  const entries = Object.entries(vm.endpoints || {});
  return entries.length ? entries[0][1] : "";
}

/**
 * A live VM table in `main` below `intro`: `all` lists every VM (admin) with a filter.
 * Returns when the first list is shown.
 */
export async function vmTable(main, ctx, { all, intro }) {
  const headers = ["VM", "Service", "State", "Endpoint", "Idle", "Host", "Owner", "Actions"];
  const { el, tbody, wrap } = table("vm-table", all ? "All VMs" : "My VMs", headers);
  const filter = all ? h("input", {
    id: "vm-filter", type: "search", placeholder: "host, owner, service or state", "aria-label": "Filter VMs",
  }) : null;
  const count = h("p", { class: "muted", id: "vm-count", "aria-live": "polite" });
  const none = empty("vms-empty", all ? "No VMs" : "You have no VMs",
    may("provisioner") ? ["Request one from ", h("a", { href: "#/services" }, "Services"), " and it shows here."]
      : "VMs given to you show here. Your role cannot request new ones.");
  fill(main, intro, filter ? h("p", {}, filter) : null, count, wrap, none);
  let vms = [];
  const build = () => h("tr", {},
    h("td", {}, h("a", {})), h("td", { "data-field": "service" }), h("td", { "data-field": "state" }),
    h("td", { "data-field": "endpoint" }), h("td", { "data-field": "idle", class: "num" }),
    h("td", { "data-field": "host" }), h("td", { "data-field": "owner" }), h("td", { class: "actions" }));
  const update = (row, vm) => {
    const cells = row.children;
    const link = cells[0].firstChild;
    if (link.textContent !== vm.id) {
      link.textContent = vm.id;
      link.href = `#/vms/${encodeURIComponent(vm.id)}`;
    }
    setText(cells[1], vm.services.join(", ") || (vm.pool ? `pool ${vm.pool}` : "shell"));
    if (row.dataset.state !== vm.state) {
      row.dataset.state = vm.state;
      fill(cells[2], badge(vm.state));
      fill(cells[7], actionButtons(vm, reload));
    }
    const endpoint = firstEndpoint(vm);
    if (cells[3].dataset.value !== endpoint) {
      cells[3].dataset.value = endpoint;
      fill(cells[3], endpoint ? [h("code", {}, endpoint), " ", copyButton(endpoint)] : "–");
    }
    setText(cells[4], vm.state === "active" ? duration(vm.idle_ms) : "–");
    setText(cells[5], vm.host);
    setText(cells[6], vm.owner);
  };
  const show = () => {
    const words = (filter?.value || "").toLowerCase().split(/\s+/).filter(Boolean);
    const shown = words.length === 0 ? vms : vms.filter((vm) => {
      const text = `${vm.id} ${vm.host} ${vm.owner} ${vm.services.join(" ")} ${vm.state} ${vm.pool || ""}`.toLowerCase();
      return words.every((w) => text.includes(w));
    });
    el.hidden = vms.length === 0;
    none.hidden = vms.length !== 0;
    count.textContent = shown.length === vms.length ? plural(vms.length, "VM") : `${shown.length} of ${plural(vms.length, "VM")}`;
    syncRows(tbody, shown, "data-vm", (vm) => vm.id, build, update);
  };
  const load = async () => {
    vms = await get(all ? "/v1/vms?all=true" : "/v1/vms");
    show();
  };
  const reload = debounce(() => load().catch(flash), 100);
  if (filter) filter.addEventListener("input", show);
  await load();
  ctx.cleanup(events.on("vm", reload));
  const timer = setInterval(reload, 15000);
  ctx.cleanup(() => clearInterval(timer));
}

export async function vmList(main, ctx) {
  await vmTable(main, ctx, {
    all: false,
    intro: heading("My VMs", "Endpoints stay the same while a VM sleeps or is archived; a connection to it wakes it."),
  });
  ctx.done();
}

export async function vmPage(main, ctx) {
  const [id] = ctx.params;
  const path = `/v1/vms/${encodeURIComponent(id)}`;
  let vm;
  try {
    vm = await get(path);
  } catch (err) {
    if (err.status === 404) {
      fill(main, empty("vm-missing", `No VM ${id}`, "It was deleted, or it is not yours. ", h("a", { href: "#/vms" }, "See your VMs.")));
      return;
    }
    throw err;
  }
  const state = h("span", { id: "vm-state" });
  const actions = h("div", { class: "row", id: "vm-actions" });
  const facts = h("dl", { class: "facts", id: "vm-facts" });
  const endpoints = h("ul", { id: "vm-endpoints", class: "endpoints" });
  const tasks = h("ul", { id: "vm-tasks", class: "plain" });
  const consoleBox = h("div", { id: "vm-console", "data-bytes": "0", role: "log", "aria-label": "Serial console output" });
  const consoleNote = h("p", { class: "muted small", id: "vm-console-note" }, "Connecting…");
  fill(main,
    h("h1", {}, "VM ", h("code", {}, id), " ", state),
    actions,
    h("div", { class: "grid2" },
      h("section", { class: "card" }, h("h2", {}, "Endpoints"), endpoints,
        h("p", { class: "muted small" }, "Stable: a connection to a sleeping or archived VM wakes it.")),
      h("section", { class: "card" }, h("h2", {}, "Details"), facts)),
    h("section", { class: "card" }, h("h2", {}, "Serial console"), consoleNote, consoleBox),
    h("section", { class: "card" }, h("h2", {}, "Log"), tasks));
  const render = () => {
    fill(state, badge(vm.state));
    fill(actions, actionButtons(vm, (action) => { if (action === "delete") go("#/vms"); else reload(); }));
    fill(endpoints, Object.entries(vm.endpoints || {}).map(([name, addr]) => h("li", {},
      h("span", { class: "muted" }, `${name} `),
      h("a", { "data-endpoint": name, href: /http/.test(name) ? `http://${addr}/` : null, target: "_blank", rel: "noopener noreferrer" }, addr),
      " ", copyButton(addr))));
    if (!endpoints.children.length) endpoints.appendChild(h("li", { class: "muted" }, "No ports."));
    renderFacts(facts, [
      ["Service", vm.services.join(", ") || (vm.pool ? `pool ${vm.pool}` : "shell")],
      ["Host", vm.host], ["Owner", vm.owner], ["Mode", vm.mode],
      ["Size", `${vm.vcpus} vCPU · ${vm.memory_mib} MiB`], ["OS", vm.os || "–"],
      ["Created", ago(vm.created_at)], [`${vm.state} since`, ago(vm.state_since)],
      ["Idle", vm.state === "active" ? duration(vm.idle_ms) : "–"],
      ["Boot", vm.boot_ms ? duration(vm.boot_ms) : "–"],
      vm.archive ? ["Archive", `${vm.archive.tier}, ${bytes(vm.archive.size_bytes)}, written in ${duration(vm.archive.took_ms)}`] : null,
      vm.error ? ["Error", vm.error] : null,
    ]);
  };
  const loadTasks = async () => {
    if (!may("provisioner")) {
      fill(tasks, h("li", { class: "muted" }, "Your role does not see tasks."));
      return;
    }
    const all = await get("/v1/tasks");
    const mine = all.filter((t) => t.vm === id);
    fill(tasks, mine.length ? mine.map((t) => h("li", {}, ago(t.created_at), " ", t.kind, " ", badge(t.state),
      t.error ? h("span", { class: "error" }, ` ${t.error}`) : null))
      : h("li", { class: "muted" }, "No tasks recorded for this VM."));
  };
  const reload = debounce(async () => {
    try {
      vm = await get(path);
      render();
    } catch (err) {
      if (err.status === 404) go("#/vms");
      else flash(err);
    }
  }, 50);
  render();
  ctx.cleanup(events.on("vm", (event) => { if (event.id === id) reload(); }));
  ctx.cleanup(events.on("task", (event) => { if (event.vm === id) loadTasks().catch(() => {}); }));
  loadTasks().catch(() => {});
  ctx.done();
  await attachConsole(consoleBox, consoleNote, id, ctx);
}

function renderFacts(dl, pairs) {
  dl.replaceChildren();
  for (const pair of pairs) {
    if (!pair) continue;
    dl.appendChild(h("dt", {}, pair[0]));
    dl.appendChild(h("dd", {}, pair[1]));
  }
}

/**
 * The VM's serial console in an xterm widget, fed by `GET /v1/vms/{id}/console/ws`
 * (binary frames: the last 64 KiB first, then what comes). Reconnects while the page is
 * open; `data-bytes` counts what was received.
 */
async function attachConsole(box, note, id, ctx) {
  const [{ Terminal }, { FitAddon }] = await Promise.all([
    import("../vendor/xterm/xterm.mjs"),
    import("../vendor/xterm/addon-fit.mjs"),
  ]);
  const term = new Terminal({
    convertEol: true, disableStdin: true, scrollback: 5000, fontSize: 13, rows: 20,
    cursorBlink: false, screenReaderMode: false,
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(box);
  const resize = () => { try { fit.fit(); } catch { /* hidden */ } };
  resize();
  window.addEventListener("resize", resize);
  let received = 0;
  let socket = null;
  let closed = false;
  const connect = () => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/v1/vms/${encodeURIComponent(id)}/console/ws`);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => { note.textContent = "Connected: the guest's serial console, as it writes it (read-only)."; };
    socket.onmessage = (event) => {
      const data = typeof event.data === "string" ? event.data : new Uint8Array(event.data);
      received += typeof data === "string" ? data.length : data.byteLength;
      box.dataset.bytes = String(received);
      term.write(data);
    };
    socket.onclose = () => {
      if (closed) return;
      note.textContent = "Disconnected from the console; reconnecting…";
      setTimeout(() => {
        if (closed) return;
        term.reset();
        received = 0;
        connect();
      }, 2000);
    };
  };
  connect();
  ctx.cleanup(() => {
    closed = true;
    window.removeEventListener("resize", resize);
    if (socket) socket.close();
    term.dispose();
  });
}
