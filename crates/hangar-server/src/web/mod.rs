//! The web console's server side (issue 16): the pages' files, sign-in sessions, live
//! events and VMs' serial consoles. The contract with the pages is in DESIGN.md's
//! "Web console" section.
//!
//! - [`assets`]: `GET /` and `GET /static/{*path}`, the files of `crates/hangar-server/web/`
//!   embedded in the binary, with the security headers of [`security_headers`].
//! - [`session`]: `/v1/session`, signing in with a token for a cookie; the cookie's checks
//!   (and the CSRF header) live in [`crate::api::auth::authenticate`].
//! - [`events`]: `GET /v1/events`, server-sent events of what changed.
//! - [`console`]: `GET /v1/vms/{id}/console` and its websocket.
//!
//! The `/v1` routes are part of the API (its router, role table and OpenAPI document);
//! [`router`] serves the files, and [`app`] is the whole server: the API and the files.

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;

use crate::manager::Manager;

pub mod assets;
pub mod console;
pub mod events;
pub mod session;

/// What pages and files may load: only this server's own scripts, styles and connections;
/// never framed by another site.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src \
     'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// Everything `hangar server` answers: the API ([`crate::api::router`], whose JSON 404
/// answers any other path) and the console's files ([`router`]).
pub fn app(manager: Arc<Manager>) -> Router {
    crate::api::router(manager.clone()).merge(router(manager))
}

/// `GET /` and `GET /static/{*path}`, behind the same [`crate::api::auth::guard`] as the
/// API (Host and Origin checks), with [`security_headers`] on every answer.
pub fn router(manager: Arc<Manager>) -> Router {
    Router::new()
        .route("/", get(assets::index))
        .route("/static/{*path}", get(assets::asset))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::middleware::from_fn_with_state(
            manager,
            crate::api::auth::guard,
        ))
}

/// Middleware: the Content-Security-Policy, `nosniff` and `no-referrer` headers.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests;
