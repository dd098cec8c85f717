// The admin console: hosts, all VMs, pools, templates, images and layers, policies and
// quotas, users and tokens, usage per user, the audit log. Every page re-reads what it
// shows when a matching live event arrives.

import { api, get, events } from "../api.js";
import { h, fill, setText, heading, table, syncRows, ago, badge, bytes, duration, copyButton, empty, debounce, plural } from "../lib.js";
import { flash } from "../app.js";
import { vmTable } from "./vms.js";
import { usageRows, USAGE_HEADERS } from "./usage.js";

/** Loads with `load`, then again on each event of `kinds` (debounced) and every `everyMs`. */
async function live(ctx, kinds, load, everyMs = 10000) {
  await load();
  const again = debounce(() => load().catch(flash), 100);
  for (const kind of kinds) ctx.cleanup(events.on(kind, again));
  const timer = setInterval(again, everyMs);
  ctx.cleanup(() => clearInterval(timer));
  ctx.done();
}

function pct(used, total) {
  return total ? `${Math.round((100 * used) / total)}%` : "–";
}

function meter(used, total, label) {
  return h("meter", { min: 0, max: total || 1, value: used, "aria-label": label, title: `${used} of ${total}` });
}

export async function hosts(main, ctx) {
  const { tbody, wrap } = table("host-table", "Hosts", ["Host", "State", "Load", "vCPUs used", "Memory used", "VMs", "Free disk", "Cost · priority", "Heartbeat"]);
  fill(main, heading("Hosts", "The machines VMs run on, with what they report every heartbeat. A host that misses heartbeats turns down and its VMs are placed elsewhere."), wrap);
  const build = () => h("tr", {}, ...Array.from({ length: 9 }, () => h("td", {})));
  const update = (row, host) => {
    const c = row.children;
    fill(c[0], h("strong", {}, host.name), host.address ? h("div", { class: "muted small" }, host.address) : null,
      Object.entries(host.labels || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`)));
    fill(c[1], badge(host.state));
    setText(c[2], host.load.toFixed(2));
    fill(c[3], meter(host.vcpus_used, host.vcpus, "vCPUs used"), ` ${host.vcpus_used}/${host.vcpus}`);
    fill(c[4], meter(host.memory_used_mib, host.memory_mib, "memory used"), ` ${bytes(host.memory_used_mib * 1048576)} (${pct(host.memory_used_mib, host.memory_mib)})`);
    setText(c[5], Object.entries(host.vms || {}).map(([state, n]) => `${n} ${state}`).join(", ") || "none");
    setText(c[6], host.facts ? bytes(host.facts.free_disk_mib * 1048576) : "–");
    setText(c[7], `${host.cost} · ${host.priority}`);
    setText(c[8], `${host.heartbeat_age_s.toFixed(1)} s ago`);
  };
  await live(ctx, ["host", "vm"], async () => syncRows(tbody, await get("/v1/hosts"), "data-host", (x) => x.name, build, update), 5000);
}

export async function allVms(main, ctx) {
  await vmTable(main, ctx, { all: true, intro: heading("All VMs", "Every VM on every host, whoever owns it. Type in the filter to narrow by host, owner, service or state.") });
  ctx.done();
}

export async function pools(main, ctx) {
  const { tbody, wrap } = table("pool-table", "Pools", ["Pool", "Size", "Ready", "Booting", "Target", "Min", "Max", "Memory", "Demand", ""]);
  fill(main, heading("Pools", "Paused VMs booted to ready, handed out in milliseconds. The pool keeps between min and max ready, more when demand rises."), wrap);
  const build = (pool) => {
    const min = h("input", { type: "number", name: "min", min: 0, max: 64, class: "narrow", "aria-label": `${pool.name} minimum` });
    const max = h("input", { type: "number", name: "max", min: 0, max: 64, class: "narrow", "aria-label": `${pool.name} maximum` });
    const save = h("button", { type: "button", class: "small", "data-action": "save-pool" }, "Save");
    const row = h("tr", {},
      h("th", { scope: "row" }), h("td", {}), h("td", { "data-field": "ready", class: "num" }), h("td", { "data-field": "booting", class: "num" }),
      h("td", { "data-field": "target", class: "num" }), h("td", { "data-field": "min" }, min), h("td", { "data-field": "max" }, max),
      h("td", { class: "num" }), h("td", { class: "num" }), h("td", {}, save));
    const edited = () => { row.dataset.edited = "1"; };
    min.addEventListener("input", edited);
    max.addEventListener("input", edited);
    save.addEventListener("click", async () => {
      save.disabled = true;
      try {
        await api("PUT", `/v1/pools/${encodeURIComponent(pool.name)}`, { min: Number(min.value), max: Number(max.value) });
        delete row.dataset.edited;
        save.textContent = "Saved";
        setTimeout(() => { save.textContent = "Save"; }, 1500);
      } catch (err) {
        flash(err);
      } finally {
        save.disabled = false;
      }
    });
    return row;
  };
  const update = (row, pool) => {
    const c = row.children;
    setText(c[0], pool.name);
    setText(c[1], `${pool.service || "pre-OS shell"} · ${pool.vcpus} vCPU · ${pool.vm_memory_mib} MiB`);
    setText(c[2], pool.ready);
    setText(c[3], pool.booting);
    setText(c[4], pool.target);
    if (!row.dataset.edited) {
      c[5].firstChild.value = pool.min;
      c[6].firstChild.value = pool.max;
    }
    setText(c[7], bytes(pool.memory_mib * 1048576));
    setText(c[8], `${pool.rate_per_min.toFixed(1)}/min`);
  };
  await live(ctx, ["pool", "vm"], async () => syncRows(tbody, await get("/v1/pools"), "data-pool", (p) => p.name, build, update), 5000);
}

export async function templates(main, ctx) {
  const { el, tbody, wrap } = table("template-table", "Templates", ["Service", "Host", "Size", "Memory", "Snapshot took", "Created", "Current"]);
  const none = empty("templates-empty", "No templates", "A template is a VM snapshotted at its ready state; new VMs of its service are cloned from it. The server makes one per service on first use unless it runs with --no-templates.");
  fill(main, heading("Templates", "Snapshots at the ready state; clones map their memory copy-on-write."), wrap, none);
  const build = () => h("tr", {}, ...Array.from({ length: 7 }, () => h("td", {})));
  const update = (row, t) => {
    const c = row.children;
    setText(c[0], t.service);
    setText(c[1], t.host);
    setText(c[2], bytes(t.size_bytes));
    setText(c[3], `${t.memory_mib} MiB`);
    setText(c[4], duration(t.took_ms));
    fill(c[5], ago(t.created_at));
    setText(c[6], t.current ? "yes" : "no (replaced; removed when unused)");
  };
  await live(ctx, ["template"], async () => {
    const list = await get("/v1/templates");
    el.hidden = list.length === 0;
    none.hidden = list.length !== 0;
    syncRows(tbody, list, "data-template", (t) => `${t.host}/${t.key}`, build, update);
  });
}

export async function images(main, ctx) {
  const images = table("image-table", "Images", ["Service", "OS", "Format", "Built", "Size", "Used by", "Last use", ""]);
  const layers = table("layer-table", "Layers", ["Layer", "Kind", "Packages", "Size", "Build took", "Images", "Last use"]);
  const total = h("p", { class: "muted", id: "images-total" });
  fill(main, heading("Images", "Service images are stacks of shared read-only layers built from Debian packages; VMs write to their own overlay."),
    total, images.wrap, h("h2", {}, "Layers"), layers.wrap);
  const buildImage = () => h("tr", {}, ...Array.from({ length: 8 }, () => h("td", {})));
  const updateImage = (row, image) => {
    const c = row.children;
    setText(c[0], image.service);
    setText(c[1], image.os);
    setText(c[2], image.format);
    fill(c[3], badge(image.built ? "built" : "not built"));
    setText(c[4], bytes(image.size_bytes));
    setText(c[5], image.users.length ? plural(image.users.length, "VM") : "none");
    fill(c[6], image.last_used_ms ? ago(image.last_used_ms) : "never");
    const buttons = [];
    if (!image.built || image.format === "layered") {
      buttons.push(h("button", {
        type: "button", class: "small", "data-action": "build",
        onclick: (e) => imageAction(e.target, "POST", "/v1/images", { service: image.service }, `Build started for ${image.service}; see Tasks.`),
      }, image.built ? "Rebuild" : "Build"));
    }
    fill(c[7], buttons);
  };
  const buildLayer = () => h("tr", {}, ...Array.from({ length: 7 }, () => h("td", {})));
  const updateLayer = (row, layer) => {
    const c = row.children;
    fill(c[0], h("strong", {}, layer.name), h("div", { class: "muted small" }, h("code", {}, layer.hash.slice(0, 12))));
    setText(c[1], layer.kind);
    c[2].title = layer.packages.join(" ");
    setText(c[2], layer.packages.length ? plural(layer.packages.length, "package") : "–");
    setText(c[3], bytes(layer.size_bytes));
    setText(c[4], duration(layer.build_ms));
    setText(c[5], layer.images.join(", "));
    fill(c[6], layer.last_used_ms ? ago(layer.last_used_ms) : "never");
  };
  const load = async () => {
    const answer = await get("/v1/images");
    total.textContent = `${plural(answer.images.length, "image")}, ${plural(answer.layers.length, "layer")}, ${bytes(answer.total_bytes)} in all.`;
    syncRows(images.tbody, answer.images, "data-image", (i) => i.service, buildImage, updateImage);
    syncRows(layers.tbody, answer.layers, "data-layer", (l) => l.hash, buildLayer, updateLayer);
  };
  await live(ctx, ["image", "task"], load, 15000);
  async function imageAction(button, method, path, body, done) {
    button.disabled = true;
    try {
      await api(method, path, body);
      flash(done, "info");
      await load();
    } catch (err) {
      flash(err);
    } finally {
      button.disabled = false;
    }
  }
}

export async function policies(main, ctx) {
  const pol = table("policy-table", "Lifecycle policies", ["Service", "Sleep after", "Archive after", "Delete after", "Archive tier", "Source", "Demand", ""]);
  const quota = table("quota-table", "Quotas", ["User", "VMs", "vCPUs", "Memory (MiB)", "Archive bytes", "Source", "In use", ""]);
  const budget = h("p", { class: "muted", id: "policy-budget" });
  fill(main, heading("Policies and budgets", "When idle VMs sleep, are archived and are deleted; what each user may hold."),
    budget, pol.wrap, h("h2", {}, "Quotas"), quota.wrap);
  const buildPolicy = (p) => {
    const sleep = h("input", { name: "sleep_after", class: "narrow", placeholder: "never", "aria-label": `${p.service} sleep after` });
    const archive = h("input", { name: "archive_after", class: "narrow", placeholder: "never", "aria-label": `${p.service} archive after` });
    const save = h("button", { type: "button", class: "small", "data-action": "save-policy" }, "Save");
    const reset = h("button", { type: "button", class: "small quiet", "data-action": "reset-policy" }, "Reset");
    const row = h("tr", {}, h("th", { scope: "row" }), h("td", {}, sleep), h("td", {}, archive), h("td", {}), h("td", {}), h("td", {}), h("td", {}), h("td", {}, save, reset));
    const mark = () => { row.dataset.edited = "1"; };
    sleep.addEventListener("input", mark);
    archive.addEventListener("input", mark);
    const path = `/v1/policies/${encodeURIComponent(p.service)}`;
    save.addEventListener("click", () => send(save, row, "PUT", path, { sleep_after: sleep.value || null, archive_after: archive.value || null }));
    reset.addEventListener("click", () => send(reset, row, "DELETE", path));
    return row;
  };
  const updatePolicy = (row, p) => {
    const c = row.children;
    setText(c[0], p.service);
    if (!row.dataset.edited) {
      c[1].firstChild.value = p.policy.sleep_after || "";
      c[2].firstChild.value = p.policy.archive_after || "";
    }
    setText(c[3], p.policy.delete_after || "never");
    setText(c[4], p.archive_tier_used);
    setText(c[5], p.source);
    setText(c[6], `${p.rate_per_min.toFixed(1)}/min${p.kept_active ? " (kept active)" : ""}`);
  };
  const limitNames = ["vms", "vcpus", "memory_mib", "archive_bytes"];
  const buildQuota = (q) => {
    const inputs = limitNames.map((name) => h("input", { type: "number", min: 0, name, class: "narrow", placeholder: "none", "aria-label": `${q.user} ${name}` }));
    const save = h("button", { type: "button", class: "small", "data-action": "save-quota" }, "Save");
    const row = h("tr", {}, h("th", { scope: "row" }), ...inputs.map((i) => h("td", {}, i)), h("td", {}), h("td", {}), h("td", {}, save));
    for (const input of inputs) input.addEventListener("input", () => { row.dataset.edited = "1"; });
    save.addEventListener("click", () => {
      const limits = {};
      inputs.forEach((input, i) => { limits[limitNames[i]] = input.value === "" ? null : Number(input.value); });
      send(save, row, "PUT", `/v1/quotas/${encodeURIComponent(q.user)}`, limits);
    });
    return row;
  };
  const updateQuota = (row, q) => {
    const c = row.children;
    setText(c[0], q.user);
    if (!row.dataset.edited) {
      limitNames.forEach((name, i) => { c[i + 1].firstChild.value = q.limits[name] ?? ""; });
    }
    setText(c[5], q.source);
    setText(c[6], `${q.used.vms} VMs, ${q.used.vcpus} vCPUs, ${q.used.memory_mib} MiB`);
  };
  const load = async () => {
    const [p, q] = await Promise.all([get("/v1/policies"), get("/v1/quotas")]);
    budget.textContent = `Memory: ${p.memory.used_mib.toFixed(0)} MiB used of ${p.memory.budget_mib ?? "no"} budget; disk: ${p.disk.used_mib.toFixed(0)} MiB used of ${p.disk.budget_mib ?? "no"} budget.`;
    syncRows(pol.tbody, p.services, "data-policy", (x) => x.service, buildPolicy, updatePolicy);
    syncRows(quota.tbody, q.users, "data-quota", (x) => x.user, buildQuota, updateQuota);
  };
  async function send(button, row, method, path, body) {
    button.disabled = true;
    try {
      await api(method, path, body);
      delete row.dataset.edited;
      await load();
    } catch (err) {
      flash(err);
    } finally {
      button.disabled = false;
    }
  }
  await live(ctx, ["vm"], load, 15000);
}

export async function users(main, ctx) {
  const u = table("user-table", "Users", ["User", "Role", "Created", ""]);
  const t = table("token-table", "Tokens", ["Token", "User", "Role", "Created", "Expires", "Last use", "State", ""]);
  const name = h("input", { id: "user-name", name: "name", required: true, autocomplete: "off" });
  const role = h("select", { id: "user-role", name: "role" }, ["access", "provisioner", "admin"].map((r) => h("option", { value: r }, r)));
  const made = h("div", { id: "token-made", "aria-live": "polite" });
  const form = h("form", { class: "card row", id: "user-form" },
    h("label", { for: "user-name" }, "New user "), name, h("label", { for: "user-role" }, " role "), role,
    h("button", { type: "submit" }, "Add user and make a token"));
  fill(main, heading("Users and tokens", "Roles: access (use VMs given to you), provisioner (request VMs), admin (everything)."),
    form, made, u.wrap, h("h2", {}, "Tokens"), t.wrap);
  const showToken = (answer) => fill(made, h("div", { class: "card note" },
    h("p", {}, `Token for ${answer.info.user} (${answer.info.role}). It is shown once: copy it now.`),
    h("p", {}, h("code", { id: "token-secret" }, answer.token), " ", copyButton(answer.token))));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("POST", "/v1/users", { name: name.value, role: role.value });
      showToken(await api("POST", "/v1/tokens", { user: name.value }));
      name.value = "";
      await load();
    } catch (err) {
      flash(err);
    }
  });
  const buildUser = (user) => h("tr", {}, h("th", { scope: "row" }), h("td", {}), h("td", {}),
    h("td", {}, h("button", {
      type: "button", class: "small", "data-action": "make-token",
      onclick: async () => {
        try { showToken(await api("POST", "/v1/tokens", { user: user.name })); await load(); } catch (err) { flash(err); }
      },
    }, "Make token")));
  const updateUser = (row, user) => {
    setText(row.children[0], user.name);
    setText(row.children[1], user.role);
    fill(row.children[2], ago(user.created_at));
  };
  const buildToken = () => h("tr", {}, ...Array.from({ length: 8 }, () => h("td", {})));
  const updateToken = (row, tok) => {
    const c = row.children;
    fill(c[0], h("code", {}, tok.id));
    setText(c[1], tok.user);
    setText(c[2], tok.role);
    fill(c[3], ago(tok.created_at));
    setText(c[4], tok.expires_at ? new Date(tok.expires_at).toLocaleString() : "never");
    fill(c[5], tok.last_used_at ? ago(tok.last_used_at) : "never");
    const expired = tok.expires_at && new Date(tok.expires_at) < new Date();
    fill(c[6], badge(tok.revoked_at ? "revoked" : expired ? "expired" : "valid"));
    fill(c[7], tok.revoked_at || expired ? "" : h("button", {
      type: "button", class: "small danger", "data-action": "revoke",
      onclick: async () => {
        try { await api("DELETE", `/v1/tokens/${encodeURIComponent(tok.id)}`); await load(); } catch (err) { flash(err); }
      },
    }, "Revoke"));
  };
  const load = async () => {
    const [users, tokens] = await Promise.all([get("/v1/users"), get("/v1/tokens")]);
    syncRows(u.tbody, users, "data-user", (x) => x.name, buildUser, updateUser);
    syncRows(t.tbody, tokens, "data-token", (x) => x.id, buildToken, updateToken);
  };
  await load();
  ctx.done();
}

export async function usageByUser(main, ctx) {
  const by = h("select", { id: "usage-by", "aria-label": "Group by" },
    ["user", "service", "host", "vm"].map((b) => h("option", { value: b }, `by ${b}`)));
  const since = h("select", { id: "usage-since", "aria-label": "Period" },
    [["24h", "last 24 hours"], ["7d", "last 7 days"], ["30d", "last 30 days"]].map(([v, l]) => h("option", { value: v }, l)));
  const { tbody, wrap } = table("usage-table", "Usage", USAGE_HEADERS);
  const load = async () => usageRows(tbody, await get(`/v1/usage?since=${since.value}&by=${by.value}`));
  by.addEventListener("change", () => load().catch(flash));
  since.addEventListener("change", () => load().catch(flash));
  fill(main, heading("Usage", "What every user's VMs used, and its cost at the server's prices."), h("p", { class: "row" }, since, by), wrap);
  await live(ctx, ["vm"], load, 30000);
}

export async function audit(main, ctx) {
  const { tbody, wrap } = table("audit-table", "Audit log", ["#", "When", "Who", "Call", "Target", "Status"]);
  fill(main, heading("Audit log", "Every call that changed something, or was refused, newest first."), wrap);
  const build = () => h("tr", {}, ...Array.from({ length: 6 }, () => h("td", {})));
  const update = (row, e) => {
    const c = row.children;
    setText(c[0], e.seq);
    fill(c[1], ago(e.at));
    setText(c[2], e.user);
    fill(c[3], h("code", {}, `${e.method} ${e.route}`));
    setText(c[4], e.target || "");
    fill(c[5], badge(e.status < 400 ? String(e.status) : `${e.status}`));
    row.dataset.status = e.status >= 400 ? "refused" : "ok";
  };
  await live(ctx, ["vm", "task"], async () => {
    const entries = await get("/v1/audit?limit=500");
    entries.sort((a, b) => b.seq - a.seq);
    syncRows(tbody, entries.slice(0, 500), "data-seq", (e) => String(e.seq), build, update);
  }, 10000);
}
