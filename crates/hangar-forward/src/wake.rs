//! Asking the server to wake a VM: `POST /v1/vms/{id}/wake` over plain HTTP/1.1, retried
//! while the server cannot be reached (it may be restarting).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Pause between attempts while the server cannot be reached.
const RETRY: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("server URL {0:?} is not http://HOST:PORT")]
    Url(String),
    #[error("the server refused to wake the VM: HTTP {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("the server could not be reached before the deadline: {0}")]
    Unreachable(#[source] std::io::Error),
}

/// Asks the server at `server_url` to wake VM `id` and waits for the answer: `Ok` once the
/// VM runs. Retries while the server cannot be reached, until `deadline`; an answer other
/// than success is final.
pub async fn wake(server_url: &str, id: &str, deadline: Instant) -> Result<(), WakeError> {
    let authority = server_url
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or_default())
        .filter(|authority| !authority.is_empty())
        .ok_or_else(|| WakeError::Url(server_url.to_owned()))?;
    loop {
        let attempt = tokio::time::timeout_at(deadline, post(authority, id)).await;
        match attempt {
            Ok(Ok((status, _))) if (200..300).contains(&status) => return Ok(()),
            Ok(Ok((status, body))) => return Err(WakeError::Refused { status, body }),
            Ok(Err(err)) => {
                tracing::debug!(vm = %id, error = %err, "server not reachable; retrying wake");
                if Instant::now() + RETRY >= deadline {
                    return Err(WakeError::Unreachable(err));
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(_) => {
                return Err(WakeError::Unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "wake did not finish in time",
                )));
            }
        }
    }
}

/// One POST; the status and the body.
async fn post(authority: &str, id: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "POST /v1/vms/{id}/wake HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no HTTP status in the answer: {text:?}"),
            )
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
