// Tasks: the list of my tasks, and one task's live progress with cancel.
//
// Progress follows `task` events from the live stream and reads the task again on each
// (its steps are not in the event); a slow timer re-reads too, in case the stream drops.

import { api, get, events } from "../api.js";
import { h, fill, setText, heading, table, syncRows, ago, badge, empty } from "../lib.js";
import { flash } from "../app.js";

const ENDED = new Set(["succeeded", "failed", "cancelled"]);

/**
 * Shows task `id`'s progress in `box` until it ends: stage, percent, steps, a cancel
 * button while it runs, and a link to the VM when it succeeded.
 */
export function taskProgress(box, id, ctx) {
  const stage = h("span", { id: "task-stage" }, "queued");
  const percent = h("progress", { id: "task-percent", max: 100, value: 0, "aria-label": "Progress" });
  const steps = h("ol", { class: "steps", id: "task-steps" });
  const result = h("div", { id: "task-result" });
  const cancel = h("button", { type: "button", id: "task-cancel", class: "danger" }, "Cancel");
  const panel = h("section", { id: "task-progress", class: "card", "data-state": "running", "aria-live": "polite" },
    h("h2", {}, "Task ", h("code", {}, id)),
    h("p", {}, "Stage: ", stage), percent, steps, cancel, result);
  fill(box, panel);
  let ended = false;
  const refresh = async () => {
    if (ended) return;
    let task;
    try {
      task = await get(`/v1/tasks/${encodeURIComponent(id)}`);
    } catch (err) {
      flash(err);
      return;
    }
    panel.dataset.state = task.state;
    setText(stage, task.stage);
    percent.value = task.percent;
    fill(steps, (task.steps || []).map((s) => h("li", { "data-outcome": s.outcome || "running" },
      `${s.stage} `, h("span", { class: "muted" }, s.outcome || `${s.percent}%`),
      s.error ? h("span", { class: "error" }, ` ${s.error}`) : null)));
    if (ENDED.has(task.state)) {
      ended = true;
      cancel.hidden = true;
      if (task.state === "succeeded" && task.vm) {
        fill(result, h("p", {}, "Ready. ", h("a", { id: "task-vm", href: `#/vms/${encodeURIComponent(task.vm)}` }, `Open VM ${task.vm}`)));
      } else if (task.state === "failed") {
        fill(result, h("p", { class: "error" }, `Failed: ${task.error || "no reason given"}. Nothing was left behind; you can try again.`));
      } else if (task.state === "cancelled") {
        fill(result, h("p", {}, "Cancelled; what it had made was undone."));
      }
    }
  };
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api("POST", `/v1/tasks/${encodeURIComponent(id)}/cancel`);
    } catch (err) {
      flash(err);
    }
    cancel.disabled = false;
    refresh();
  });
  ctx.cleanup(events.on("task", (event) => { if (event.id === id) refresh(); }));
  const timer = setInterval(refresh, 3000);
  ctx.cleanup(() => clearInterval(timer));
  refresh();
}

export async function taskList(main, ctx) {
  const { el, tbody, wrap } = table("task-table", "Tasks", ["Task", "Kind", "Service", "State", "Progress", "VM", "Started", ""]);
  const none = empty("tasks-empty", "No tasks yet", "Long work (creating a VM, building an image, archiving) shows here while it runs and after.");
  fill(main, heading("Tasks", "Long operations, newest first. A running task can be cancelled: what it did is undone."), wrap, none);
  const build = () => h("tr", {},
    h("td", {}, h("code", {})), h("td", {}), h("td", {}), h("td", {}), h("td", {}, h("progress", { max: 100 })), h("td", {}), h("td", {}), h("td", {}));
  const update = (row, task) => {
    const cells = row.children;
    setText(cells[0].firstChild, task.id);
    setText(cells[1], task.kind);
    setText(cells[2], task.service || "");
    if (cells[3].textContent !== task.state) fill(cells[3], badge(task.state));
    cells[4].firstChild.value = task.percent;
    cells[4].firstChild.setAttribute("aria-label", `${task.stage} ${task.percent}%`);
    fill(cells[5], task.vm ? h("a", { href: `#/vms/${encodeURIComponent(task.vm)}` }, task.vm) : "");
    fill(cells[6], ago(task.created_at));
    fill(cells[7], ENDED.has(task.state) ? "" : h("button", {
      type: "button", class: "small danger", "data-action": "cancel",
      onclick: async () => {
        try { await api("POST", `/v1/tasks/${encodeURIComponent(task.id)}/cancel`); } catch (err) { flash(err); }
      },
    }, "Cancel"));
  };
  const load = async () => {
    const tasks = await get("/v1/tasks");
    el.hidden = tasks.length === 0;
    none.hidden = tasks.length !== 0;
    syncRows(tbody, tasks, "data-task", (t) => t.id, build, update);
  };
  await load();
  ctx.cleanup(events.on("task", () => load().catch(flash)));
  ctx.done();
}
