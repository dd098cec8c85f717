//! Idempotency keys on `POST /v1/requests`: a retry under the same `Idempotency-Key` by
//! the same user gets the first call's answer (the same VM) instead of a second VM.
//!
//! The key is claimed in the store with one conditional write (so replicas sharing a
//! store agree on who runs the call); callers in this process that find it running wait on
//! its lock here, others poll the store. A successful answer is kept with the key; a failed
//! call releases it, so that a retry runs again. A key used again with another body is
//! refused (422).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use hangar_store::now_ms;
use sha2::{Digest, Sha256};

use crate::api::error::ApiError;
use crate::manager::Manager;

/// The lock of one (user, key).
type KeyLock = Arc<tokio::sync::Mutex<()>>;

/// One lock per (user, key) being answered in this process.
#[derive(Default)]
pub struct KeyLocks(Mutex<HashMap<(String, String), KeyLock>>);

impl KeyLocks {
    /// The lock of `user`'s `key`, made on first use.
    pub(crate) fn lock_of(&self, user: &str, key: &str) -> KeyLock {
        let mut locks = self.0.lock().expect("idempotency locks");
        // Forget locks nobody holds or waits for, so the map stays small.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks
            .entry((user.to_owned(), key.to_owned()))
            .or_default()
            .clone()
    }
}

/// How long a claimed key may stay unanswered before another call takes it over (its
/// holder died with the process).
const STALE_AFTER_MS: u64 = 10 * 60 * 1000;

/// How often a call waiting on another replica's answer looks at the store.
const POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The header's name.
pub const HEADER: &str = "idempotency-key";

/// The request's idempotency key, if it sent one; 400 for one that is empty, longer than
/// 255 characters, or not visible ASCII.
pub fn key_of(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key: 1-255 visible ASCII characters".into(),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// Runs `call` once for `user`'s `key` (with request `body`) and keeps its successful
/// answer: a later call with the key gets that answer (header `idempotent-replayed: true`),
/// a concurrent one waits for it. 422 when the key was used with another body.
pub async fn answer_once<F, Fut>(
    manager: &Manager,
    user: &str,
    key: &str,
    body: &[u8],
    call: F,
) -> Result<Response, ApiError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let fingerprint = hex::encode(Sha256::digest(body));
    let lock = manager.auth.idempotency.lock_of(user, key);
    let _held = lock.lock().await;
    loop {
        let now = now_ms();
        let claimed = manager
            .store()
            .claim_idempotency_key(
                user,
                key,
                &fingerprint,
                now,
                now.saturating_sub(STALE_AFTER_MS),
            )
            .await?;
        match claimed {
            None => break,
            Some(record) if record.fingerprint != fingerprint => {
                return Err(ApiError::Never {
                    message: format!(
                        "Idempotency-Key {key:?} was used with another request; use a new key"
                    ),
                    alternatives: Vec::new(),
                });
            }
            Some(record) => match record.answer {
                Some((status, body)) => return Ok(replay(status, body)),
                // Another replica runs it: wait for its answer.
                None => tokio::time::sleep(POLL).await,
            },
        }
    }
    match call().await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .map_err(ApiError::internal)?;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            manager
                .store()
                .answer_idempotency_key(user, key, parts.status.as_u16(), &text)
                .await?;
            let mut response = Response::from_parts(parts, axum::body::Body::from(bytes));
            response
                .headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("false"));
            Ok(response)
        }
        Err(err) => {
            if let Err(release) = manager.store().release_idempotency_key(user, key).await {
                tracing::warn!(key, error = %release, "cannot release an idempotency key");
            }
            Err(err)
        }
    }
}

/// A kept answer, sent again.
fn replay(status: u16, body: String) -> Response {
    let target = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|value| value["vm"].as_str().map(str::to_owned));
    let mut response = Response::new(axum::body::Body::from(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    if let Some(target) = target {
        response.extensions_mut().insert(super::AuditTarget(target));
    }
    response
}
