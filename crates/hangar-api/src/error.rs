//! The one JSON shape of every error answer.

use serde::{Deserialize, Serialize};

/// The body of every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, for people (`message`) and programs (`code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// `not_found`, `bad_request`, `never`, `invalid_configuration` (422, with `problems`),
    /// `conflict`, `try_again`, `internal`; and for what
    /// the HTTP layer refuses before a handler runs: `method_not_allowed` (405), `too_large`
    /// (413), `unsupported_media_type` (415), `bad_request` (a query string or path parameter
    /// that does not parse).
    pub code: String,
    pub message: String,
    /// Closest viable alternatives, when the request named something that does not exist.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<String>,
    /// The task still working on the request (with `try_again`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
    /// Every problem with a configuration request, each with its field and a suggestion
    /// (`invalid_configuration`, 422; see `POST /v1/requests/check`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<hangar_core::heuristics::Problem>,
}
