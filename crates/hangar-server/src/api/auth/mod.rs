//! Who is calling, and whether they may: every route but `/healthz` wants a bearer token.
//!
//! - [`guard`] (every request, before routing): the `Host` header must name this server
//!   (an IP address, `localhost`, or a host of its configured URLs), so a web page cannot
//!   reach it through DNS rebinding; a request carrying an `Origin` of another site is
//!   refused; a body must be `application/json` (a browser sends `text/plain` across
//!   sites without asking first).
//! - [`authenticate`] (every route): resolves `Authorization: Bearer` (or, without one, the
//!   web session cookie, see [`crate::web::session`]) to a [`Caller`] (put in the
//!   request's extensions) or the farm token, checks [`roles::RULES`] and, for a cookie
//!   request that changes something, its `X-Hangar-CSRF` header; answers 401 or 403
//!   otherwise, and records every mutating call in the audit log.
//! - [`tokens`]: the token format, hashing, and the first start's `admin.token`.
//! - [`routes`]: `/v1/whoami`, `/v1/users`, `/v1/tokens`, `/v1/audit`.
//!
//! Checked tokens are cached in memory for [`CACHE_TTL`] (by id, with their hash, expiry
//! and role), so a request costs a hash and a map lookup, not a store read; a revocation
//! through this server drops its entry at once, one through another replica counts within
//! [`CACHE_TTL`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_core::Role;
use hangar_store::{AuditRecord, VmRecord, now_ms};

use crate::api::error::ApiError;
use crate::api::farm_auth::token_matches;
use crate::manager::Manager;

pub mod idempotency;
pub mod roles;
pub mod routes;
pub mod tokens;

/// How long a checked token is trusted without reading the store again.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// How often a token's last use is written to the store, at most.
const USE_MARK_EVERY_MS: u64 = 60_000;

/// The user a request's token speaks for: in the request's extensions of every route that
/// wants a user's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    /// The token's scope, never above its user's role.
    pub role: Role,
    pub token_id: String,
}

/// In the request's extensions when the farm token authenticated it.
#[derive(Debug, Clone, Copy)]
pub struct FarmTokenUsed;

/// Set by a handler on its answer: what the call acted on, for the audit log, when the
/// path does not say (the VM a request was granted, the token made).
#[derive(Debug, Clone)]
pub struct AuditTarget(pub String);

/// Set by an open route's handler on its answer: the user it acted for, for the audit
/// log (`POST /v1/session` names who signed in).
#[derive(Debug, Clone)]
pub struct AuditUser(pub String);

/// Tokens recently checked and idempotency keys being answered.
#[derive(Default)]
pub struct AuthRuntime {
    cache: Mutex<HashMap<String, Cached>>,
    pub(crate) idempotency: idempotency::KeyLocks,
}

struct Cached {
    hash: String,
    caller: Caller,
    expires_at_ms: Option<u64>,
    fetched: Instant,
    marked_used_ms: u64,
}

impl AuthRuntime {
    /// Forgets what is cached of token `id` (revoked: refused from now on).
    pub fn forget(&self, id: &str) {
        self.cache.lock().expect("token cache").remove(id);
    }
}

impl Manager {
    /// The caller `text` (a bearer token) speaks for; 401 for anything but a known,
    /// unexpired, unrevoked token whose user exists.
    pub async fn resolve_token(&self, text: &str) -> Result<Caller, ApiError> {
        let refused = || ApiError::Unauthorized("this API token is not valid".into());
        let id = tokens::token_id(text).ok_or_else(refused)?;
        let hash = tokens::hash(text);
        let now = now_ms();
        let mark_used = {
            let mut cache = self.auth.cache.lock().expect("token cache");
            match cache.get_mut(id) {
                Some(entry) if entry.fetched.elapsed() < CACHE_TTL => {
                    if !tokens::hashes_match(&entry.hash, &hash) {
                        return Err(refused());
                    }
                    if entry.expires_at_ms.is_some_and(|at| now >= at) {
                        return Err(ApiError::Unauthorized("this API token has expired".into()));
                    }
                    let caller = entry.caller.clone();
                    let mark = now.saturating_sub(entry.marked_used_ms) >= USE_MARK_EVERY_MS;
                    if mark {
                        entry.marked_used_ms = now;
                    }
                    Some((caller, mark))
                }
                _ => None,
            }
        };
        if let Some((caller, mark)) = mark_used {
            if mark {
                self.mark_used(&caller.token_id, now);
            }
            return Ok(caller);
        }
        let record = self.store.token(id).await?.ok_or_else(refused)?;
        if !tokens::hashes_match(&record.hash, &hash) {
            return Err(refused());
        }
        if !record.usable_at(now) {
            return Err(ApiError::Unauthorized(
                "this API token was revoked or has expired".into(),
            ));
        }
        let user = self.store.user(&record.user).await?.ok_or_else(refused)?;
        let caller = Caller {
            user: record.user.clone(),
            role: record.role.min(user.role),
            token_id: record.id.clone(),
        };
        self.auth.cache.lock().expect("token cache").insert(
            record.id.clone(),
            Cached {
                hash: record.hash,
                caller: caller.clone(),
                expires_at_ms: record.expires_at_ms,
                fetched: Instant::now(),
                marked_used_ms: now,
            },
        );
        self.mark_used(&record.id, now);
        Ok(caller)
    }

    /// Records a token's use in the background (a request does not wait for it).
    fn mark_used(&self, id: &str, now: u64) {
        let store = self.store.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            if let Err(err) = store.token_used(&id, now).await {
                tracing::debug!(token = %id, error = %err, "cannot record token use");
            }
        });
    }

    /// Whether `caller` may see VM `id` (for reads) or act on it (`act`): `Ok` when the VM
    /// does not exist (the command answers 404), 404 when the caller may not see it, 403
    /// when they see it but may not act on it.
    pub async fn check_vm_access(
        &self,
        caller: &Caller,
        id: &str,
        act: bool,
    ) -> Result<(), ApiError> {
        if caller.role == Role::Admin {
            return Ok(());
        }
        let Some(vm) = self.store.vm(id).await? else {
            return Ok(());
        };
        check_vm(caller, &vm, act)
    }
}

/// [`Manager::check_vm_access`] on a VM in hand.
pub fn check_vm(caller: &Caller, vm: &VmRecord, act: bool) -> Result<(), ApiError> {
    if !roles::visible(&caller.user, caller.role, vm) {
        return Err(ApiError::NotFound {
            message: format!("no VM {}", vm.id),
            alternatives: Vec::new(),
        });
    }
    if act && !roles::may_act(&caller.user, caller.role, vm) {
        return Err(ApiError::Forbidden(format!(
            "VM {} is not yours: only its owner or an admin may act on it",
            vm.id
        )));
    }
    Ok(())
}

/// The bearer token of a request, if it sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Whether a cookie request's `X-Hangar-CSRF` header is the CSRF value of its session
/// token `text` (compared in constant time).
fn csrf_passes(headers: &HeaderMap, text: &str) -> bool {
    let expected = crate::web::session::csrf_of(text);
    headers
        .get(crate::web::session::CSRF_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|given| tokens::hashes_match(given.trim(), &expected))
}

/// Who a request proved to be.
enum Who {
    Nobody,
    Farm,
    /// The metrics token: reads `/metrics`, nothing else.
    Scraper,
    User(Caller),
}

/// Middleware on every route: authentication, the role table, the audit log.
pub async fn authenticate(
    State(manager): State<Arc<Manager>>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let route = parts
        .extensions
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_default();
    let method = parts.method.clone();
    let rule_method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    let need = roles::need(rule_method, &route);
    // Who was refused for their role (the audit log names them).
    let mut refused_user = None;
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // A bearer token, or else the web session's cookie.
    let (given, by_cookie) = match bearer(&parts.headers) {
        Some(token) => (Some(token.to_owned()), false),
        None => (crate::web::session::cookie_of(&parts.headers), true),
    };
    let mut session = None;
    let who = match (need, given) {
        (roles::Need::Open, _) => Ok(Who::Nobody),
        (_, None) => Err(ApiError::Unauthorized(
            "send an API token as `Authorization: Bearer <token>` (`hangar login`; the first \
             admin's is in the data dir's admin.token), or sign in (POST /v1/session)"
                .into(),
        )),
        (roles::Need::Farm, Some(given))
            if !by_cookie && token_matches(&given, &manager.config.farm_token) =>
        {
            Ok(Who::Farm)
        }
        (roles::Need::Metrics, Some(given))
            if !by_cookie && token_matches(&given, &manager.config.metrics_token) =>
        {
            Ok(Who::Scraper)
        }
        (need, Some(given)) => match manager.resolve_token(&given).await {
            Ok(caller) if by_cookie && mutating && !csrf_passes(&parts.headers, &given) => {
                refused_user = Some(caller.user);
                Err(ApiError::Csrf(format!(
                    "{method} {route} with the session cookie needs its {} header \
                     (the csrf of GET /v1/session)",
                    crate::web::session::CSRF_HEADER
                )))
            }
            Ok(caller) if roles::role_passes(caller.role, need) => {
                if by_cookie {
                    session = Some(crate::web::session::Session {
                        csrf: crate::web::session::csrf_of(&given),
                    });
                }
                Ok(Who::User(caller))
            }
            Ok(caller) => {
                refused_user = Some(caller.user);
                Err(ApiError::Forbidden(format!(
                    "{method} {route} is not for a token of role {}",
                    caller.role
                )))
            }
            Err(err) => Err(err),
        },
    };
    let audited = mutating && route != "/v1/hosts/{name}/heartbeat";
    let path_target = if audited {
        RawPathParams::from_request_parts(&mut parts, &())
            .await
            .ok()
            .map(|params| {
                params
                    .iter()
                    .map(|(_, value)| value.to_owned())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .filter(|target| !target.is_empty())
    } else {
        None
    };
    let user = match &who {
        Ok(Who::User(caller)) => caller.user.clone(),
        Ok(Who::Farm) => "farm".to_owned(),
        Ok(Who::Scraper) => "metrics".to_owned(),
        Ok(Who::Nobody) | Err(_) => refused_user.unwrap_or_else(|| "-".to_owned()),
    };
    let response = match who {
        Ok(who) => {
            match who {
                Who::User(caller) => {
                    parts.extensions.insert(caller);
                    if let Some(session) = session {
                        parts.extensions.insert(session);
                    }
                }
                Who::Farm => {
                    parts.extensions.insert(FarmTokenUsed);
                }
                Who::Scraper | Who::Nobody => {}
            }
            next.run(Request::from_parts(parts, body)).await
        }
        Err(err) => err.into_response(),
    };
    if audited {
        let user = response
            .extensions()
            .get::<AuditUser>()
            .map_or(user, |named| named.0.clone());
        let target = response
            .extensions()
            .get::<AuditTarget>()
            .map(|target| target.0.clone())
            .or(path_target);
        let entry = AuditRecord {
            seq: 0,
            at_ms: now_ms(),
            user,
            method: method.to_string(),
            route,
            target,
            status: response.status().as_u16(),
        };
        if let Err(err) = manager.store.insert_audit(&entry).await {
            tracing::warn!(error = %crate::api::error::error_chain(&err), "cannot write the audit log");
        }
    }
    response
}

/// Middleware on every request, before routing: the `Host` and `Origin` checks and JSON
/// bodies (see the module documentation).
pub async fn guard(State(manager): State<Arc<Manager>>, request: Request, next: Next) -> Response {
    use axum::body::HttpBody;
    // A body of unknown length (chunked, HTTP/2) counts as a body.
    let has_body = request.body().size_hint().exact() != Some(0);
    // An imported disk image travels as itself (`application/octet-stream`), which a
    // cross-site page cannot send without a preflight: its route alone takes it.
    let upload = request.method() == axum::http::Method::POST
        && request.uri().path() == "/v1/imports"
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|media| {
                media
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .eq_ignore_ascii_case("application/octet-stream")
            });
    match check_request(
        request.headers(),
        has_body && !upload,
        &manager.config.server_urls,
    ) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// The checks of [`guard`] on a request's headers and whether it has a body;
/// `server_urls` name this server too.
pub fn check_request(
    headers: &HeaderMap,
    has_body: bool,
    server_urls: &[String],
) -> Result<(), ApiError> {
    let host = headers.get(header::HOST).map(|value| value.to_str());
    if let Some(host) = host {
        let host = host.map_err(|_| ApiError::BadRequest("Host header is not text".into()))?;
        if !host_allowed(host, server_urls) {
            return Err(ApiError::Forbidden(format!(
                "Host {host:?} does not name this server (use its IP address or localhost)"
            )));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("null");
            let authority = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            if authority.is_none_or(|authority| !authority.eq_ignore_ascii_case(host)) {
                return Err(ApiError::Forbidden(format!(
                    "requests from pages of another origin ({origin}) are refused"
                )));
            }
        }
    } else if headers.contains_key(header::ORIGIN) {
        return Err(ApiError::Forbidden(
            "a request with an Origin must name its Host".into(),
        ));
    }
    if has_body {
        let media = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let essence = media.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "request bodies must be application/json, not {:?}",
                if media.is_empty() { "(none)" } else { media }
            )));
        }
    }
    Ok(())
}

/// Whether a `Host` header names this server: an IP address (a DNS rebinding attack
/// needs a name), `localhost`, or the host of one of `server_urls`.
fn host_allowed(host: &str, server_urls: &[String]) -> bool {
    let name = host_name(host);
    if name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok() {
        return true;
    }
    server_urls.iter().any(|url| {
        let authority = url
            .split_once("://")
            .map_or(url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        host_name(authority).eq_ignore_ascii_case(name)
    })
}

/// The host of `host[:port]` (an IPv6 address without its brackets).
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(name, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                name
            } else {
                authority
            }
        })
}

#[cfg(test)]
mod tests;
