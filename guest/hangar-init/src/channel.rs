//! The agent channel: the virtio-serial port named [`AGENT_PORT_NAME`], carrying one JSON
//! message per line.
//!
//! A reader thread decodes host messages into an mpsc queue; a writer thread drains an
//! outgoing queue. Writes to a vport block while no host is connected (and resume when
//! one connects), so nobody but the writer thread ever blocks on them. A read of 0 bytes
//! means no host is connected (e.g. the server restarted): the reader sleeps briefly and
//! tries again; the port stays open.
//!
//! Pings and re-identifications are answered by the reader thread itself, written straight
//! to the port: they are what a pool grant waits for right after its VM resumes, and under
//! software emulation each hand-off between threads costs the grant time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_proto::{AGENT_PORT_NAME, GuestMessage, HostMessage, Identity};

/// Where the kernel lists virtio-serial ports.
const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Longest line accepted from the host; longer ones are dropped.
const MAX_LINE: usize = 16 << 20;

/// Sending half of the channel; cheap to clone, never blocks.
#[derive(Clone)]
pub struct Outbox {
    tx: Sender<String>,
    pending: Arc<AtomicUsize>,
}

impl Outbox {
    /// Queues a message for the host.
    pub fn send(&self, message: &GuestMessage) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(hangar_proto::encode(message)).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            console!("channel writer gone; dropping a message");
        }
    }

    /// Messages queued but not yet written.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// Finds the device name (`vportNpM`) of the port called `name` under a
/// `/sys/class/virtio-ports`-like directory.
pub fn find_port(class_dir: &Path, name: &str) -> Option<String> {
    let mut entries: Vec<_> = std::fs::read_dir(class_dir)
        .ok()?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// Opens the agent port read/write, waiting for it to appear. Keeps trying forever
/// (logging every few seconds): without the channel the guest is useless, and PID 1 must
/// not exit.
pub fn open_agent_port() -> File {
    let started = Instant::now();
    let mut last_log = Instant::now();
    loop {
        if let Some(dev) = find_port(Path::new(VIRTIO_PORTS), AGENT_PORT_NAME) {
            let path = PathBuf::from("/dev").join(&dev);
            match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(file) => return file,
                Err(e) if last_log.elapsed() > Duration::from_secs(3) => {
                    console!("cannot open {}: {e}; retrying", path.display());
                    last_log = Instant::now();
                }
                Err(_) => {}
            }
        } else if last_log.elapsed() > Duration::from_secs(3) {
            console!(
                "no virtio port named {AGENT_PORT_NAME} after {:?}; is the virtserialport \
                 device configured? retrying",
                started.elapsed()
            );
            last_log = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts the reader and writer threads on the open port.
pub fn start(port: File) -> (Outbox, Receiver<HostMessage>) {
    let port = Arc::new(port);
    let (out_tx, out_rx) = mpsc::channel::<String>();
    let pending = Arc::new(AtomicUsize::new(0));
    let (in_tx, in_rx) = mpsc::channel();

    // One line per write(2), one writer at a time: lines never interleave.
    let write_lock = Arc::new(Mutex::new(()));
    let writer_port = Arc::clone(&port);
    let writer_pending = Arc::clone(&pending);
    let writer_lock = Arc::clone(&write_lock);
    let spawned = std::thread::Builder::new()
        .name("channel-writer".into())
        .spawn(move || write_loop(&writer_port, out_rx, &writer_pending, &writer_lock));
    if let Err(e) = spawned {
        console!("cannot start the channel writer: {e}");
    }
    let spawned = std::thread::Builder::new()
        .name("channel-reader".into())
        .spawn(move || read_loop(&port, in_tx, &write_lock));
    if let Err(e) = spawned {
        console!("cannot start the channel reader: {e}");
    }
    (
        Outbox {
            tx: out_tx,
            pending,
        },
        in_rx,
    )
}

/// For a guest without a host (an exported image): messages go to the console, and
/// nothing ever arrives.
pub fn console_only() -> (Outbox, Receiver<HostMessage>) {
    let (out_tx, out_rx) = mpsc::channel::<String>();
    let pending = Arc::new(AtomicUsize::new(0));
    let writer_pending = Arc::clone(&pending);
    let spawned = std::thread::Builder::new()
        .name("console-writer".into())
        .spawn(move || {
            for line in out_rx {
                console!("{}", line.trim_end());
                writer_pending.fetch_sub(1, Ordering::SeqCst);
            }
        });
    if let Err(e) = spawned {
        console!("cannot start the console writer: {e}");
    }
    let (in_tx, in_rx) = mpsc::channel();
    // Nobody sends: keep the sender so that the inbox never reads as disconnected.
    std::mem::forget(in_tx);
    (
        Outbox {
            tx: out_tx,
            pending,
        },
        in_rx,
    )
}

fn write_loop(port: &File, queue: Receiver<String>, pending: &AtomicUsize, lock: &Mutex<()>) {
    for line in queue {
        if let Err(e) = write_line(port, &line, lock) {
            console!("channel write failed: {e}; message dropped");
            std::thread::sleep(Duration::from_millis(50));
        }
        pending.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_line(port: &File, line: &str, lock: &Mutex<()>) -> std::io::Result<()> {
    let _one_writer = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut port = port;
    port.write_all(line.as_bytes())
}

/// The answer to `message` when the reader can give it at once (see the module docs).
pub fn answer_at_once(message: &HostMessage) -> Option<GuestMessage> {
    match message {
        HostMessage::Ping { id } => Some(GuestMessage::Reply {
            id: *id,
            ok: true,
            code: None,
            stdout: String::new(),
            stderr: String::new(),
            error: None,
        }),
        HostMessage::Reidentify { id, identity } => Some(reidentify(*id, identity)),
        _ => None,
    }
}

/// Applies a new identity (hostname, clock, entropy); the reply carries how long the guest
/// took (`guest_us=N`), for the host's diagnostics.
pub fn reidentify(id: u64, identity: &Identity) -> GuestMessage {
    let started = Instant::now();
    let result = crate::config::apply_identity(identity);
    GuestMessage::Reply {
        id,
        ok: result.is_ok(),
        code: None,
        stdout: format!("guest_us={}", started.elapsed().as_micros()),
        stderr: String::new(),
        error: result.err(),
    }
}

fn read_loop(port: &File, messages: Sender<HostMessage>, write_lock: &Mutex<()>) {
    let mut port = port;
    let mut lines = LineBuffer::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match port.read(&mut buf) {
            Ok(0) => {
                // No host connected: whatever partial line we hold will never complete.
                lines.clear();
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(n) => {
                for line in lines.push(&buf[..n]) {
                    match hangar_proto::decode::<HostMessage>(&line) {
                        Ok(message) => {
                            if let Some(answer) = answer_at_once(&message) {
                                let line = hangar_proto::encode(&answer);
                                if let Err(e) = write_line(port, &line, write_lock) {
                                    console!("channel write failed: {e}; answer dropped");
                                }
                                continue;
                            }
                            if messages.send(message).is_err() {
                                return;
                            }
                        }
                        Err(e) => console!("ignoring an unreadable host line ({e}): {line:.200}"),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                console!("channel read failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Splits a byte stream into lines.
#[derive(Default)]
pub struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    /// Adds bytes and returns the complete, non-blank lines they finish (without their
    /// newline; invalid UTF-8 replaced). A line longer than [`MAX_LINE`] is dropped.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for chunk in bytes.split_inclusive(|&b| b == b'\n') {
            self.partial.extend_from_slice(chunk);
            if chunk.ends_with(b"\n") {
                let line = String::from_utf8_lossy(&self.partial).trim().to_string();
                if !line.is_empty() {
                    lines.push(line);
                }
                self.partial.clear();
            } else if self.partial.len() > MAX_LINE {
                console!("dropping an over-long host line");
                self.partial.clear();
            }
        }
        lines
    }

    /// Forgets a partial line.
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines_across_reads() {
        let mut buf = LineBuffer::default();
        assert!(buf.push(b"{\"op\":").is_empty());
        assert_eq!(
            buf.push(b"\"ping\",\"id\":1}\n\n{\"op\":\"ping\",\"id\":2}\r\n{"),
            vec![
                r#"{"op":"ping","id":1}"#.to_string(),
                r#"{"op":"ping","id":2}"#.to_string()
            ]
        );
        buf.clear();
        assert_eq!(buf.push(b"x\n"), vec!["x".to_string()]);
    }

    #[test]
    fn finds_the_named_port() {
        let dir = std::env::temp_dir().join(format!("hangar-init-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (port, name) in [("vport0p0", "other"), ("vport1p1", AGENT_PORT_NAME)] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(dir.join("vport2p0")).unwrap(); // no name file
        assert_eq!(
            find_port(&dir, AGENT_PORT_NAME).as_deref(),
            Some("vport1p1")
        );
        assert_eq!(find_port(&dir, "missing"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
