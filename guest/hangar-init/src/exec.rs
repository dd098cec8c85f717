//! `Exec` requests: run a command in the guest's root, capture its output, kill it on
//! timeout. Each request runs on its own thread so the main loop keeps serving; the exit
//! status arrives from the main loop's reaper (see [`crate::services`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::mpsc;
use std::time::Duration;

use hangar_proto::GuestMessage;

use crate::channel::Outbox;
use crate::services::{self, Context, Exit};

/// Most bytes of stdout (and, separately, stderr) returned; the rest is read and dropped.
pub const OUTPUT_LIMIT: usize = 64 * 1024;

/// Timeout used when the host sends 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait for output pipes to close after the command exited (a background
/// grandchild may hold them open).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Runs the request on a new thread and sends its reply through `outbox`.
pub fn spawn(id: u64, argv: Vec<String>, timeout_ms: u64, context: Context, outbox: Outbox) {
    let thread_outbox = outbox.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("exec-{id}"))
        .spawn(move || {
            let timeout = if timeout_ms == 0 {
                DEFAULT_TIMEOUT
            } else {
                Duration::from_millis(timeout_ms)
            };
            thread_outbox.send(&run(id, &argv, timeout, &context));
        });
    if let Err(e) = spawned {
        outbox.send(&failure(id, format!("cannot start exec thread: {e}")));
    }
}

/// Runs `argv` and builds the reply: `ok` when it exited with code 0, `code` its exit
/// code, `error` set when it could not start, was killed by a signal, or timed out.
pub fn run(id: u64, argv: &[String], timeout: Duration, context: &Context) -> GuestMessage {
    let cmd = match services::command(argv, &BTreeMap::new(), None, context) {
        Ok(cmd) => cmd,
        Err(e) => return failure(id, format!("exec {argv:?}: {e}")),
    };
    let (mut child, exited) = match services::spawn_exec(cmd) {
        Ok(spawned) => spawned,
        Err(e) => return failure(id, format!("exec {argv:?}: {e}")),
    };
    let pid = child.id();
    let stdout = child.stdout.take().map(capture);
    let stderr = child.stderr.take().map(capture);
    drop(child);

    let mut timed_out = false;
    let exit = match exited.recv_timeout(timeout) {
        Ok(exit) => Some(exit),
        Err(_) => {
            timed_out = true;
            services::kill_group(pid);
            exited.recv_timeout(Duration::from_secs(5)).ok()
        }
    };
    let stdout = stdout.map(collect).unwrap_or_default();
    let stderr = stderr.map(collect).unwrap_or_default();

    let (code, error) = match exit {
        _ if timed_out => (None, Some(format!("timed out after {timeout:?}; killed"))),
        Some(Exit::Code(code)) => (Some(code), None),
        Some(Exit::Signal(signal)) => (None, Some(format!("killed by signal {signal}"))),
        None => (None, Some("exit status lost".to_string())),
    };
    GuestMessage::Reply {
        id,
        ok: code == Some(0),
        code,
        stdout,
        stderr,
        error,
    }
}

fn failure(id: u64, error: String) -> GuestMessage {
    GuestMessage::Reply {
        id,
        ok: false,
        code: None,
        stdout: String::new(),
        stderr: String::new(),
        error: Some(error),
    }
}

/// Reads a pipe on its own thread, keeping the first [`OUTPUT_LIMIT`] bytes and draining
/// the rest so the writer never blocks. Yields the kept bytes when the pipe closes.
fn capture(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("exec-output".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(kept);
        });
    if let Err(e) = spawned {
        console!("cannot start an output reader: {e}");
    }
    rx
}

fn collect(rx: mpsc::Receiver<Vec<u8>>) -> String {
    rx.recv_timeout(DRAIN_GRACE)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Runs `f` while a thread plays the main loop's reaper.
    fn with_reaper<T>(f: impl FnOnce() -> T) -> T {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reaper = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                services::reap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let result = f();
        stop.store(true, Ordering::SeqCst);
        reaper.join().unwrap();
        result
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn exec_cases() {
        // One test: the reaper collects every child of this process.
        with_reaper(|| {
            let ctx = Context { root: None };
            match run(
                1,
                &sh("echo out; echo err >&2; echo $HOSTNAME; exit 3"),
                Duration::from_secs(10),
                &ctx,
            ) {
                GuestMessage::Reply {
                    id,
                    ok,
                    code,
                    stdout,
                    stderr,
                    error,
                } => {
                    assert_eq!((id, ok, code, error), (1, false, Some(3), None));
                    // $HOSTNAME is the kernel's hostname, whatever identity set it last.
                    let hostname = crate::services::current_hostname();
                    assert_eq!(stdout, format!("out\n{hostname}\n"));
                    assert_eq!(stderr, "err\n");
                }
                other => panic!("{other:?}"),
            }
            match run(
                2,
                &sh("head -c 100000 /dev/zero"),
                Duration::from_secs(10),
                &ctx,
            ) {
                GuestMessage::Reply { ok, stdout, .. } => {
                    assert!(ok);
                    assert_eq!(stdout.len(), OUTPUT_LIMIT);
                }
                other => panic!("{other:?}"),
            }
            match run(3, &sh("sleep 5"), Duration::from_millis(200), &ctx) {
                GuestMessage::Reply { ok, error, .. } => {
                    assert!(!ok);
                    assert!(error.unwrap().contains("timed out"));
                }
                other => panic!("{other:?}"),
            }
            match run(
                4,
                &["/nonexistent/cmd".to_string()],
                Duration::from_secs(1),
                &ctx,
            ) {
                GuestMessage::Reply { ok, error, .. } => {
                    assert!(!ok);
                    assert!(error.unwrap().contains("/nonexistent/cmd"));
                }
                other => panic!("{other:?}"),
            }
        });
    }
}
