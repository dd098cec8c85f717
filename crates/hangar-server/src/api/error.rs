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
    /// A configuration with hard problems (422): each with its field and a suggestion.
    #[error("{message}")]
    Unservable {
        message: String,
        problems: Vec<hangar_core::heuristics::Problem>,
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
    /// The store has no database server that takes writes (it is down or failing over):
    /// 503 with `Retry-After` [`STORE_RETRY_AFTER_S`]. Nothing was done, or (for a write
    /// whose commit's answer was lost) it was done whole; never half.
    #[error("{0}")]
    StoreUnavailable(String),
    /// Over a quota: nothing is made until the caller holds less (or the quota grows).
    #[error("{0}")]
    QuotaExceeded(String),
    /// The caller did not prove who it is (no or a wrong bearer token).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller is known but may not do this (its role, or someone else's VM), or the
    /// request came from a page of another origin or under another host name.
    #[error("{0}")]
    Forbidden(String),
    /// A request authenticated by the web session cookie that changes something came
    /// without the session's `X-Hangar-CSRF` header (or with a wrong one).
    #[error("{0}")]
    Csrf(String),
    /// The request body is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Something on our side broke.
    #[error("{0}")]
    Internal(String),
}

pub use hangar_api::{ErrorBody, ErrorDetail};

/// The `Retry-After` of an answer given while the store is unavailable: a failover to a
/// standby takes seconds.
pub const STORE_RETRY_AFTER_S: u64 = 2;

impl ApiError {
    pub fn internal(err: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(err.to_string())
    }

    /// Something on our side broke: 500 with `err`'s chain, unless a store error in that
    /// chain says no database server takes writes (then 503, [`ApiError::StoreUnavailable`]).
    pub fn broke(err: &(dyn std::error::Error + 'static)) -> ApiError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(next) = source {
            if next
                .downcast_ref::<hangar_store::StoreError>()
                .is_some_and(hangar_store::StoreError::is_unavailable)
            {
                return ApiError::StoreUnavailable(format!(
                    "store unavailable: {}",
                    error_chain(err)
                ));
            }
            source = next.source();
        }
        ApiError::Internal(error_chain(err))
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Never { .. } | ApiError::Unservable { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TryAgain { .. } | ApiError::StoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) | ApiError::Csrf(_) => StatusCode::FORBIDDEN,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Never { .. } => "never",
            ApiError::Unservable { .. } => "invalid_configuration",
            ApiError::Conflict(_) => "conflict",
            ApiError::TryAgain { .. } => "try_again",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::QuotaExceeded(_) => "quota_exceeded",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Csrf(_) => "csrf",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<hangar_store::StoreError> for ApiError {
    fn from(err: hangar_store::StoreError) -> ApiError {
        match err {
            hangar_store::StoreError::Conflict(err) => ApiError::Conflict(err.to_string()),
            other if other.is_unavailable() => {
                ApiError::StoreUnavailable(format!("store unavailable: {}", error_chain(&other)))
            }
            other => ApiError::Internal(format!("store: {}", error_chain(&other))),
        }
    }
}

impl From<crate::metrics::scrape::ScrapeError> for ApiError {
    fn from(err: crate::metrics::scrape::ScrapeError) -> ApiError {
        use crate::metrics::scrape::ScrapeError;
        match err {
            ScrapeError::Hosts(err) => err.into(),
            ScrapeError::Pools(err) => err.into(),
            ScrapeError::Store(err) => err.into(),
        }
    }
}

impl From<crate::farm::FarmError> for ApiError {
    fn from(err: crate::farm::FarmError) -> ApiError {
        use crate::farm::FarmError;
        match err {
            FarmError::Invalid(message) => ApiError::BadRequest(message),
            FarmError::NameTaken(_) => ApiError::Conflict(err.to_string()),
            FarmError::NotRegistered(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            FarmError::Store(err) => err.into(),
        }
    }
}

impl From<crate::scheduler::preview::PreviewError> for ApiError {
    fn from(err: crate::scheduler::preview::PreviewError) -> ApiError {
        use crate::scheduler::PlacementError;
        use crate::scheduler::preview::PreviewError;
        match err {
            PreviewError::Invalid(message) => ApiError::BadRequest(message),
            PreviewError::Request(err) => err.into(),
            PreviewError::Placement(PlacementError::NoHost(no_host)) => ApiError::TryAgain {
                message: no_host.to_string(),
                retry_after_s: 2,
                task: None,
            },
            PreviewError::Placement(other) => ApiError::broke(&other),
        }
    }
}

impl From<crate::tasks::CancelError> for ApiError {
    fn from(err: crate::tasks::CancelError) -> ApiError {
        use crate::tasks::CancelError;
        match err {
            CancelError::NotFound(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            CancelError::NotOwner { .. } => ApiError::Forbidden(err.to_string()),
            CancelError::Ended { .. }
            | CancelError::RollingBack { .. }
            | CancelError::NotHere(_) => ApiError::Conflict(err.to_string()),
            CancelError::Store(err) => err.into(),
        }
    }
}

impl From<crate::migration::MigrationError> for ApiError {
    fn from(err: crate::migration::MigrationError) -> ApiError {
        use crate::migration::MigrationError;
        match err {
            MigrationError::NoVm(_) | MigrationError::NoHost(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            MigrationError::Store(err) => err.into(),
            MigrationError::SameHost { .. }
            | MigrationError::WrongState { .. }
            | MigrationError::NotOnFarm { .. }
            | MigrationError::AlreadyMoving { .. }
            | MigrationError::StackMember { .. }
            | MigrationError::Destination { .. } => ApiError::Conflict(err.to_string()),
        }
    }
}

impl From<crate::evacuation::EvacuationError> for ApiError {
    fn from(err: crate::evacuation::EvacuationError) -> ApiError {
        use crate::evacuation::EvacuationError;
        match err {
            EvacuationError::NoHost(_) | EvacuationError::NoEvacuation(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            EvacuationError::Store(err) => err.into(),
            EvacuationError::NotOnFarm(_)
            | EvacuationError::NotAnswering { .. }
            | EvacuationError::Evacuating { .. } => ApiError::Conflict(err.to_string()),
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
            | LifecycleError::NotReady { .. } => ApiError::broke(&err),
        }
    }
}

impl From<crate::stacks::StacksError> for ApiError {
    fn from(err: crate::stacks::StacksError) -> ApiError {
        use crate::stacks::StacksError;
        use hangar_core::stack::StackError;
        match err {
            StacksError::Invalid(StackError::UnknownService {
                ref alternatives, ..
            }) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: alternatives.clone(),
            },
            StacksError::Invalid(_) => ApiError::BadRequest(err.to_string()),
            StacksError::NotFound(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            StacksError::NameTaken(_) | StacksError::WrongState { .. } | StacksError::NoSegment => {
                ApiError::Conflict(err.to_string())
            }
            StacksError::Member { ref source, .. }
                if matches!(
                    **source,
                    crate::lifecycle::ops::LifecycleError::WrongState { .. }
                ) =>
            {
                ApiError::Conflict(error_chain(&err))
            }
            StacksError::Member { .. } => ApiError::broke(&err),
            StacksError::Store(err) => err.into(),
        }
    }
}

impl From<crate::imports::ImportsError> for ApiError {
    fn from(err: crate::imports::ImportsError) -> ApiError {
        use crate::imports::ImportsError;
        match err {
            ImportsError::BadRequest(message) => ApiError::BadRequest(message),
            ImportsError::Refused(_) => ApiError::Never {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            ImportsError::NameTaken(_) | ImportsError::InUse { .. } => {
                ApiError::Conflict(err.to_string())
            }
            ImportsError::NotFound(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            ImportsError::Store(err) => err.into(),
            ImportsError::Disabled | ImportsError::Failed(_) => ApiError::Internal(err.to_string()),
        }
    }
}

impl From<crate::requests::RequestError> for ApiError {
    fn from(err: crate::requests::RequestError) -> ApiError {
        use crate::requests::RequestError;
        match err {
            RequestError::Invalid(message) => ApiError::BadRequest(message),
            RequestError::Unservable(ref verdict) => ApiError::Unservable {
                message: err.to_string(),
                problems: verdict.problems.clone(),
            },
            RequestError::Settings(_) => ApiError::BadRequest(error_chain(&err)),
            RequestError::NotFound {
                message,
                alternatives,
            } => ApiError::NotFound {
                message,
                alternatives,
            },
            RequestError::Never {
                message,
                alternatives,
            } => ApiError::Never {
                message,
                alternatives,
            },
            RequestError::TryAgain {
                message,
                retry_after_s,
                task,
            } => ApiError::TryAgain {
                message,
                retry_after_s,
                task,
            },
            RequestError::Store(err) => err.into(),
            RequestError::NoHost(message) => ApiError::TryAgain {
                message,
                retry_after_s: 5,
                task: None,
            },
            RequestError::Quota(exceeded) => ApiError::QuotaExceeded(exceeded.to_string()),
            RequestError::TooLarge(too_large) => ApiError::Never {
                message: too_large.to_string(),
                alternatives: Vec::new(),
            },
            RequestError::CreationFailed(_) | RequestError::TaskLost(_) => ApiError::broke(&err),
        }
    }
}

impl From<crate::pools::PoolError> for ApiError {
    fn from(err: crate::pools::PoolError) -> ApiError {
        use crate::pools::PoolError;
        match err {
            PoolError::NotFound {
                ref alternatives, ..
            } => ApiError::NotFound {
                alternatives: alternatives.clone(),
                message: err.to_string(),
            },
            PoolError::Invalid(message) => ApiError::BadRequest(message),
            PoolError::Store(err) => err.into(),
            PoolError::UnknownService { .. } | PoolError::Vanished(_) | PoolError::Encode(_) => {
                ApiError::broke(&err)
            }
        }
    }
}

impl From<crate::lifecycle::policy::PolicyError> for ApiError {
    fn from(err: crate::lifecycle::policy::PolicyError) -> ApiError {
        use crate::lifecycle::policy::PolicyError;
        match err {
            PolicyError::NoVm(_) => ApiError::NotFound {
                message: err.to_string(),
                alternatives: Vec::new(),
            },
            PolicyError::NoService {
                ref alternatives, ..
            } => ApiError::NotFound {
                alternatives: alternatives.clone(),
                message: err.to_string(),
            },
            PolicyError::Invalid(message) => ApiError::BadRequest(message),
            PolicyError::BelowFloor(message) => ApiError::Never {
                message,
                alternatives: Vec::new(),
            },
            PolicyError::Lifecycle(err) => err.into(),
            PolicyError::Store(err) => err.into(),
            PolicyError::Encode(_) | PolicyError::Vanished(_) | PolicyError::RemoveImage { .. } => {
                ApiError::broke(&err)
            }
        }
    }
}

impl From<crate::images::policy::ImageError> for ApiError {
    fn from(err: crate::images::policy::ImageError) -> ApiError {
        use crate::images::policy::ImageError;
        match err {
            ImageError::Request(err) => err.into(),
            ImageError::Guest(_) => ApiError::BadRequest(error_chain(&err)),
            ImageError::Store(err) => err.into(),
            ImageError::Export(_) | ImageError::Tar(_) | ImageError::Io { .. } => {
                ApiError::broke(&err)
            }
        }
    }
}

impl From<crate::quotas::QuotaError> for ApiError {
    fn from(err: crate::quotas::QuotaError) -> ApiError {
        use crate::quotas::QuotaError;
        match err {
            QuotaError::Exceeded(exceeded) => ApiError::QuotaExceeded(exceeded.to_string()),
            QuotaError::Invalid(message) => ApiError::BadRequest(message),
            QuotaError::Store(err) => err.into(),
        }
    }
}

impl From<crate::usage::UsageError> for ApiError {
    fn from(err: crate::usage::UsageError) -> ApiError {
        use crate::usage::UsageError;
        match err {
            UsageError::Invalid(message) => ApiError::BadRequest(message),
            UsageError::Store(err) => err.into(),
        }
    }
}

impl From<crate::reconcile::ReconcileError> for ApiError {
    fn from(err: crate::reconcile::ReconcileError) -> ApiError {
        use crate::reconcile::ReconcileError;
        match err {
            ReconcileError::Store(err) => err.into(),
            ReconcileError::Inventory(_) | ReconcileError::Leftovers(_) => ApiError::broke(&err),
        }
    }
}

impl From<crate::endpoints::EndpointError> for ApiError {
    fn from(err: crate::endpoints::EndpointError) -> ApiError {
        ApiError::broke(&err)
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
            ApiError::StoreUnavailable(_) => (Vec::new(), None, Some(STORE_RETRY_AFTER_S)),
            _ => (Vec::new(), None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
                alternatives,
                task,
                retry_after_s,
                problems: match &self {
                    ApiError::Unservable { problems, .. } => problems.clone(),
                    _ => Vec::new(),
                },
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after_s
            && let Ok(value) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hangar\""),
            );
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

#[cfg(test)]
mod concern_status_tests {
    use super::*;
    use crate::images::policy::ImageError;
    use crate::lifecycle::policy::PolicyError;
    use crate::pools::PoolError;
    use crate::reconcile::ReconcileError;
    use crate::requests::RequestError;

    #[test]
    fn concern_errors_map_to_their_statuses_with_their_messages() {
        let cases: Vec<(ApiError, StatusCode, &str)> = vec![
            (
                RequestError::Invalid("bad".into()).into(),
                StatusCode::BAD_REQUEST,
                "bad",
            ),
            (
                RequestError::TryAgain {
                    message: "later".into(),
                    retry_after_s: 2,
                    task: Some("t-1".into()),
                }
                .into(),
                StatusCode::SERVICE_UNAVAILABLE,
                "later",
            ),
            (
                RequestError::CreationFailed("qemu died".into()).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "qemu died",
            ),
            (
                RequestError::Settings(hangar_host::guest::GuestConfigError::MissingSetting {
                    service: "db".into(),
                    key: "password".into(),
                    description: "the admin password".into(),
                })
                .into(),
                StatusCode::BAD_REQUEST,
                "db needs the setting password (--env password=VALUE): the admin password",
            ),
            (
                ImageError::Guest(hangar_host::guest::GuestConfigError::Template {
                    path: "/etc/x".into(),
                    reason: "no value for y".into(),
                })
                .into(),
                StatusCode::BAD_REQUEST,
                "template /etc/x: no value for y",
            ),
            (
                PoolError::NotFound {
                    name: "web".into(),
                    alternatives: vec!["redis".into()],
                }
                .into(),
                StatusCode::NOT_FOUND,
                "no pool or service named \"web\"",
            ),
            (
                PoolError::Invalid("min 3 is larger than max 2".into()).into(),
                StatusCode::BAD_REQUEST,
                "min 3 is larger than max 2",
            ),
            (
                PolicyError::NoVm("vm-1".into()).into(),
                StatusCode::NOT_FOUND,
                "no VM vm-1",
            ),
            (
                PolicyError::NoService {
                    name: "dbb".into(),
                    alternatives: Vec::new(),
                }
                .into(),
                StatusCode::NOT_FOUND,
                "no service named \"dbb\"",
            ),
            (
                ImageError::Request(RequestError::Never {
                    message: "never".into(),
                    alternatives: Vec::new(),
                })
                .into(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "never",
            ),
            (
                ImageError::Io {
                    what: "run tar",
                    source: std::io::Error::other("no tar"),
                }
                .into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot run tar: no tar",
            ),
            (
                ReconcileError::Inventory(hangar_host::HostError::NoAgent).into(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot list the VMs that run on the host: no agent channel",
            ),
        ];
        for (api, status, message) in cases {
            assert_eq!((api.status(), api.to_string().as_str()), (status, message));
        }
        let api = ApiError::from(PoolError::NotFound {
            name: "web".into(),
            alternatives: vec!["redis".into()],
        });
        assert!(
            matches!(api, ApiError::NotFound { alternatives, .. } if alternatives == ["redis"])
        );
    }
}
