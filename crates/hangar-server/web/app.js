// The console's shell: session, navigation, routing, errors.
//
// Routes are hash routes (`#/vms/ID`), so the server serves one page and the browser's
// back button works. Each route's page is a function `(main, ctx)` that fills `main` and
// registers what to undo when the page is left with `ctx.cleanup(fn)` (event
// subscriptions, sockets, timers). The role decides the nav; the server decides what is
// allowed (a page for a role that may not use it gets the API's 403 explained).

import { api, events, setCsrf, ApiError } from "./api.js";
import { h, fill } from "./lib.js";
import { signIn } from "./pages/signin.js";
import { services, requestService, configure } from "./pages/services.js";
import { vmList, vmPage } from "./pages/vms.js";
import { taskList } from "./pages/tasks.js";
import { usage } from "./pages/usage.js";
import * as admin from "./pages/admin.js";

const ROLES = { access: 1, provisioner: 2, admin: 3 };

/** Nav entries: [name, label, route, least role]. */
const NAV = [
  ["services", "Services", "#/services", "access"],
  ["vms", "My VMs", "#/vms", "access"],
  ["tasks", "Tasks", "#/tasks", "provisioner"],
  ["usage", "Usage", "#/usage", "access"],
  ["admin-hosts", "Hosts", "#/admin/hosts", "admin"],
  ["admin-vms", "All VMs", "#/admin/vms", "admin"],
  ["admin-pools", "Pools", "#/admin/pools", "admin"],
  ["admin-templates", "Templates", "#/admin/templates", "admin"],
  ["admin-images", "Images", "#/admin/images", "admin"],
  ["admin-policies", "Policies", "#/admin/policies", "admin"],
  ["admin-users", "Users", "#/admin/users", "admin"],
  ["admin-usage", "Usage by user", "#/admin/usage", "admin"],
  ["admin-audit", "Audit log", "#/admin/audit", "admin"],
];

/** Routes: [pattern, nav name, page]. Patterns' groups become `ctx.params`. */
const ROUTES = [
  [/^\/services$/, "services", services],
  [/^\/request\/([^/]+)$/, "services", requestService],
  [/^\/configure$/, "services", configure],
  [/^\/vms$/, "vms", vmList],
  [/^\/vms\/([^/]+)$/, "vms", vmPage],
  [/^\/tasks$/, "tasks", taskList],
  [/^\/usage$/, "usage", usage],
  [/^\/admin\/hosts$/, "admin-hosts", admin.hosts],
  [/^\/admin\/vms$/, "admin-vms", admin.allVms],
  [/^\/admin\/pools$/, "admin-pools", admin.pools],
  [/^\/admin\/templates$/, "admin-templates", admin.templates],
  [/^\/admin\/images$/, "admin-images", admin.images],
  [/^\/admin\/policies$/, "admin-policies", admin.policies],
  [/^\/admin\/users$/, "admin-users", admin.users],
  [/^\/admin\/usage$/, "admin-usage", admin.usageByUser],
  [/^\/admin\/audit$/, "admin-audit", admin.audit],
];

const state = { session: null, cleanups: [] };

/** Whether the signed-in role is at least `role`. */
export function may(role) {
  return Boolean(state.session) && ROLES[state.session.role] >= ROLES[role];
}

/** The signed-in session: `{user, role, csrf, expires_at}`. */
export function session() {
  return state.session;
}

/** Shows an error (an `ApiError`, an `Error` or text) in the alert region. */
export function flash(err, kind = "error") {
  const el = document.getElementById("flash");
  // A late answer to a request of an earlier session says nothing about this one.
  if (err?.stale) return;
  if (!err) {
    el.hidden = true;
    el.replaceChildren();
    return;
  }
  const message = err instanceof Error ? err.message : String(err);
  const hint = err instanceof ApiError ? hintFor(err) : null;
  fill(el, h("p", {}, message), hint ? h("p", { class: "hint" }, hint) : null,
    h("button", { type: "button", class: "quiet small", "aria-label": "Dismiss", onclick: () => flash(null) }, "Dismiss"));
  el.dataset.kind = kind;
  el.hidden = false;
}

function hintFor(err) {
  if (err.status === 403 && err.code === "csrf") return "Your session's page is out of date: reload the page.";
  if (err.status === 403) return `Your role (${state.session?.role}) does not allow this; an admin can give you a token of a higher role.`;
  if (err.status === 0) return "Check that `hangar server` is running, then reload.";
  if (err.status === 429) return "A quota or rate limit was reached; see Usage.";
  return null;
}

/** Navigates to `route` (a hash route like `#/vms/ID`). */
export function go(route) {
  if (location.hash === route) render();
  else location.hash = route;
}

function nav() {
  const current = routeOf(location.hash)?.[1];
  const link = ([name, label, route]) => h("a", {
    href: route, "data-nav": name, "aria-current": name === current ? "page" : null,
  }, label);
  const allowed = NAV.filter(([, , , role]) => may(role));
  fill(document.getElementById("nav"), allowed.filter((e) => e[3] !== "admin").map(link));
  const adminNav = document.getElementById("nav-admin");
  const adminLinks = allowed.filter((e) => e[3] === "admin");
  adminNav.hidden = adminLinks.length === 0;
  fill(adminNav, h("span", { class: "muted" }, "Admin"), adminLinks.map(link));
}

function routeOf(hash) {
  const path = (hash || "").replace(/^#/, "") || "/";
  for (const [pattern, navName, page] of ROUTES) {
    const match = path.match(pattern);
    if (match) return [page, navName, match.slice(1).map(decodeURIComponent)];
  }
  return null;
}

async function render() {
  for (const fn of state.cleanups.splice(0)) {
    try { fn(); } catch { /* a page's cleanup never stops the next page */ }
  }
  flash(null);
  const main = document.getElementById("page");
  if (!state.session) {
    document.getElementById("top").hidden = true;
    main.dataset.page = "signin";
    delete main.dataset.loading;
    signIn(main, { onSignedIn: started });
    return;
  }
  document.getElementById("top").hidden = false;
  nav();
  const found = routeOf(location.hash);
  if (!found) {
    location.replace(may("provisioner") ? "#/services" : "#/vms");
    return;
  }
  const [page, navName, params] = found;
  main.dataset.page = navName;
  main.dataset.loading = "";
  fill(main, h("p", { class: "muted" }, "Loading…"));
  const ctx = {
    params,
    session: state.session,
    cleanup: (fn) => state.cleanups.push(fn),
    done: () => delete main.dataset.loading,
  };
  try {
    await page(main, ctx);
  } catch (err) {
    fill(main, h("h1", {}, "This page could not be shown"), h("p", {}, err.message));
    flash(err);
  } finally {
    delete main.dataset.loading;
  }
  // Name the page for the tab and for screen readers; keyboard users who followed a nav
  // link land on the new page's content.
  const title = main.querySelector("h1")?.textContent;
  document.title = title ? `${title} · hangar` : "hangar";
  if (document.activeElement?.closest?.("nav") || document.activeElement === document.body) {
    main.focus({ preventScroll: true });
  }
}

async function started(sessionInfo) {
  state.session = sessionInfo;
  setCsrf(sessionInfo.csrf);
  document.getElementById("whoami").textContent = `${sessionInfo.user} · ${sessionInfo.role}`;
  events.start();
  await render();
}

async function signOut() {
  try {
    await api("DELETE", "/v1/session");
  } catch {
    // Signed out either way: the cookie is gone or was never valid.
  }
  ended();
}

function ended() {
  state.session = null;
  setCsrf(null);
  events.stop();
  render();
}

async function boot() {
  document.getElementById("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", () => render());
  window.addEventListener("hangar:signed-out", () => { if (state.session) ended(); });
  try {
    const info = await api("GET", "/v1/session");
    await started(info);
  } catch {
    await render();
  }
}

boot();
