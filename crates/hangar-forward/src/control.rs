//! The server's end of the control socket: one connection, one request at a time.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::ForwardError;
use crate::protocol::{Reply, Request};

/// A connection to a forwarder's control socket. Requests are serialised; one round trip
/// is a write and a read of one short line on a unix socket.
pub struct Control {
    path: PathBuf,
    stream: tokio::sync::Mutex<Option<BufReader<UnixStream>>>,
}

impl Control {
    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> Result<Control, ForwardError> {
        let stream = UnixStream::connect(path).await.map_err(ForwardError::Io)?;
        Ok(Control {
            path: path.to_owned(),
            stream: tokio::sync::Mutex::new(Some(BufReader::new(stream))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request and reads its reply. A broken connection is re-opened once (the
    /// forwarder may have been restarted); [`ForwardError::Io`] when that fails too.
    /// [`Reply::Error`] comes back as [`ForwardError::Refused`].
    pub async fn call(&self, request: &Request) -> Result<Reply, ForwardError> {
        let mut line = serde_json::to_string(request).map_err(ForwardError::Json)?;
        line.push('\n');
        let mut guard = self.stream.lock().await;
        let mut last = None;
        for _ in 0..2 {
            if guard.is_none() {
                match UnixStream::connect(&self.path).await {
                    Ok(stream) => *guard = Some(BufReader::new(stream)),
                    Err(err) => return Err(ForwardError::Io(err)),
                }
            }
            let stream = guard.as_mut().expect("connected");
            match round_trip(stream, &line).await {
                Ok(reply) => {
                    return match serde_json::from_str(&reply).map_err(ForwardError::Json)? {
                        Reply::Error { message } => Err(ForwardError::Refused(message)),
                        reply => Ok(reply),
                    };
                }
                Err(err) => {
                    *guard = None;
                    last = Some(err);
                }
            }
        }
        Err(ForwardError::Io(last.expect("an attempt failed")))
    }
}

async fn round_trip(stream: &mut BufReader<UnixStream>, line: &str) -> std::io::Result<String> {
    stream.get_mut().write_all(line.as_bytes()).await?;
    let mut reply = String::new();
    if stream.read_line(&mut reply).await? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the forwarder closed the control connection",
        ));
    }
    Ok(reply)
}
