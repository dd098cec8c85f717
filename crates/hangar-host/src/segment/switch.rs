//! One segment's switch: MAC learning over the unix datagram ports of its members.
//!
//! Each port is a datagram socket the host binds at the VM's
//! [`SegmentSockets::port`]; its VM's QEMU sends every frame its guest transmits there.
//! One task per port reads frames and routes them through the shared table: a frame to a
//! learnt unicast MAC goes to that port only; broadcast, multicast and unknown
//! destinations are flooded to every other port of the segment. Nothing crosses to another
//! segment: each switch knows only its own ports.
//!
//! A frame for a port goes straight to its QEMU ([`SegmentSockets::nic`], through a socket
//! connected to it) when nothing waits for that port and QEMU's socket has room; else it
//! waits in the port's queue ([`PORT_QUEUE`] frames; full: dropped, as a congested switch
//! port drops) for a second task per port that writes it. A unix datagram socket
//! queues only `net.unix.max_dgram_qlen` (10) datagrams and QEMU reads its own between
//! guest instructions; a connected sender is woken when the queue drains, so a busy QEMU
//! slows its own port down without holding up any other, and a paused one loses frames
//! after [`SEND_TIMEOUT`] each.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hangar_vmm::SegmentSockets;
use tokio::net::UnixDatagram;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Largest frame read (QEMU's datagram netdev carries frames without offloads: at most
/// the MTU plus the Ethernet header; the margin costs nothing).
const MAX_FRAME: usize = 65536;

/// Frames waiting for one port's QEMU before more are dropped.
const PORT_QUEUE: usize = 256;

/// How long a frame may wait for its QEMU to read (a paused VM does not) before it is
/// dropped.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(50);

type Mac = [u8; 6];

/// Frames and bytes a segment forwarded and dropped since its switch started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SegmentStats {
    pub frames_forwarded: u64,
    pub bytes_forwarded: u64,
    pub frames_dropped: u64,
    pub bytes_dropped: u64,
}

#[derive(Default)]
struct Counters {
    frames_forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    frames_dropped: AtomicU64,
    bytes_dropped: AtomicU64,
}

/// The `metrics` facade's counters of one segment (label `segment`).
/// A segment's `hangar_segment_*` counters on the process's `/metrics`.
pub(crate) struct Metrics {
    pub(crate) frames_forwarded: metrics::Counter,
    pub(crate) bytes_forwarded: metrics::Counter,
    pub(crate) frames_dropped: metrics::Counter,
    bytes_dropped: metrics::Counter,
}

impl Metrics {
    pub(crate) fn new(segment: &str) -> Metrics {
        let label = segment.to_owned();
        Metrics {
            frames_forwarded: metrics::counter!("hangar_segment_frames_forwarded_total", "segment" => label.clone()),
            bytes_forwarded: metrics::counter!("hangar_segment_bytes_forwarded_total", "segment" => label.clone()),
            frames_dropped: metrics::counter!("hangar_segment_frames_dropped_total", "segment" => label.clone()),
            bytes_dropped: metrics::counter!("hangar_segment_bytes_dropped_total", "segment" => label),
        }
    }
}

/// A port: the queue of frames for its QEMU, the way to it, its reader and writer tasks.
struct Port {
    queue: mpsc::Sender<Vec<u8>>,
    link: Arc<Link>,
    tasks: [JoinHandle<()>; 2],
}

/// The way to one port's QEMU, shared by its writer and the readers that route to it: a
/// frame goes straight out when nothing waits in the queue and QEMU's socket has room
/// (no task hop), else behind the frames queued (order kept per sender).
struct Link {
    nic: PathBuf,
    /// Connected to QEMU's socket; none until connected, or after QEMU went.
    sender: Mutex<Option<Arc<UnixDatagram>>>,
    /// Frames queued and not yet written.
    pending: AtomicU64,
}

impl Link {
    fn sender(&self) -> Option<Arc<UnixDatagram>> {
        self.sender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_sender(&self, sender: Option<Arc<UnixDatagram>>) {
        *self.sender.lock().unwrap_or_else(|e| e.into_inner()) = sender;
    }

    /// Sends at once when nothing is queued and the socket has room.
    fn try_direct(&self, frame: &[u8]) -> bool {
        if self.pending.load(Ordering::Acquire) != 0 {
            return false;
        }
        let Some(sender) = self.sender() else {
            return false;
        };
        match sender.try_send(frame) {
            Ok(_) => true,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => false,
            // QEMU went: the writer connects to the one bound now, if any.
            Err(_) => {
                self.set_sender(None);
                false
            }
        }
    }
}

impl Port {
    fn stop(&self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Default)]
struct Table {
    /// Ports by VM id.
    ports: HashMap<String, Port>,
    /// Learnt source MACs: the VM whose port they came from.
    macs: HashMap<Mac, String>,
}

pub(crate) struct Switch {
    name: String,
    table: Mutex<Table>,
    counters: Counters,
    metrics: Metrics,
}

impl Switch {
    pub(crate) fn new(name: &str) -> Arc<Switch> {
        Arc::new(Switch {
            name: name.to_owned(),
            table: Mutex::default(),
            counters: Counters::default(),
            metrics: Metrics::new(name),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every critical section leaves the maps consistent (single inserts/removes).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table().ports.is_empty()
    }

    pub(crate) fn has_port(&self, vm: &str) -> bool {
        self.table().ports.contains_key(vm)
    }

    pub(crate) fn stats(&self) -> SegmentStats {
        let c = &self.counters;
        SegmentStats {
            frames_forwarded: c.frames_forwarded.load(Ordering::Relaxed),
            bytes_forwarded: c.bytes_forwarded.load(Ordering::Relaxed),
            frames_dropped: c.frames_dropped.load(Ordering::Relaxed),
            bytes_dropped: c.bytes_dropped.load(Ordering::Relaxed),
        }
    }

    /// Binds VM `vm`'s port at `sockets.port` (replacing a socket file an earlier process
    /// left there), has `give` hand it to the VM's QEMU, and starts forwarding its frames.
    /// Must be called within a tokio runtime.
    pub(crate) fn add_port(
        self: &Arc<Self>,
        vm: &str,
        sockets: &SegmentSockets,
        give: &dyn Fn(&Path) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match std::fs::remove_file(&sockets.port) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let socket = std::os::unix::net::UnixDatagram::bind(&sockets.port)?;
        socket.set_nonblocking(true)?;
        give(&sockets.port)?;
        let socket = UnixDatagram::from_std(socket)?;
        let (queue, frames) = mpsc::channel(PORT_QUEUE);
        let link = Arc::new(Link {
            nic: sockets.nic.clone(),
            sender: Mutex::default(),
            pending: AtomicU64::new(0),
        });
        let port = Port {
            queue,
            link: link.clone(),
            tasks: [
                tokio::spawn(read_port(self.clone(), vm.to_owned(), socket)),
                tokio::spawn(write_port(self.clone(), link, frames)),
            ],
        };
        let old = self.table().ports.insert(vm.to_owned(), port);
        if let Some(old) = old {
            old.stop();
        }
        tracing::debug!(segment = %self.name, vm, "segment port added");
        Ok(())
    }

    /// Removes VM `vm`'s port: its reader ends, its socket file goes (its QEMU's frames
    /// then go nowhere) and the MACs learnt on it are forgotten.
    pub(crate) fn remove_port(&self, vm: &str, port: &Path) {
        let mut table = self.table();
        if let Some(port) = table.ports.remove(vm) {
            port.stop();
        }
        table.macs.retain(|_, owner| owner != vm);
        drop(table);
        let _ = std::fs::remove_file(port);
        tracing::debug!(segment = %self.name, vm, "segment port removed");
    }

    /// Stops every port's reader (the host's segments are going), leaving the socket
    /// files for the next process to bind again.
    pub(crate) fn stop(&self) {
        for port in self.table().ports.values() {
            port.stop();
        }
    }

    fn count(&self, forwarded: bool, frames: u64, bytes: u64) {
        let c = &self.counters;
        if forwarded {
            c.frames_forwarded.fetch_add(frames, Ordering::Relaxed);
            c.bytes_forwarded.fetch_add(bytes, Ordering::Relaxed);
            self.metrics.frames_forwarded.increment(frames);
            self.metrics.bytes_forwarded.increment(bytes);
        } else {
            c.frames_dropped.fetch_add(frames, Ordering::Relaxed);
            c.bytes_dropped.fetch_add(bytes, Ordering::Relaxed);
            self.metrics.frames_dropped.increment(frames);
            self.metrics.bytes_dropped.increment(bytes);
        }
    }

    /// Sends (or queues) a frame from `from`'s port where it goes (learning its source):
    /// to a learnt unicast destination's port, else flooded to every other port. Too
    /// short, from a port that left, to its own port, to nobody or to a full queue:
    /// dropped.
    fn forward(&self, from: &str, frame: &[u8]) {
        if frame.len() < 14 {
            self.count(false, 1, frame.len() as u64);
            return;
        }
        let dst: Mac = frame[0..6].try_into().expect("6 bytes");
        let src: Mac = frame[6..12].try_into().expect("6 bytes");
        let mut table = self.table();
        if !table.ports.contains_key(from) {
            drop(table);
            self.count(false, 1, frame.len() as u64);
            return;
        }
        if src[0] & 1 == 0 && table.macs.get(&src).is_none_or(|owner| owner != from) {
            table.macs.insert(src, from.to_owned());
        }
        let known = (dst[0] & 1 == 0).then(|| table.macs.get(&dst)).flatten();
        let out = |port: &Port| (port.queue.clone(), port.link.clone());
        let outs: Vec<_> = match known {
            Some(owner) if owner == from => Vec::new(),
            Some(owner) => table.ports.get(owner).map(out).into_iter().collect(),
            None => table
                .ports
                .iter()
                .filter(|(vm, _)| vm.as_str() != from)
                .map(|(_, port)| out(port))
                .collect(),
        };
        drop(table);
        let mut dropped = u64::from(outs.is_empty());
        let mut sent = 0;
        for (queue, link) in outs {
            if link.try_direct(frame) {
                sent += 1;
                continue;
            }
            link.pending.fetch_add(1, Ordering::AcqRel);
            if queue.try_send(frame.to_vec()).is_err() {
                link.pending.fetch_sub(1, Ordering::AcqRel);
                dropped += 1;
            }
        }
        let len = frame.len() as u64;
        if sent > 0 {
            self.count(true, sent, sent * len);
        }
        if dropped > 0 {
            self.count(false, dropped, dropped * len);
        }
    }
}

/// Writes the frames queued for a port to its QEMU through a socket connected to
/// QEMU's (connected again when QEMU started anew: a restore, a migration back).
async fn write_port(switch: Arc<Switch>, link: Arc<Link>, mut frames: mpsc::Receiver<Vec<u8>>) {
    while let Some(frame) = frames.recv().await {
        let sent = deliver(&link, &frame).await;
        link.pending.fetch_sub(1, Ordering::AcqRel);
        switch.count(sent, 1, frame.len() as u64);
    }
}

/// Sends one frame to QEMU's socket at the link's `nic`: false when no QEMU is bound
/// there or it did not read within [`SEND_TIMEOUT`].
async fn deliver(link: &Link, frame: &[u8]) -> bool {
    for _ in 0..2 {
        let sender = match link.sender() {
            Some(sender) => sender,
            None => {
                let Ok(socket) = UnixDatagram::unbound() else {
                    return false;
                };
                if socket.connect(&link.nic).is_err() {
                    return false;
                }
                let socket = Arc::new(socket);
                link.set_sender(Some(socket.clone()));
                socket
            }
        };
        match tokio::time::timeout(SEND_TIMEOUT, sender.send(frame)).await {
            Ok(Ok(_)) => return true,
            // Its QEMU is gone (its socket with it): connect to the one bound now, if any.
            Ok(Err(_)) => link.set_sender(None),
            Err(_) => return false,
        }
    }
    false
}

async fn read_port(switch: Arc<Switch>, vm: String, socket: UnixDatagram) {
    let mut frame = vec![0u8; MAX_FRAME];
    loop {
        match socket.recv(&mut frame).await {
            Ok(len) => switch.forward(&vm, &frame[..len]),
            Err(err) => {
                tracing::warn!(segment = %switch.name, vm, error = %err, "segment port stopped reading");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for one VM's QEMU: bound at `nic`, sending to `port`.
    struct Nic {
        socket: UnixDatagram,
        sockets: SegmentSockets,
    }

    impl Nic {
        fn new(dir: &Path, vm: &str) -> Nic {
            let sockets = SegmentSockets {
                nic: dir.join(format!("{vm}-nic.sock")),
                port: dir.join(format!("{vm}-port.sock")),
            };
            Nic {
                socket: UnixDatagram::bind(&sockets.nic).unwrap(),
                sockets,
            }
        }

        async fn send(&self, dst: Mac, src: Mac, payload: &[u8]) {
            let mut frame = Vec::new();
            frame.extend(dst);
            frame.extend(src);
            frame.extend([0x08, 0x00]);
            frame.extend(payload);
            self.socket
                .send_to(&frame, &self.sockets.port)
                .await
                .unwrap();
        }

        /// The payloads received within a moment.
        async fn received(&self) -> Vec<Vec<u8>> {
            let mut got = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME];
            while let Ok(Ok(len)) = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                self.socket.recv(&mut buf),
            )
            .await
            {
                got.push(buf[14..len].to_vec());
            }
            got
        }
    }

    const A: Mac = [2, 0, 0, 0, 0, 0xa];
    const B: Mac = [2, 0, 0, 0, 0, 0xb];
    const C: Mac = [2, 0, 0, 0, 0, 0xc];
    const BROADCAST: Mac = [0xff; 6];

    fn no_give(_: &Path) -> std::io::Result<()> {
        Ok(())
    }

    #[tokio::test]
    async fn floods_unknown_then_forwards_to_the_learnt_port_only() {
        crate::metrics::install();
        let dir = tempfile::tempdir().unwrap();
        let switch = Switch::new("s1");
        let nics: Vec<Nic> = ["a", "b", "c"]
            .iter()
            .map(|vm| Nic::new(dir.path(), vm))
            .collect();
        for (vm, nic) in ["a", "b", "c"].iter().zip(&nics) {
            switch.add_port(vm, &nic.sockets, &no_give).unwrap();
        }
        // Unknown destination: flooded to b and c, never back to a.
        nics[0].send(B, A, b"who").await;
        assert_eq!(nics[1].received().await, vec![b"who".to_vec()]);
        assert_eq!(nics[2].received().await, vec![b"who".to_vec()]);
        assert!(nics[0].received().await.is_empty());
        // b answers a (learnt): only a gets it.
        nics[1].send(A, B, b"me").await;
        assert_eq!(nics[0].received().await, vec![b"me".to_vec()]);
        assert!(nics[2].received().await.is_empty());
        // a to b (learnt now): only b.
        nics[0].send(B, A, b"hi b").await;
        assert_eq!(nics[1].received().await, vec![b"hi b".to_vec()]);
        assert!(nics[2].received().await.is_empty());
        // Broadcast from c: a and b.
        nics[2].send(BROADCAST, C, b"all").await;
        assert_eq!(nics[0].received().await, vec![b"all".to_vec()]);
        assert_eq!(nics[1].received().await, vec![b"all".to_vec()]);
        let stats = switch.stats();
        assert_eq!(stats.frames_forwarded, 2 + 1 + 1 + 2, "{stats:?}");
        // A port whose QEMU is not bound (not running) drops what is queued for it.
        drop(nics);
        let quiet = Nic::new(dir.path(), "d");
        switch.add_port("d", &quiet.sockets, &no_give).unwrap();
        std::fs::remove_file(&quiet.sockets.nic).unwrap();
        quiet.send(BROADCAST, [2, 0, 0, 0, 0, 0xd], b"gone").await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(switch.stats().frames_dropped, 3, "{:?}", switch.stats());
        // The process's /metrics page shows the same counts.
        let page = crate::metrics::render_recorded();
        for line in [
            "hangar_segment_frames_forwarded_total{segment=\"s1\"} 6",
            "hangar_segment_frames_dropped_total{segment=\"s1\"} 3",
        ] {
            assert!(page.contains(line), "{line} in {page}");
        }
        assert_eq!(stats.frames_dropped, 0, "{stats:?}");
    }

    #[tokio::test]
    async fn a_port_that_left_neither_sends_nor_receives() {
        let dir = tempfile::tempdir().unwrap();
        let switch = Switch::new("s2");
        let a = Nic::new(dir.path(), "a");
        let b = Nic::new(dir.path(), "b");
        switch.add_port("a", &a.sockets, &no_give).unwrap();
        switch.add_port("b", &b.sockets, &no_give).unwrap();
        a.send(BROADCAST, A, b"1").await;
        assert_eq!(b.received().await.len(), 1);
        switch.remove_port("b", &b.sockets.port);
        assert!(!b.sockets.port.exists(), "its socket file goes");
        // Frames to b's MAC are flooded to nobody (dropped); b cannot send any more.
        a.send(B, A, b"2").await;
        assert!(b.received().await.is_empty());
        assert!(
            b.socket.send_to(b"x", &b.sockets.port).await.is_err(),
            "nothing is bound at a removed port"
        );
        assert_eq!(switch.stats().frames_dropped, 1);
        assert!(!switch.is_empty());
        switch.remove_port("a", &a.sockets.port);
        assert!(switch.is_empty());
    }

    #[tokio::test]
    async fn two_switches_share_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let one = Switch::new("one");
        let two = Switch::new("two");
        let a = Nic::new(dir.path(), "a");
        let b = Nic::new(dir.path(), "b");
        let c = Nic::new(dir.path(), "c");
        one.add_port("a", &a.sockets, &no_give).unwrap();
        one.add_port("b", &b.sockets, &no_give).unwrap();
        two.add_port("c", &c.sockets, &no_give).unwrap();
        a.send(BROADCAST, A, b"one only").await;
        c.send(BROADCAST, C, b"two only").await;
        assert_eq!(b.received().await, vec![b"one only".to_vec()]);
        assert!(c.received().await.is_empty());
        assert!(a.received().await.is_empty());
    }
}
