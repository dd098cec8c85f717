//! Signing in to the web console: `POST /v1/session` trades an API token for a session
//! cookie, `GET` tells who is signed in, `DELETE` signs out.
//!
//! A session is an API token of its own in the store (same user and role as the token
//! signed in with, expiring after [`SESSION_TTL`]): it survives a restart, works on every
//! replica, is listed by `hangar tokens` and revoked like any token. Its text travels only
//! in the `hangar_session` cookie (`HttpOnly`, `SameSite=Strict`), which
//! [`crate::api::auth::authenticate`] accepts on every `/v1` route sent without an
//! `Authorization` header. A cookie request that changes something (any method but GET,
//! HEAD, OPTIONS) must also carry `X-Hangar-CSRF`: [`csrf_of`] the session's text, which
//! only a page of this origin learns (from this route's answer).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use hangar_api::{SessionBody, SessionView};
use hangar_store::now_ms;
use sha2::{Digest, Sha256};

use crate::api::auth::{AuditTarget, AuditUser, Caller, tokens};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::{json_body, rfc3339};
use crate::manager::Manager;

/// The cookie that carries a session's token.
pub const COOKIE: &str = "hangar_session";

/// The header a cookie request that changes something must carry.
pub const CSRF_HEADER: &str = "x-hangar-csrf";

/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// In a request's extensions when its session cookie authenticated it.
#[derive(Debug, Clone)]
pub struct Session {
    /// What its `X-Hangar-CSRF` header must say.
    pub csrf: String,
}

/// The CSRF value of session token `text`: a hash of it under a label of its own. Only
/// the holder of the secret computes it; knowing it gives nothing of the secret.
pub fn csrf_of(text: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"hangar web session csrf v1\0");
    hasher.update(text.as_bytes());
    hex::encode(hasher.finalize())
}

/// The session token of a request's `hangar_session` cookie, if it sent one.
pub fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether the request came in over https: its `Host` is that of an `https://` server URL.
fn over_https(headers: &HeaderMap, server_urls: &[String]) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    server_urls.iter().any(|url| {
        url.strip_prefix("https://")
            .and_then(|rest| rest.split('/').next())
            .is_some_and(|authority| {
                authority.eq_ignore_ascii_case(host)
                    || authority
                        .split(':')
                        .next()
                        .is_some_and(|name| name.eq_ignore_ascii_case(host))
            })
    })
}

/// The `Set-Cookie` value giving `text` for `max_age_s` seconds (0: clears it).
fn cookie(text: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={text}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age_s}{secure}"
    ))
    .expect("a token is a header value")
}

/// Sign in: trades an API token for a session (a new token, in the `hangar_session`
/// cookie) of the same user and role, for 12 hours.
#[utoipa::path(
    post,
    path = "/v1/session",
    request_body = SessionBody,
    responses(
        (status = 200, body = SessionView, description = "signed in; the cookie is set", headers(("set-cookie" = String, description = "hangar_session=...; HttpOnly; SameSite=Strict"))),
        (status = 400, body = ErrorBody, description = "malformed body"),
        (status = 401, body = ErrorBody, description = "not a valid token"),
        (status = 500, body = ErrorBody, description = "something broke on the server's side"),
    )
)]
pub(crate) async fn sign_in(
    State(manager): State<Arc<Manager>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: SessionBody = json_body(&body)?;
    let caller = manager.resolve_token(body.token.trim()).await?;
    let now = now_ms();
    let ttl_ms = u64::try_from(SESSION_TTL.as_millis()).unwrap_or(u64::MAX);
    let minted = tokens::mint(&caller.user, caller.role, Some(now + ttl_ms), now);
    manager.store().insert_token(&minted.record).await?;
    let secure = over_https(&headers, &manager.config.server_urls);
    let view = SessionView {
        user: caller.user.clone(),
        role: caller.role,
        csrf: csrf_of(&minted.text),
        expires_at: rfc3339(now + ttl_ms),
    };
    Ok((
        [(
            header::SET_COOKIE,
            cookie(&minted.text, SESSION_TTL.as_secs(), secure),
        )],
        Extension(AuditUser(caller.user)),
        Extension(AuditTarget(minted.record.id)),
        Json(view),
    )
        .into_response())
}

/// The session of the request's cookie; 401 for a request without one.
fn session_of(session: Option<Extension<Session>>) -> Result<Session, ApiError> {
    session.map(|Extension(session)| session).ok_or_else(|| {
        ApiError::Unauthorized("not signed in: POST /v1/session with a token".into())
    })
}

/// Who is signed in, with the CSRF value and the session's end.
#[utoipa::path(
    get,
    path = "/v1/session",
    responses(
        (status = 200, body = SessionView),
        (status = 401, body = ErrorBody, description = "not signed in (no session cookie, or it expired or was revoked)"),
    )
)]
pub(crate) async fn current(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    session: Option<Extension<Session>>,
) -> Result<Json<SessionView>, ApiError> {
    let session = session_of(session)?;
    let record = manager
        .store()
        .token(&caller.token_id)
        .await?
        .ok_or_else(|| ApiError::Unauthorized("this session is gone".into()))?;
    Ok(Json(SessionView {
        user: caller.user,
        role: caller.role,
        csrf: session.csrf,
        expires_at: rfc3339(record.expires_at_ms.unwrap_or(0)),
    }))
}

/// Sign out: revokes the session and clears its cookie.
#[utoipa::path(
    delete,
    path = "/v1/session",
    responses(
        (status = 204, description = "signed out; the cookie is cleared"),
        (status = 401, body = ErrorBody, description = "not signed in"),
        (status = 403, body = ErrorBody, description = "no or a wrong X-Hangar-CSRF header"),
    )
)]
pub(crate) async fn sign_out(
    State(manager): State<Arc<Manager>>,
    Extension(caller): Extension<Caller>,
    session: Option<Extension<Session>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    session_of(session)?;
    manager
        .store()
        .revoke_token(&caller.token_id, now_ms())
        .await?;
    manager.auth.forget(&caller.token_id);
    let secure = over_https(&headers, &manager.config.server_urls);
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, cookie("", 0, secure))],
        Extension(AuditTarget(caller.token_id)),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others_and_csrf_depends_on_the_secret() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        assert_eq!(cookie_of(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("x=y;  hangar_session=hgr_abc ; z=w"),
        );
        assert_eq!(cookie_of(&headers).as_deref(), Some("hgr_abc"));
        assert_ne!(csrf_of("hgr_a"), csrf_of("hgr_b"));
        assert_eq!(csrf_of("hgr_a"), csrf_of("hgr_a"));
        assert!(!csrf_of("hgr_secret").contains("secret"));
    }

    #[test]
    fn secure_only_when_the_host_is_an_https_server_url() {
        let urls = vec![
            "https://hangar.example:8443".to_owned(),
            "http://plain.example".to_owned(),
        ];
        let host = |h: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static(h));
            headers
        };
        assert!(over_https(&host("hangar.example:8443"), &urls));
        assert!(!over_https(&host("plain.example"), &urls));
        assert!(!over_https(&host("127.0.0.1:8080"), &urls));
        let set = cookie("hgr_x", 43200, true);
        assert_eq!(
            set.to_str().unwrap(),
            "hangar_session=hgr_x; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200; Secure"
        );
    }
}
