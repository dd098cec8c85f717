// Sign-in with an API token. The token goes to `POST /v1/session` once; the server answers
// with an HttpOnly session cookie, so the page never keeps the token.

import { api } from "../api.js";
import { h, fill } from "../lib.js";

export function signIn(main, { onSignedIn }) {
  const error = h("p", { id: "signin-error", class: "error", role: "alert", hidden: true });
  const token = h("input", {
    id: "signin-token", name: "token", type: "password", autocomplete: "current-password",
    required: true, spellcheck: "false", "aria-describedby": "signin-help",
  });
  const submit = h("button", { id: "signin-submit", type: "submit" }, "Sign in");
  const form = h("form", { class: "card signin", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in to hangar"),
    h("label", { for: "signin-token" }, "API token"),
    token,
    h("p", { id: "signin-help", class: "muted" },
      "Paste a token made with ", h("code", {}, "hangar tokens create"),
      ". The first admin's token is in the server's data directory, in ", h("code", {}, "admin.token"), "."),
    error,
    submit);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    submit.disabled = true;
    try {
      const info = await api("POST", "/v1/session", { token: token.value.trim() });
      token.value = "";
      await onSignedIn(info);
    } catch (err) {
      error.textContent = err.status === 401
        ? "That token is not valid (revoked, expired or mistyped). Ask an admin for a new one."
        : err.message;
      error.hidden = false;
      token.focus();
    } finally {
      submit.disabled = false;
    }
  });
  fill(main, form);
  token.focus();
}
