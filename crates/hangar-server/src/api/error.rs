//! The one place where errors become HTTP answers.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An error as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The thing asked for does not exist (and never will under this name).
    #[error("{message}")]
    NotFound {
        message: String,
        alternatives: Vec<String>,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed, but can never be satisfied ("will never be available").
    #[error("{message}")]
    Never {
        message: String,
        alternatives: Vec<String>,
    },
    /// Not now: the state of the thing forbids it.
    #[error("{0}")]
    Conflict(String),
    /// Try again shortly: the work goes on (task) and should be done within `retry_after_s`.
    #[error("{message}")]
    TryAgain {
        message: String,
        retry_after_s: u64,
        task: Option<String>,
    },
    /// Something on our side broke.
    #[error("{0}")]
    Internal(String),
}

pub use hangar_api::{ErrorBody, ErrorDetail};

impl ApiError {
    pub fn internal(err: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(err.to_string())
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Never { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TryAgain { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Never { .. } => "never",
            ApiError::Conflict(_) => "conflict",
            ApiError::TryAgain { .. } => "try_again",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<hangar_store::StoreError> for ApiError {
    fn from(err: hangar_store::StoreError) -> ApiError {
        match err {
            hangar_store::StoreError::Conflict(err) => ApiError::Conflict(err.to_string()),
            other => ApiError::Internal(format!("store: {}", error_chain(&other))),
        }
    }
}

impl From<crate::lifecycle::ops::LifecycleError> for ApiError {
    fn from(err: crate::lifecycle::ops::LifecycleError) -> ApiError {
        use crate::lifecycle::ops::LifecycleError;
        match err {
            LifecycleError::NoVm(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            LifecycleError::WrongState { .. } | LifecycleError::StillCreating(_) => {
                ApiError::Conflict(err.to_string())
            }
            LifecycleError::Store(err) => err.into(),
            LifecycleError::Pause { .. }
            | LifecycleError::Resume { .. }
            | LifecycleError::Destroy { .. }
            | LifecycleError::Host(_)
            | LifecycleError::NotReady { .. } => ApiError::Internal(error_chain(&err)),
        }
    }
}

/// `err` and its sources, joined with ": ".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let next = err.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = err.source();
    }
    text
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        let (alternatives, task, retry_after_s) = match &self {
            ApiError::NotFound { alternatives, .. } | ApiError::Never { alternatives, .. } => {
                (alternatives.clone(), None, None)
            }
            ApiError::TryAgain {
                retry_after_s,
                task,
                ..
            } => (Vec::new(), task.clone(), Some(*retry_after_s)),
            _ => (Vec::new(), None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
                alternatives,
                task,
                retry_after_s,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after_s
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

#[cfg(test)]
mod lifecycle_status_tests {
    use super::*;
    use crate::lifecycle::ops::LifecycleError;
    use hangar_core::VmState;

    #[test]
    fn lifecycle_errors_map_to_their_statuses_with_their_messages() {
        let cases = [
            (
                LifecycleError::NoVm("vm-1".into()),
                StatusCode::NOT_FOUND,
                "no VM vm-1",
            ),
            (
                LifecycleError::WrongState {
                    id: "vm-1".into(),
                    state: VmState::Ready,
                    rule: "only an active VM can sleep",
                },
                StatusCode::CONFLICT,
                "VM vm-1 is ready; only an active VM can sleep",
            ),
            (
                LifecycleError::StillCreating("vm-1".into()),
                StatusCode::CONFLICT,
                "VM vm-1 is still being created; delete it once its task ends",
            ),
            (
                LifecycleError::Pause {
                    id: "vm-1".into(),
                    source: hangar_host::HostError::NoAgent,
                },
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot pause VM vm-1: no agent channel",
            ),
        ];
        for (err, status, message) in cases {
            let api = ApiError::from(err);
            assert_eq!((api.status(), api.to_string().as_str()), (status, message));
        }
    }
}
