//! What a command's failure is, as a message and an exit code (listed in `hangar --help`).

use hangar_api::client::{BadUrl, ClientError};

#[derive(Debug)]
pub enum CliError {
    /// No answer from the server at `url`.
    Unreachable { url: String, detail: String },
    /// The server refused: its status, message and the alternatives it offers.
    Api {
        status: u16,
        message: String,
        alternatives: Vec<String>,
        /// Every problem of a refused configuration, with its suggestion.
        problems: Vec<hangar_api::heuristics::Problem>,
    },
    /// An answer that is not what the API promises.
    Reply(String),
    /// The command line asked for something malformed.
    Usage(String),
    /// A local step failed (writing a file, running `hangar-bench`).
    Failed(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Unreachable { url, detail } => {
                write!(
                    f,
                    "cannot reach the hangar server at {url} ({detail}); start it with `hangar server` or set HANGAR_URL"
                )
            }
            CliError::Api { message, .. } => f.write_str(message),
            CliError::Reply(message) => write!(f, "unexpected reply from the server: {message}"),
            CliError::Usage(message) | CliError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for CliError {}

impl CliError {
    /// The process's exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 6,
            CliError::Reply(_) | CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Api { status, .. } => match status {
                400 => 2,
                404 => 3,
                422 => 4,
                429 => 7,
                503 => 5,
                _ => 1,
            },
        }
    }

    /// What the server suggests asking for instead (a request for an unknown service).
    pub fn alternatives(&self) -> &[String] {
        match self {
            CliError::Api { alternatives, .. } => alternatives,
            _ => &[],
        }
    }

    /// The problems of a refused configuration, each with a suggestion.
    pub fn problems(&self) -> &[hangar_api::heuristics::Problem] {
        match self {
            CliError::Api { problems, .. } => problems,
            _ => &[],
        }
    }
}

impl From<ClientError> for CliError {
    fn from(err: ClientError) -> CliError {
        match err {
            ClientError::Unreachable { url, source } => CliError::Unreachable {
                url,
                detail: root_cause(&source),
            },
            ClientError::Api { status, body, .. } => CliError::Api {
                status: status.as_u16(),
                message: body.error.message,
                alternatives: body.error.alternatives,
                problems: body.error.problems,
            },
            // An error status without the JSON error body: still the status's exit code.
            ClientError::Decode { status, source, .. } if !status.is_success() => CliError::Api {
                status: status.as_u16(),
                message: format!("HTTP {status}: {source}"),
                alternatives: Vec::new(),
                problems: Vec::new(),
            },
            ClientError::Decode { source, .. } => CliError::Reply(source.to_string()),
        }
    }
}

impl From<BadUrl> for CliError {
    fn from(err: BadUrl) -> CliError {
        CliError::Unreachable {
            url: err.0,
            detail: "not an http://HOST:PORT URL".into(),
        }
    }
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
