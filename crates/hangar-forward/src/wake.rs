//! Asking the server to wake a VM: `POST /v1/vms/{id}/wake` through the API's client, retried
//! while the server cannot be reached (it may be restarting).

use std::sync::LazyLock;
use std::time::Duration;

use hangar_api::{BadUrl, Client, ClientError};
use tokio::time::Instant;

/// Pause between attempts while the server cannot be reached.
const RETRY: Duration = Duration::from_millis(200);

/// One connection pool for every wake, whatever the server's URL.
static HTTP: LazyLock<reqwest::Client> = LazyLock::new(reqwest::Client::new);

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error(transparent)]
    Url(#[from] BadUrl),
    /// The server answered, but not that the VM runs: an error answer (status and body in
    /// the source) or one that did not decode.
    #[error("the server refused to wake the VM")]
    Refused(#[source] ClientError),
    /// Every attempt until the deadline failed to reach the server; the last one's error.
    #[error("the server could not be reached before the deadline")]
    Unreachable(#[source] ClientError),
    /// The server was reached but did not answer before the deadline.
    #[error("the wake did not finish before the deadline")]
    TimedOut,
}

/// Asks the server at `server_url` to wake VM `id` (with `token` as the bearer token, when
/// given) and waits for the answer: `Ok` once the VM runs. Retries while the server cannot
/// be reached, until `deadline`; an answer other than success is final.
pub async fn wake(
    server_url: &str,
    token: Option<&str>,
    id: &str,
    deadline: Instant,
) -> Result<(), WakeError> {
    let mut client = Client::with_http(server_url, HTTP.clone())?;
    if let Some(token) = token {
        client = client.with_token(token);
    }
    loop {
        match tokio::time::timeout_at(deadline, client.wake(id)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(err @ ClientError::Unreachable { .. })) => {
                tracing::debug!(vm = %id, error = %err, "server not reachable; retrying wake");
                if Instant::now() + RETRY >= deadline {
                    return Err(WakeError::Unreachable(err));
                }
                tokio::time::sleep(RETRY).await;
            }
            Ok(Err(err)) => return Err(WakeError::Refused(err)),
            Err(_) => return Err(WakeError::TimedOut),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn an_error_answer_is_final_and_an_absent_server_is_retried_until_the_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = stream.read(&mut request).await.unwrap();
            let body = r#"{"error":{"code":"conflict","message":"vm-x is being deleted"}}"#;
            let answer = format!(
                "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        let started = Instant::now();
        let err = wake(&url, None, "vm-x", started + Duration::from_secs(10))
            .await
            .unwrap_err();
        let WakeError::Refused(ClientError::Api { status, body, .. }) = err else {
            panic!("expected a refusal, got {err:?}");
        };
        assert_eq!(status, 409);
        assert_eq!(body.error.message, "vm-x is being deleted");
        assert!(started.elapsed() < Duration::from_secs(5), "not retried");

        // Nothing listens: retried until the deadline, then the last attempt's error.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let started = Instant::now();
        let err = wake(&url, None, "vm-x", started + Duration::from_millis(700))
            .await
            .unwrap_err();
        assert!(
            matches!(err, WakeError::Unreachable(ClientError::Unreachable { .. })),
            "{err:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(matches!(
            wake("localhost:1", None, "vm-x", started).await,
            Err(WakeError::Url(_))
        ));
    }
}
