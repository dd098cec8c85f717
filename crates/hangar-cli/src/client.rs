//! A small client of the REST API that turns answers into exit codes.

use serde::Serialize;
use serde::de::DeserializeOwned;

pub struct Client {
    base: String,
    http: reqwest::Client,
}

#[derive(Debug)]
pub enum ClientError {
    Unreachable {
        url: String,
        detail: String,
    },
    Api {
        status: u16,
        message: String,
        alternatives: Vec<String>,
    },
    Reply(String),
    /// The command line asked for something malformed.
    Usage(String),
    /// A local step failed (e.g. `hangar bench` could not run `hangar-bench`).
    Failed(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable { url, detail } => {
                write!(
                    f,
                    "cannot reach the hangar server at {url} ({detail}); start it with `hangar server` or set HANGAR_URL"
                )
            }
            ClientError::Api { message, .. } => f.write_str(message),
            ClientError::Reply(message) => write!(f, "unexpected reply from the server: {message}"),
            ClientError::Usage(message) | ClientError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Unreachable { .. } => 6,
            ClientError::Reply(_) | ClientError::Failed(_) => 1,
            ClientError::Usage(_) => 2,
            ClientError::Api { status, .. } => match status {
                400 => 2,
                404 => 3,
                422 => 4,
                503 => 5,
                _ => 1,
            },
        }
    }

    pub fn alternatives(&self) -> &[String] {
        match self {
            ClientError::Api { alternatives, .. } => alternatives,
            _ => &[],
        }
    }
}

impl Client {
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.http.delete(self.url(path))).await
    }

    /// POSTs `body` and writes the answer's bytes to `dest` as they arrive; returns how
    /// many were written.
    pub async fn download(
        &self,
        path: &str,
        body: &impl Serialize,
        dest: &std::path::Path,
    ) -> Result<u64, ClientError> {
        use std::io::Write;
        let mut response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .map_err(|err| ClientError::Unreachable {
                url: self.base.clone(),
                detail: root_cause(&err),
            })?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response
                .bytes()
                .await
                .map_err(|err| ClientError::Reply(err.to_string()))?;
            return Err(api_error(status, &bytes));
        }
        let partial = dest.with_extension("partial");
        let mut file = std::fs::File::create(&partial).map_err(|err| {
            ClientError::Usage(format!("cannot write {}: {err}", partial.display()))
        })?;
        let mut written = 0u64;
        let result = async {
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|err| ClientError::Reply(err.to_string()))?
            {
                file.write_all(&chunk).map_err(|err| {
                    ClientError::Usage(format!("cannot write {}: {err}", partial.display()))
                })?;
                written += chunk.len() as u64;
            }
            file.sync_all().map_err(|err| {
                ClientError::Usage(format!("cannot write {}: {err}", partial.display()))
            })?;
            std::fs::rename(&partial, dest).map_err(|err| {
                ClientError::Usage(format!("cannot write {}: {err}", dest.display()))
            })
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        result.map(|()| written)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        self.send_with_headers(request)
            .await
            .map(|(value, _)| value)
    }

    async fn send_with_headers<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<(T, reqwest::header::HeaderMap), ClientError> {
        let response = request
            .send()
            .await
            .map_err(|err| ClientError::Unreachable {
                url: self.base.clone(),
                detail: root_cause(&err),
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|err| ClientError::Reply(err.to_string()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(|value| (value, headers))
                .map_err(|err| ClientError::Reply(err.to_string()));
        }
        Err(api_error(status, &bytes))
    }
}

/// An error answer of the API (its JSON error body) as a client error; a body that is not
/// one is quoted.
fn api_error(status: reqwest::StatusCode, bytes: &[u8]) -> ClientError {
    let (message, alternatives) = match serde_json::from_slice::<hangar_api::ErrorBody>(bytes) {
        Ok(body) => (body.error.message, body.error.alternatives),
        Err(_) => (
            format!("HTTP {status}: {}", String::from_utf8_lossy(bytes)),
            Vec::new(),
        ),
    };
    ClientError::Api {
        status: status.as_u16(),
        message,
        alternatives,
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
