// The service directory, a service's request form, and the machine-configuration form.
//
// Both forms ask `POST /v1/requests/check` as the user types (debounced) and show the
// heuristics engine's problems with their suggestions before anything is requested; the
// request itself is sent with `Prefer: respond-async`, so the page can follow its task.

import { api, get, parse } from "../api.js";
import { h, fill, heading, debounce, empty } from "../lib.js";
import { may, flash, go } from "../app.js";
import { taskProgress } from "./tasks.js";

export async function services(main, ctx) {
  const list = await get("/v1/services");
  const canRequest = may("provisioner");
  fill(main,
    heading("Services", "What hangar can hand out. A request answers with an address where a VM already serves it."),
    canRequest
      ? h("p", {}, h("a", { href: "#/configure", class: "button" }, "Request a machine configuration"))
      : h("p", { id: "request-not-allowed", class: "note" },
        `Your role (${ctx.session.role}) may look at services and use VMs given to you, but not request new ones. `,
        "Requesting needs the provisioner role; an admin can make you a token with it."),
    list.length === 0
      ? empty("services-empty", "No services", "The catalog is empty. Add services to the server's catalog file and restart it.")
      : h("ul", { class: "cards", id: "service-list" }, list.map((service) => serviceCard(service, canRequest))));
  ctx.done();
}

function serviceCard(service, canRequest) {
  const settings = Object.keys(service.settings || {});
  return h("li", { class: "card", "data-service": service.name },
    h("h2", {}, service.name),
    h("p", {}, service.description),
    h("dl", { class: "facts" },
      h("dt", {}, "OS"), h("dd", {}, service.os),
      h("dt", {}, "Size"), h("dd", {}, `${service.vcpus} vCPU · ${service.memory_mib} MiB`),
      h("dt", {}, "Ports"), h("dd", {}, service.ports.map((p) => `${p.name} (${p.guest})`).join(", ") || "none"),
      settings.length ? [h("dt", {}, "Settings"), h("dd", {}, settings.join(", "))] : null),
    canRequest
      ? h("a", { class: "button", href: `#/request/${encodeURIComponent(service.name)}`, "data-action": "request" }, `Request ${service.name}`)
      : null);
}

/** The problems list under a form, filled from the check answer. */
function problemsBox() {
  const list = h("ul", { id: "request-problems", class: "problems", "aria-live": "polite" });
  const show = (answer) => {
    fill(list, (answer?.problems || []).map((p) =>
      h("li", { "data-problem": p.field || p.code, "data-severity": p.severity },
        h("strong", {}, p.message), p.suggestion ? h("span", { class: "suggestion" }, ` — ${p.suggestion}`) : null)));
    if (answer?.chosen) list.appendChild(h("li", { class: "ok" }, `Will be served by: ${answer.chosen.reason || answer.chosen.kind}`));
    else if (answer && answer.ok) list.appendChild(h("li", { class: "ok" }, "No problems found."));
  };
  return { list, show };
}

/** Wires a form: checks as the user types, submits asynchronously, follows the task. */
function wire(form, submit, body, progress, problems) {
  const check = debounce(async () => {
    try {
      problems.show(await api("POST", "/v1/requests/check", body()));
    } catch (err) {
      problems.show({ problems: [{ field: "request", message: err.message, severity: "error" }] });
    }
  }, 300);
  form.addEventListener("input", check);
  form.addEventListener("change", check);
  check();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    flash(null);
    try {
      const response = await api("POST", "/v1/requests", body(), { headers: { Prefer: "respond-async" }, raw: true });
      const answer = await parse(response);
      if (response.status === 202 && answer.task) {
        form.hidden = true;
        progress(answer.task);
      } else {
        go(`#/vms/${encodeURIComponent(answer.vm)}`);
      }
    } catch (err) {
      if (err.body?.error?.problems) problems.show({ problems: err.body.error.problems });
      flash(err);
    } finally {
      submit.disabled = false;
    }
  });
}

function field(id, label, input, help) {
  return h("div", { class: "field" }, h("label", { for: id }, label), input,
    help ? h("p", { class: "muted small", id: `${id}-help` }, help) : null);
}

export async function requestService(main, ctx) {
  const [name] = ctx.params;
  const list = await get("/v1/services");
  const service = list.find((s) => s.name === name);
  if (!service) {
    fill(main, empty("service-missing", `No service ${name}`, "It is not in the catalog. ",
      h("a", { href: "#/services" }, "See the services there are.")));
    return;
  }
  const inputs = Object.entries(service.settings || {}).map(([key, setting]) => {
    const id = `setting-${key}`;
    const input = h("input", {
      id, name: `setting:${key}`, type: setting.secret ? "password" : "text",
      placeholder: setting.default ?? "", required: setting.required, autocomplete: "off",
      "aria-describedby": `${id}-help`,
    });
    return [field(id, `${key}${setting.required ? " (required)" : ""}`, input,
      `${setting.description}.${setting.default ? ` Default: ${setting.default}.` : ""}`), input, key];
  });
  const env = h("select", { id: "request-env", name: "env" },
    service.environments.map((e) => h("option", { value: e }, e)));
  const mode = h("select", { id: "request-mode", name: "mode" },
    h("option", { value: "dedicated" }, "dedicated (a VM of your own)"),
    h("option", { value: "shared" }, "shared (may answer from a VM already serving it)"));
  const submit = h("button", { id: "request-submit", type: "submit" }, `Request ${service.name}`);
  const problems = problemsBox();
  const form = h("form", { class: "card", id: "request-form" },
    inputs.map(([el]) => el),
    field("request-env", "Environment", env),
    field("request-mode", "Mode", mode),
    problems.list,
    submit);
  const progressBox = h("div", { id: "progress-box" });
  const body = () => {
    const envs = {};
    const [envKey, envValue] = env.value.split("=");
    if (envKey && envValue !== undefined && service.environments.length > 1) envs[envKey] = envValue;
    for (const [, input, key] of inputs) if (input.value !== "") envs[key] = input.value;
    return { service: service.name, env: envs, mode: mode.value };
  };
  fill(main, heading(`Request ${service.name}`, service.description), form, progressBox);
  wire(form, submit, body, (task) => taskProgress(progressBox, task, ctx), problems);
  ctx.done();
}

export async function configure(main, ctx) {
  const list = await get("/v1/services");
  const oses = [...new Set(list.map((s) => s.os))].sort();
  const os = h("select", { id: "config-os", name: "os" }, oses.map((o) => h("option", { value: o }, o)));
  const apps = list.map((s) => s.name).sort();
  const boxes = apps.map((app) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "app", value: app }), ` ${app}`));
  const vcpus = h("input", { id: "request-vcpus", name: "vcpus", type: "number", min: 1, max: 64, value: 1, required: true });
  const memory = h("input", { id: "request-memory", name: "memory", type: "number", min: 16, step: 16, value: 256, required: true });
  const submit = h("button", { id: "request-submit", type: "submit" }, "Request this machine");
  const problems = problemsBox();
  const form = h("form", { class: "card", id: "config-form" },
    field("config-os", "Operating system", os),
    h("fieldset", {}, h("legend", {}, "Applications"), h("div", { class: "checks" }, boxes)),
    field("request-vcpus", "vCPUs", vcpus),
    field("request-memory", "Memory (MiB)", memory),
    problems.list,
    submit);
  const progressBox = h("div", { id: "progress-box" });
  const body = () => {
    const mib = Number(memory.value) || 0;
    return {
      config: {
        os: { name: os.value, min_version: null },
        apps: boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value),
        vcpus: Number(vcpus.value) || 0,
        memory_mib: { min: mib, max: mib },
      },
    };
  };
  fill(main, heading("Request a machine configuration",
    "Pick an OS, applications and a size. hangar hands out the closest paused VM (exact, larger, or a bare shell given the OS), or builds one."),
  form, progressBox);
  wire(form, submit, body, (task) => taskProgress(progressBox, task, ctx), problems);
  ctx.done();
}
