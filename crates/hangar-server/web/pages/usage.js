// My usage and cost (`GET /v1/usage`: a non-admin sees only their own rows).

import { get } from "../api.js";
import { h, fill, heading, table } from "../lib.js";

/** Fills `tbody` with usage rows (and the total) of a `GET /v1/usage` answer. */
export function usageRows(tbody, answer) {
  const num = (x, digits = 2) => Number(x || 0).toFixed(digits);
  const rows = [...answer.rows, { ...answer.total, key: "total" }];
  fill(tbody, rows.map((row) => h("tr", { "data-usage": row.key, class: row.key === "total" ? "total" : null },
    h("th", { scope: "row" }, row.key),
    h("td", { class: "num" }, row.vms),
    h("td", { class: "num" }, num(row.active_vcpu_hours)),
    h("td", { class: "num" }, num(row.active_gib_hours)),
    h("td", { class: "num" }, num(row.sleeping_gib_hours)),
    h("td", { class: "num" }, num(row.archive_gb_hours, 3)),
    h("td", { class: "num" }, num(row.cost)))));
}

export const USAGE_HEADERS = ["Who", "VMs", "Active vCPU·h", "Active GiB·h", "Sleeping GiB·h", "Archive GB·h", "Cost"];

export async function usage(main, ctx) {
  const since = h("select", { id: "usage-since", "aria-label": "Period" },
    h("option", { value: "24h" }, "last 24 hours"),
    h("option", { value: "7d" }, "last 7 days"),
    h("option", { value: "30d" }, "last 30 days"));
  const { tbody, wrap } = table("usage-table", "My usage", USAGE_HEADERS);
  const prices = h("p", { class: "muted", id: "usage-prices" });
  const load = async () => {
    const answer = await get(`/v1/usage?since=${since.value}`);
    usageRows(tbody, answer);
    const p = answer.prices;
    prices.textContent = `Prices: ${p.active_vcpu_hour} per active vCPU·hour, ${p.active_gib_hour} per active GiB·hour, `
      + `${p.sleeping_gib_hour} per sleeping GiB·hour, ${p.archive_gb_hour} per archived GB·hour.`;
  };
  since.addEventListener("change", () => load());
  fill(main, heading("My usage", "What your VMs used and what it costs, by the server's prices."),
    h("p", {}, h("label", { for: "usage-since" }, "Period "), since), wrap, prices);
  await load();
  ctx.done();
}
