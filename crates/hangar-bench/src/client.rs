//! A small client of the REST API for the benchmarks (answers as JSON values, or any
//! deserializable type), with the benchmarks' error and its exit code.

use serde::de::DeserializeOwned;

#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    /// Sent as the bearer token with every request.
    token: Option<String>,
}

#[derive(Debug)]
pub enum BenchError {
    Unreachable {
        url: String,
        detail: String,
    },
    Api {
        status: u16,
        message: String,
    },
    Reply(String),
    /// The command line asked for something malformed.
    Usage(String),
    /// A local step failed (set-up, measuring, writing the report).
    Failed(String),
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Unreachable { url, detail } => {
                write!(
                    f,
                    "cannot reach the hangar server at {url} ({detail}); is it running?"
                )
            }
            BenchError::Api { message, .. } => f.write_str(message),
            BenchError::Reply(message) => write!(f, "unexpected reply from the server: {message}"),
            BenchError::Usage(message) | BenchError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for BenchError {}

impl BenchError {
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Unreachable { .. } => 6,
            BenchError::Reply(_) | BenchError::Failed(_) => 1,
            BenchError::Usage(_) => 2,
            BenchError::Api { status, .. } => match status {
                400 => 2,
                404 => 3,
                422 => 4,
                503 => 5,
                _ => 1,
            },
        }
    }
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
            token: None,
        }
    }

    /// This client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.to_owned());
        self
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, BenchError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, BenchError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    /// A POST whose answer also carries the server's `Server-Timing` header (empty if none).
    pub async fn post_timed<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(T, String), BenchError> {
        self.send_with_headers(self.http.post(self.url(path)).json(body))
            .await
            .map(|(value, headers)| {
                let timing = headers
                    .get("server-timing")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                (value, timing)
            })
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, BenchError> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, BenchError> {
        self.send(self.http.delete(self.url(path))).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, BenchError> {
        self.send_with_headers(request)
            .await
            .map(|(value, _)| value)
    }

    async fn send_with_headers<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap), BenchError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|err| BenchError::Unreachable {
                url: self.base.clone(),
                detail: root_cause(&err),
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| BenchError::Reply(err.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(|value| (value, headers))
                .map_err(|err| BenchError::Reply(err.to_string()));
        }
        Err(api_error(status, &bytes))
    }
}

/// An error answer of the API (its JSON error body) as an error; a body that is not one is
/// quoted.
fn api_error(status: reqwest::StatusCode, bytes: &[u8]) -> BenchError {
    let message = match serde_json::from_slice::<hangar_api::ErrorBody>(bytes) {
        Ok(body) => body.error.message,
        Err(_) => format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)),
    };
    BenchError::Api {
        status: status.as_u16(),
        message,
    }
}

/// How a wire enum (a match kind, a state) is spelled in JSON.
pub fn wire_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
