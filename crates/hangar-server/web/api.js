// The REST API from the page, and the live event stream.
//
// Contract: every call goes to the same origin with the session cookie (HttpOnly: the page
// never sees the token); calls that change something carry `X-Hangar-CSRF` with the token
// `GET /v1/session` gave. Errors become `ApiError` with the server's code and message.

let csrf = null;
// Counts session changes (sign-in, sign-out). A request remembers the generation it was sent
// in, so that its late answer cannot end or flash over a session begun since.
let generation = 0;

/** An error answer of the API: `status`, `code`, `message`, and the whole `body`. */
export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `the server answered ${status}`);
    this.status = status;
    this.code = err.code || "http_" + status;
    this.body = body;
    /** Whether the request was sent in an earlier session than the page's current one. */
    this.stale = false;
  }
}

/** Remembers the CSRF token of the session (from sign-in or `GET /v1/session`). */
export function setCsrf(token) {
  csrf = token;
  generation += 1;
}

/**
 * Calls `method path` with an optional JSON `body`; resolves to the parsed JSON answer
 * (`null` for 204), rejects with `ApiError`. `headers` adds request headers; with
 * `{raw: true}` the `Response` is returned as is (for status-dependent answers).
 */
export async function api(method, path, body, { headers = {}, raw = false } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (method !== "GET" && method !== "HEAD" && csrf) init.headers["X-Hangar-CSRF"] = csrf;
  const sentIn = generation;
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, { error: { code: "unreachable", message: `cannot reach the hangar server (${err.message}); is it running?` } });
  }
  if (raw) return response;
  return parse(response, sentIn);
}

/**
 * The JSON of `response`, or `ApiError` when it is not a success. `sentIn` is the session
 * generation the request was sent in (the current one when not given): a 401 ends the
 * page's session only when it answers a request of that session; an older one's error is
 * marked `stale`.
 */
export async function parse(response, sentIn = generation) {
  const text = await response.text();
  let json = null;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = { error: { code: "not_json", message: text.slice(0, 300) } };
    }
  }
  if (!response.ok) {
    const err = new ApiError(response.status, json);
    err.stale = sentIn !== generation;
    if (response.status === 401 && !err.stale) window.dispatchEvent(new CustomEvent("hangar:signed-out"));
    throw err;
  }
  return json;
}

export const get = (path) => api("GET", path);

/**
 * The live event stream (`GET /v1/events`): one `EventSource` for the page, reconnecting
 * on its own. `on(kind, fn)` subscribes to `vm`, `task`, `pool`, `host`, `template` and
 * `image` events (data parsed as JSON) and returns the unsubscribe function.
 */
class Events {
  constructor() {
    this.handlers = new Map();
    this.source = null;
    this.kinds = ["vm", "task", "pool", "host", "template", "image"];
  }

  start() {
    if (this.source) return;
    const source = new EventSource("/v1/events");
    this.source = source;
    source.onopen = () => setLive(true);
    source.onerror = () => setLive(source.readyState === EventSource.OPEN);
    for (const kind of this.kinds) {
      source.addEventListener(kind, (event) => {
        let data = {};
        try {
          data = JSON.parse(event.data);
        } catch {
          return;
        }
        for (const fn of this.handlers.get(kind) || []) fn(data);
      });
    }
  }

  stop() {
    if (this.source) this.source.close();
    this.source = null;
    setLive(false);
  }

  on(kind, fn) {
    if (!this.handlers.has(kind)) this.handlers.set(kind, new Set());
    this.handlers.get(kind).add(fn);
    return () => this.handlers.get(kind).delete(fn);
  }
}

function setLive(on) {
  const el = document.getElementById("live");
  if (!el) return;
  el.dataset.live = on ? "on" : "off";
  el.textContent = on ? "live" : "offline";
  el.title = on ? "Lists update as things change" : "Not receiving live updates; reconnecting";
}

export const events = new Events();
