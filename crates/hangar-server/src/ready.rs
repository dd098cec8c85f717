//! Ready criteria, evaluated from the host: a VM is ready when every check of its service
//! passes in one round. `tcp` asks hangar-init whether something listens (a user-mode port
//! forward accepts connections even when nothing listens behind it); `http` and `bytes` go
//! through the VM's real endpoint, as a client would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hangar_core::{ReadyCheck, ReadySpec, Service};
use hangar_vmm::Agent;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of an answer a probe reads.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a check did not pass (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub String);

/// Waits until every check passes, or `spec.timeout` passes; the error says which check
/// failed last and how.
pub async fn wait_ready(
    service: &Service,
    spec: &ReadySpec,
    endpoints: &BTreeMap<String, SocketAddr>,
    agent: &Agent,
) -> Result<Duration, NotReady> {
    let start = tokio::time::Instant::now();
    let deadline = start + spec.timeout;
    loop {
        let round = check_all(service, spec, endpoints, agent).await;
        match round {
            Ok(()) => return Ok(start.elapsed()),
            Err(not_ready) if tokio::time::Instant::now() + spec.interval >= deadline => {
                return Err(NotReady(format!(
                    "not ready after {}: {}",
                    humantime::format_duration(spec.timeout),
                    not_ready.0
                )));
            }
            Err(_) => tokio::time::sleep(spec.interval).await,
        }
    }
}

async fn check_all(
    service: &Service,
    spec: &ReadySpec,
    endpoints: &BTreeMap<String, SocketAddr>,
    agent: &Agent,
) -> Result<(), NotReady> {
    for check in &spec.checks {
        let port_name = check.port();
        let addr = endpoints
            .get(port_name)
            .ok_or_else(|| NotReady(format!("no endpoint for port {port_name}")))?;
        match check {
            ReadyCheck::Tcp { .. } => {
                let guest_port = service
                    .port(port_name)
                    .map(|p| p.guest)
                    .ok_or_else(|| NotReady(format!("no port {port_name}")))?;
                match agent.check_listen(guest_port, PROBE_TIMEOUT).await {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(NotReady(format!(
                            "nothing listens on guest port {guest_port}"
                        )));
                    }
                    Err(err) => return Err(NotReady(format!("guest agent: {err}"))),
                }
            }
            ReadyCheck::Http {
                path,
                status,
                body_contains,
                ..
            } => {
                http_check(*addr, path, *status, body_contains.as_deref()).await?;
            }
            ReadyCheck::Bytes { send, expect, .. } => {
                bytes_check(*addr, send.as_bytes(), expect.as_bytes()).await?;
            }
        }
    }
    Ok(())
}

/// One HTTP/1.0 GET: the answer's status must be `status` and its body contain `body_contains`.
pub async fn http_check(
    addr: SocketAddr,
    path: &str,
    status: u16,
    body_contains: Option<&str>,
) -> Result<(), NotReady> {
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: hangar-ready\r\nConnection: close\r\n\r\n"
    );
    let answer = exchange(addr, request.as_bytes(), None).await?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    let got: Option<u16> = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok());
    if got != Some(status) {
        return Err(NotReady(format!(
            "GET {path} answered {:?}, expected status {status}",
            status_line.chars().take(80).collect::<String>()
        )));
    }
    if let Some(needle) = body_contains {
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body)
            .unwrap_or_default();
        if !body.contains(needle) {
            return Err(NotReady(format!(
                "GET {path} body does not contain {needle:?}"
            )));
        }
    }
    Ok(())
}

/// Sends `send` and reads until the answer contains `expect`.
pub async fn bytes_check(addr: SocketAddr, send: &[u8], expect: &[u8]) -> Result<(), NotReady> {
    let answer = exchange(addr, send, Some(expect)).await?;
    if contains(&answer, expect) {
        Ok(())
    } else {
        Err(NotReady(format!(
            "answer {:?} does not contain {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(80)]),
            String::from_utf8_lossy(expect)
        )))
    }
}

/// Connects, sends, and reads until EOF, `until` appears, or the probe times out.
async fn exchange(
    addr: SocketAddr,
    send: &[u8],
    until: Option<&[u8]>,
) -> Result<Vec<u8>, NotReady> {
    let work = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|err| NotReady(format!("connect to {addr}: {err}")))?;
        stream
            .write_all(send)
            .await
            .map_err(|err| NotReady(format!("send to {addr}: {err}")))?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|err| NotReady(format!("read from {addr}: {err}")))?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.len() >= MAX_ANSWER || until.is_some_and(|needle| contains(&answer, needle)) {
                break;
            }
        }
        if answer.is_empty() {
            return Err(NotReady(format!(
                "{addr} closed the connection without answering"
            )));
        }
        Ok(answer)
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .map_err(|_| NotReady(format!("{addr} did not answer within {PROBE_TIMEOUT:?}")))?
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_check_reads_status_and_body() {
        let addr =
            server(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello hangar\n").await;
        http_check(addr, "/", 200, Some("hangar")).await.unwrap();
        let err = http_check(addr, "/", 200, Some("nope")).await.unwrap_err();
        assert!(err.0.contains("does not contain \"nope\""), "{err:?}");
        let err = http_check(addr, "/x", 404, None).await.unwrap_err();
        assert!(err.0.contains("expected status 404"), "{err:?}");
    }

    #[tokio::test]
    async fn bytes_check_and_silent_peers() {
        let addr = server(b"+PONG\r\n").await;
        bytes_check(addr, b"PING\r\n", b"+PONG").await.unwrap();
        assert!(bytes_check(addr, b"PING\r\n", b"+OK").await.is_err());
        let silent = server(b"").await;
        let err = http_check(silent, "/", 200, None).await.unwrap_err();
        assert!(err.0.contains("without answering"), "{err:?}");
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = http_check(closed, "/", 200, None).await.unwrap_err();
        assert!(err.0.starts_with("connect to"), "{err:?}");
    }
}
