//! Private segments: an L2 network per stack that only its VMs share.
//!
//! Every VM of hangar's kernel has a second NIC ([`hangar_vmm::VmSpec::segment_nic`]), and
//! each segment a switch per host, made with its first member and gone with its last. Two
//! kinds ([`hangar_vmm::SegmentNic`]):
//!
//! - **Kernel bridges** (the host process runs as root): the NIC is a tap in the host's
//!   segment namespace ([`hangar_vmm::tap`]), the switch a Linux bridge there, and joining
//!   adds the tap to it.
//! - **hangar's own switch** (otherwise): the NIC is a unix datagram netdev, one Ethernet
//!   frame per datagram, whose other end is a socket in the VM's directory
//!   ([`SegmentSockets`]); joining binds that socket as a port of the segment's
//!   [`switch`], a userspace MAC-learning switch.
//!
//! Joining ([`crate::Host::join_segment`]) then tells the guest its address, MAC and peers
//! ([`hangar_proto::PrivateNetwork`]). The membership is written in the VM's directory
//! ([`MEMBERSHIP_FILE`]) and a host process that starts again connects the VMs it adopts
//! or wakes again ([`Segments::rejoin`]: the port bound anew, or the new QEMU's tap added);
//! the guest keeps its settings in its own memory.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hangar_vmm::tap::SegmentNetns;
use hangar_vmm::{SegmentNic, SegmentSockets};
use serde::{Deserialize, Serialize};

mod switch;

pub use switch::SegmentStats;
use switch::{Metrics, Switch};

/// The file in a VM's directory naming the segment it joined.
pub const MEMBERSHIP_FILE: &str = "segment";

/// The guest's interface for its segment NIC (the second virtio-net device).
pub const GUEST_INTERFACE: &str = "eth1";

/// What [`crate::Host::join_segment`] connects a VM to and tells its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentJoin {
    /// The segment's name (one per stack): letters, digits, `.`, `_`, `-`; 1 to 63.
    pub segment: String,
    /// The guest's MAC on the segment: `aa:bb:cc:dd:ee:ff`, unicast.
    pub mac: String,
    /// The guest's address with prefix: a private IPv4 address (RFC 1918), e.g.
    /// `10.213.0.11/24`, neither the network's nor its broadcast address.
    pub address: String,
    /// `(name, address)` of each peer, written to the guest's `/etc/hosts`.
    #[serde(default)]
    pub hosts: Vec<(String, String)>,
    /// Files written into the guest's root after the network is up.
    #[serde(default)]
    pub files: Vec<hangar_proto::FileWrite>,
    /// Service processes (their catalog names) restarted after the files are written.
    #[serde(default)]
    pub restart: Vec<String>,
    /// Service processes told to read the files again with a signal instead
    /// ([`hangar_proto::ServiceReload`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reload: Vec<hangar_proto::ServiceReload>,
}

/// Why a segment operation cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("invalid segment join: {0}")]
    Invalid(String),
    #[error("VM {0} has no segment NIC (made before segments existed, or not running here)")]
    NoNic(String),
    #[error("binding VM {vm}'s segment port {}", path.display())]
    Port {
        vm: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// What could not be done on a kernel bridge (the VM, its tap, the bridge and the
    /// namespace named).
    #[error("{what}")]
    Bridge {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl SegmentJoin {
    /// Checks every field (see their docs); the guest is never sent a join that fails.
    pub fn validate(&self) -> Result<(), SegmentError> {
        let invalid = |what: String| Err(SegmentError::Invalid(what));
        if self.segment.is_empty()
            || self.segment.len() > 63
            || !self
                .segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return invalid(format!("segment name {:?}", self.segment));
        }
        let mac = parse_mac(&self.mac)
            .ok_or_else(|| SegmentError::Invalid(format!("MAC {:?}", self.mac)))?;
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return invalid(format!("MAC {} is not a unicast address", self.mac));
        }
        private_address(&self.address).map_err(SegmentError::Invalid)?;
        for (name, address) in &self.hosts {
            if !is_hostname(name) {
                return invalid(format!("peer name {name:?}"));
            }
            if address.parse::<Ipv4Addr>().is_err() {
                return invalid(format!("peer {name}'s address {address:?}"));
            }
        }
        for file in &self.files {
            if !file.path.starts_with('/') {
                return invalid(format!("file path {:?} is not absolute", file.path));
            }
        }
        if let Some(name) = self
            .restart
            .iter()
            .chain(self.reload.iter().map(|r| &r.name))
            .find(|name| name.is_empty())
        {
            return invalid(format!("service name {name:?}"));
        }
        Ok(())
    }

    /// What the guest is told.
    pub fn guest_network(&self) -> hangar_proto::PrivateNetwork {
        hangar_proto::PrivateNetwork {
            interface: GUEST_INTERFACE.into(),
            mac: self.mac.to_ascii_lowercase(),
            address: self.address.clone(),
            hosts: self.hosts.clone(),
            files: self.files.clone(),
            restart: self.restart.clone(),
            reload: self.reload.clone(),
        }
    }
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let bytes = mac
        .split(':')
        .map(|pair| {
            (pair.len() == 2)
                .then(|| u8::from_str_radix(pair, 16).ok())
                .flatten()
        })
        .collect::<Option<Vec<u8>>>()?;
    bytes.try_into().ok()
}

/// `a.b.c.d/p` in 10/8, 172.16/12 or 192.168/16 with p in 8..=30, not the network's or the
/// broadcast address.
fn private_address(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || {
        format!("address {text:?} (want a private IPv4 address with prefix, e.g. 10.213.0.11/24)")
    };
    let (ip, prefix) = text.split_once('/').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !ip.is_private() {
        return Err(format!(
            "address {ip} is not private (10/8, 172.16/12, 192.168/16)"
        ));
    }
    if !(8..=30).contains(&prefix) {
        return Err(format!("prefix /{prefix} (want 8 to 30)"));
    }
    let host_bits = u32::from(ip) & (u32::MAX >> prefix);
    if host_bits == 0 || host_bits == u32::MAX >> prefix {
        return Err(format!("{text} is its network's own or broadcast address"));
    }
    Ok((ip, prefix))
}

fn is_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The namespace the host whose data dir is `data_dir` makes its segment taps in, or `None`
/// for hangar's switch ([`hangar_vmm::tap::SegmentNet::resolve`]); says which in the log.
pub fn netns_for(
    mode: hangar_vmm::tap::SegmentNet,
    data_dir: &Path,
) -> std::io::Result<Option<SegmentNetns>> {
    let netns = mode.resolve(data_dir)?;
    match &netns {
        Some(netns) => {
            tracing::info!(netns = %netns.name(), "private segments: taps on kernel bridges")
        }
        None => tracing::info!("private segments: hangar's switch"),
    }
    Ok(netns)
}

/// One VM's port.
struct Member {
    segment: String,
    nic: SegmentNic,
}

/// A segment's kernel bridge here.
struct Bridge {
    netns: SegmentNetns,
    name: String,
    /// The taps added to it (shared with its counters' task).
    taps: Arc<Mutex<Vec<String>>>,
    /// Adds what its taps handed their QEMUs to the segment's `/metrics` counters.
    counting: tokio::task::JoinHandle<()>,
}

/// How often a bridge's taps' counters are added to `/metrics`.
const BRIDGE_METRICS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Bridge {
    fn taps(&self) -> Vec<String> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The task that reads the taps' counters every [`BRIDGE_METRICS_EVERY`] and adds
    /// what they gained to the segment's counters (a tap made anew by a new QEMU starts
    /// from zero: all it counts is new).
    fn count(
        segment: &str,
        netns: SegmentNetns,
        taps: Arc<Mutex<Vec<String>>>,
    ) -> tokio::task::JoinHandle<()> {
        let metrics = Metrics::new(segment);
        tokio::spawn(async move {
            let mut seen: HashMap<String, hangar_vmm::tap::LinkCounters> = HashMap::new();
            loop {
                tokio::time::sleep(BRIDGE_METRICS_EVERY).await;
                let names = taps.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let netns = netns.clone();
                let Ok(Ok(now)) = tokio::task::spawn_blocking(move || netns.counters(&names)).await
                else {
                    continue;
                };
                let mut next = HashMap::new();
                for (tap, counters) in now {
                    let before = seen.get(&tap).copied().unwrap_or_default();
                    let gained = |now: u64, then: u64| if now >= then { now - then } else { now };
                    metrics
                        .frames_forwarded
                        .increment(gained(counters.tx_packets, before.tx_packets));
                    metrics
                        .bytes_forwarded
                        .increment(gained(counters.tx_bytes, before.tx_bytes));
                    metrics
                        .frames_dropped
                        .increment(gained(counters.tx_dropped, before.tx_dropped));
                    next.insert(tap, counters);
                }
                seen = next;
            }
        })
    }
}

/// The switches of this host's segments and their members.
#[derive(Default)]
pub struct Segments {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    switches: HashMap<String, Arc<Switch>>,
    bridges: HashMap<String, Bridge>,
    members: HashMap<String, Member>,
}

impl Segments {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects VM `vm`'s NIC to `segment` (its switch or bridge made when it is the
    /// first member) and records the membership in the VM's directory. Already there:
    /// nothing changes. In another segment: moved. `give` hands a bound port socket to the
    /// VM's QEMU. Must be called within a tokio runtime.
    pub fn attach(
        &self,
        segment: &str,
        vm: &str,
        nic: &SegmentNic,
        give: &dyn Fn(&Path) -> std::io::Result<()>,
    ) -> Result<(), SegmentError> {
        let mut state = self.state();
        if let Some(member) = state.members.get(vm) {
            if member.segment == segment && member.nic == *nic {
                match nic {
                    SegmentNic::Datagram(_) => {
                        if state
                            .switches
                            .get(segment)
                            .is_some_and(|switch| switch.has_port(vm))
                        {
                            return Ok(());
                        }
                    }
                    // The tap may be a new QEMU's (same name): adding it again is harmless.
                    SegmentNic::Tap(tap) => {
                        if let Some(bridge) = state.bridges.get(segment) {
                            return bridge
                                .netns
                                .attach(&bridge.name, &tap.name)
                                .map_err(|source| bridge_error(vm, tap, &bridge.name, source));
                        }
                    }
                }
            }
            Self::remove(&mut state, vm);
        }
        match nic {
            SegmentNic::Datagram(sockets) => {
                Self::add_port(&mut state, segment, vm, sockets, give)?
            }
            SegmentNic::Tap(tap) => Self::add_tap(&mut state, segment, vm, tap)?,
        }
        state.members.insert(
            vm.to_owned(),
            Member {
                segment: segment.to_owned(),
                nic: nic.clone(),
            },
        );
        // Unrecorded, the membership would not survive a restart: undone (port or tap
        // taken off again, a switch or bridge made for it removed).
        if let Err(source) = std::fs::write(membership_file(nic), segment.as_bytes()) {
            Self::remove(&mut state, vm);
            return Err(SegmentError::Port {
                vm: vm.to_owned(),
                path: membership_file(nic),
                source,
            });
        }
        tracing::info!(segment, vm, "joined segment");
        Ok(())
    }

    fn add_port(
        state: &mut State,
        segment: &str,
        vm: &str,
        sockets: &SegmentSockets,
        give: &dyn Fn(&Path) -> std::io::Result<()>,
    ) -> Result<(), SegmentError> {
        let switch = state
            .switches
            .entry(segment.to_owned())
            .or_insert_with(|| Switch::new(segment))
            .clone();
        if let Err(source) = switch.add_port(vm, sockets, give) {
            switch.remove_port(vm, &sockets.port);
            if switch.is_empty() {
                state.switches.remove(segment);
            }
            return Err(SegmentError::Port {
                vm: vm.to_owned(),
                path: sockets.port.clone(),
                source,
            });
        }
        Ok(())
    }

    fn add_tap(
        state: &mut State,
        segment: &str,
        vm: &str,
        tap: &hangar_vmm::SegmentTap,
    ) -> Result<(), SegmentError> {
        let name = hangar_vmm::tap::bridge_name(segment);
        let error = |source| bridge_error(vm, tap, &name, source);
        let made = !state.bridges.contains_key(segment);
        if made {
            tap.netns.add_bridge(&name).map_err(error)?;
        }
        let bridge = state.bridges.entry(segment.to_owned()).or_insert_with(|| {
            let taps = Arc::new(Mutex::new(Vec::new()));
            Bridge {
                netns: tap.netns.clone(),
                name: name.clone(),
                counting: Bridge::count(segment, tap.netns.clone(), taps.clone()),
                taps,
            }
        });
        if let Err(source) = tap.netns.attach(&name, &tap.name) {
            if bridge.taps().is_empty() {
                let _ = tap.netns.delete_bridge(&name);
                if let Some(bridge) = state.bridges.remove(segment) {
                    bridge.counting.abort();
                }
            }
            return Err(error(source));
        }
        bridge
            .taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tap.name.clone());
        Ok(())
    }

    /// Disconnects VM `vm` from its segment, if any, and forgets the membership (the
    /// switch goes with its last member). Returns the segment it left.
    pub fn detach(&self, vm: &str) -> Option<String> {
        let mut state = self.state();
        let left = Self::remove(&mut state, vm)?;
        tracing::info!(segment = %left, vm, "left segment");
        Some(left)
    }

    fn remove(state: &mut State, vm: &str) -> Option<String> {
        let member = state.members.remove(vm)?;
        match &member.nic {
            SegmentNic::Datagram(sockets) => {
                if let Some(switch) = state.switches.get(&member.segment) {
                    switch.remove_port(vm, &sockets.port);
                    if switch.is_empty() {
                        state.switches.remove(&member.segment);
                    }
                }
            }
            SegmentNic::Tap(tap) => {
                if let Some(bridge) = state.bridges.get_mut(&member.segment) {
                    // A tap whose QEMU exited is gone from the bridge already.
                    if let Err(err) = bridge.netns.detach(&bridge.name, &tap.name) {
                        tracing::warn!(vm, tap = %tap.name, bridge = %bridge.name, error = %err, "cannot take the tap off its bridge");
                    }
                    bridge
                        .taps
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|name| *name != tap.name);
                    if bridge.taps().is_empty() {
                        if let Err(err) = bridge.netns.delete_bridge(&bridge.name) {
                            tracing::warn!(bridge = %bridge.name, error = %err, "cannot delete a segment's bridge");
                        }
                        bridge.counting.abort();
                        state.bridges.remove(&member.segment);
                    }
                }
            }
        }
        let _ = std::fs::remove_file(membership_file(&member.nic));
        Some(member.segment)
    }

    /// Connects VM `vm` again to the segment its recorded membership names (a host
    /// process started again, a VM restored): nothing when it joined none or is connected.
    pub fn rejoin(
        &self,
        vm: &str,
        nic: &SegmentNic,
        give: &dyn Fn(&Path) -> std::io::Result<()>,
    ) -> Result<Option<String>, SegmentError> {
        let Ok(segment) = std::fs::read_to_string(membership_file(nic)) else {
            return Ok(None);
        };
        let segment = segment.trim().to_owned();
        self.attach(&segment, vm, nic, give)?;
        Ok(Some(segment))
    }

    /// The segment VM `vm` is in here.
    pub fn segment_of(&self, vm: &str) -> Option<String> {
        self.state().members.get(vm).map(|m| m.segment.clone())
    }

    /// The segments with a switch or bridge here and what each forwarded and dropped (a
    /// bridge's: what its taps handed to their QEMUs, and dropped as they did not read).
    pub fn stats(&self) -> Vec<(String, SegmentStats)> {
        // The bridges' counters are read in their namespace (a thread each time), outside
        // the registry's lock, so that joins are not held up by them.
        let (mut stats, bridges): (Vec<_>, Vec<_>) = {
            let state = self.state();
            (
                state
                    .switches
                    .iter()
                    .map(|(name, switch)| (name.clone(), switch.stats()))
                    .collect(),
                state
                    .bridges
                    .iter()
                    .map(|(name, bridge)| (name.clone(), bridge.netns.clone(), bridge.taps()))
                    .collect(),
            )
        };
        for (name, netns, taps) in bridges {
            let mut sum = SegmentStats::default();
            for (_, link) in netns.counters(&taps).unwrap_or_default() {
                sum.frames_forwarded += link.tx_packets;
                sum.bytes_forwarded += link.tx_bytes;
                sum.frames_dropped += link.tx_dropped;
            }
            stats.push((name, sum));
        }
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }
}

impl Drop for Segments {
    /// The port readers and the bridges' counting tasks end with the registry (as they
    /// would with the process); the
    /// memberships stay recorded for the next one.
    fn drop(&mut self) {
        let state = self.state();
        for switch in state.switches.values() {
            switch.stop();
        }
        for bridge in state.bridges.values() {
            bridge.counting.abort();
        }
    }
}

fn bridge_error(
    vm: &str,
    tap: &hangar_vmm::SegmentTap,
    bridge: &str,
    source: std::io::Error,
) -> SegmentError {
    SegmentError::Bridge {
        what: format!(
            "adding VM {vm}'s tap {} to bridge {bridge} (network namespace {})",
            tap.name,
            tap.netns.name()
        ),
        source,
    }
}

fn membership_file(nic: &SegmentNic) -> PathBuf {
    nic.dir().join(MEMBERSHIP_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join() -> SegmentJoin {
        SegmentJoin {
            segment: "shop".into(),
            mac: "02:68:00:00:00:0b".into(),
            address: "10.213.0.11/24".into(),
            hosts: vec![("redis".into(), "10.213.0.12".into())],
            files: Vec::new(),
            restart: Vec::new(),
            reload: Vec::new(),
        }
    }

    #[test]
    fn joins_are_validated() {
        assert!(join().validate().is_ok());
        let bad: Vec<fn(&mut SegmentJoin)> = vec![
            |j| j.segment = String::new(),
            |j| j.segment = "a/b".into(),
            |j| j.mac = "01:00:5e:00:00:01".into(),
            |j| j.mac = "02:68:00:00:00".into(),
            |j| j.mac = "--:68:00:00:00:0b".into(),
            |j| j.address = "10.213.0.11".into(),
            |j| j.address = "8.8.8.8/24".into(),
            |j| j.address = "10.213.0.0/24".into(),
            |j| j.address = "10.213.0.255/24".into(),
            |j| j.address = "10.213.0.11/31".into(),
            |j| j.hosts = vec![("bad name".into(), "10.213.0.12".into())],
            |j| j.hosts = vec![("redis".into(), "redis".into())],
            |j| j.restart = vec![String::new()],
            |j| {
                j.reload = vec![hangar_proto::ServiceReload {
                    name: String::new(),
                    signal: hangar_proto::ReloadSignal::Hup,
                }]
            },
        ];
        for (i, change) in bad.into_iter().enumerate() {
            let mut j = join();
            change(&mut j);
            assert!(j.validate().is_err(), "case {i}: {j:?}");
        }
    }

    fn no_give(_: &Path) -> std::io::Result<()> {
        Ok(())
    }

    /// A datagram segment NIC of a VM directory `dir`, and its port socket's path.
    fn datagram_nic(dir: &Path) -> (SegmentNic, PathBuf) {
        let sockets = SegmentSockets {
            nic: dir.join("nic1.sock"),
            port: dir.join("port.sock"),
        };
        let port = sockets.port.clone();
        (SegmentNic::Datagram(sockets), port)
    }

    #[tokio::test]
    async fn a_join_that_cannot_be_recorded_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let (nic, port) = datagram_nic(dir.path());
        // A directory where the membership file goes: writing it fails.
        std::fs::create_dir(membership_file(&nic)).unwrap();
        let segments = Segments::default();
        let err = segments.attach("shop", "vm-1", &nic, &no_give).unwrap_err();
        assert!(matches!(err, SegmentError::Port { .. }), "{err}");
        assert_eq!(segments.segment_of("vm-1"), None);
        assert!(segments.stats().is_empty(), "no switch is left for it");
        assert!(!port.exists(), "its port is closed");
    }

    #[tokio::test]
    async fn membership_survives_a_new_registry_and_goes_with_leave() {
        let dir = tempfile::tempdir().unwrap();
        let (sockets, port) = datagram_nic(dir.path());
        let segments = Segments::default();
        segments.attach("shop", "vm-1", &sockets, &no_give).unwrap();
        segments.attach("shop", "vm-1", &sockets, &no_give).unwrap();
        assert_eq!(segments.segment_of("vm-1").as_deref(), Some("shop"));
        assert_eq!(segments.stats().len(), 1);
        assert!(port.exists());
        // A new host process: the port is bound again from the recorded membership.
        let again = Segments::default();
        assert_eq!(
            again.rejoin("vm-1", &sockets, &no_give).unwrap().as_deref(),
            Some("shop")
        );
        assert_eq!(again.segment_of("vm-1").as_deref(), Some("shop"));
        assert_eq!(again.detach("vm-1").as_deref(), Some("shop"));
        assert!(
            again.stats().is_empty(),
            "the switch goes with its last member"
        );
        assert!(!port.exists());
        assert_eq!(again.rejoin("vm-1", &sockets, &no_give).unwrap(), None);
        // Moving to another segment leaves the first.
        let moved = Segments::default();
        moved.attach("a", "vm-1", &sockets, &no_give).unwrap();
        moved.attach("b", "vm-1", &sockets, &no_give).unwrap();
        let names: Vec<String> = moved.stats().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b"]);
    }
}
