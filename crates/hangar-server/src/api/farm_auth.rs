//! Who may speak for a host: callers of the farm's routes (agents registering and
//! reporting, hosts pulling images) prove it with the farm token as a bearer token.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::manager::Manager;

/// Present in a handler's arguments: the request carried the farm token, or an admin's
/// token (see `api::auth`). Rejects with 401 otherwise (without saying whether a token was
/// close).
#[derive(Debug, Clone, Copy)]
pub struct FarmCaller;

impl FromRequestParts<Arc<Manager>> for FarmCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        manager: &Arc<Manager>,
    ) -> Result<FarmCaller, ApiError> {
        let admin = parts
            .extensions
            .get::<crate::api::auth::Caller>()
            .is_some_and(|caller| caller.role == hangar_core::Role::Admin);
        if admin {
            return Ok(FarmCaller);
        }
        let given = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim);
        match given {
            Some(given) if token_matches(given, &manager.config.farm_token) => Ok(FarmCaller),
            Some(_) => Err(ApiError::Unauthorized("wrong farm token".into())),
            None => Err(ApiError::Unauthorized(
                "this route is for farm hosts: send the farm token as `Authorization: Bearer <token>`"
                    .into(),
            )),
        }
    }
}

/// Compares in time independent of where the first difference is. An empty expected
/// token matches nothing.
pub fn token_matches(given: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches_and_an_empty_one_never() {
        assert!(token_matches("s3cret-token", "s3cret-token"));
        assert!(!token_matches("s3cret-toke", "s3cret-token"));
        assert!(!token_matches("s3cret-tokem", "s3cret-token"));
        assert!(!token_matches("", ""));
        assert!(!token_matches("anything", ""));
    }
}
