//! Segment NICs on kernel bridges: a tap per QEMU and a bridge per segment, all inside one
//! network namespace of the host process's own ([`SegmentNetns`]), used when the host
//! process runs as root (else the segment NIC is a unix datagram netdev on hangar's own
//! switch, see [`crate::SegmentSockets`]).
//!
//! - **The namespace** is made with `ip netns add` (kept under `/run/netns`, so it outlives
//!   the host process, as its VMs do) and holds nothing but the taps, the bridges and a
//!   loopback that stays down; IPv6 is off in it. The host's own network is not in it, so
//!   a guest on a segment reaches its peers and nothing else, whatever it sends.
//! - **A tap per QEMU start** ([`SegmentNetns::open_tap`]): non-persistent, made by a
//!   thread that entered the namespace, its file descriptor given to QEMU
//!   (`-netdev tap,fd=`, see [`SEGMENT_TAP_FD`]). It goes when QEMU exits, with its bridge
//!   port, so nothing is left behind by a crash. It has no vnet header, as the datagram
//!   netdev has none, so snapshots and templates move between the two.
//! - **A bridge per segment** ([`SegmentNetns::add_bridge`], STP off: a port forwards as
//!   soon as it is added); joining adds the VM's tap to it.
//!
//! Every call runs on a new thread that enters the namespace (`setns(2)` changes only the
//! calling thread), and blocks its caller for about as long as thread creation takes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The file descriptor number the segment tap has in QEMU (`-netdev tap,fd=3`).
pub const SEGMENT_TAP_FD: i32 = 3;

/// Where `ip netns` keeps named network namespaces.
const NETNS_DIR: &str = "/run/netns";

// Bridge ioctls (linux/sockios.h); not in the libc crate for Linux.
const SIOCBRADDBR: libc::Ioctl = 0x89a0;
const SIOCBRDELBR: libc::Ioctl = 0x89a1;
const SIOCBRADDIF: libc::Ioctl = 0x89a2;
const SIOCBRDELIF: libc::Ioctl = 0x89a3;

/// How a host makes its VMs' segment NICs (`--segment-net`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SegmentNet {
    /// Kernel bridges when this process may make them (root, `/dev/net/tun`), else the
    /// switch.
    #[default]
    Auto,
    /// Taps on kernel bridges in the host's segment namespace; an error without root.
    Bridge,
    /// Unix datagram netdevs on hangar's own switch (any user).
    Switch,
}

impl std::str::FromStr for SegmentNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SegmentNet::Auto),
            "bridge" => Ok(SegmentNet::Bridge),
            "switch" => Ok(SegmentNet::Switch),
            other => Err(format!(
                "unknown segment network {other:?} (auto, bridge or switch)"
            )),
        }
    }
}

impl std::fmt::Display for SegmentNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SegmentNet::Auto => "auto",
            SegmentNet::Bridge => "bridge",
            SegmentNet::Switch => "switch",
        })
    }
}

impl SegmentNet {
    /// The namespace segment taps go in for the host whose data dir is `data_dir`, or
    /// `None` for the switch. The namespace is made with the first tap
    /// ([`SegmentNetns::open_tap`]), so a host that runs no VM makes none. `bridge` is an
    /// error, and `auto` the switch, where this process cannot make one (not root, no
    /// `/dev/net/tun`, no `ip`).
    pub fn resolve(self, data_dir: &Path) -> io::Result<Option<SegmentNetns>> {
        if self == SegmentNet::Switch {
            return Ok(None);
        }
        // SAFETY: geteuid(2) cannot fail and reads nothing of ours.
        let root = unsafe { libc::geteuid() } == 0;
        let missing = if !root {
            Some("it runs as root")
        } else if !Path::new("/dev/net/tun").exists() {
            Some("/dev/net/tun")
        } else if Command::new("ip").arg("-V").output().is_err() {
            Some("the ip command (iproute2)")
        } else {
            None
        };
        match (self, missing) {
            (_, None) => Ok(Some(SegmentNetns::for_data_dir(data_dir))),
            (SegmentNet::Bridge, Some(what)) => Err(io::Error::other(format!(
                "segments on kernel bridges need {what}"
            ))),
            _ => Ok(None),
        }
    }
}

/// The network namespace holding a data dir's segment taps and bridges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentNetns {
    name: String,
}

/// A network interface's counters (`/proc/net/dev`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Frames and bytes the interface sent: for a tap, what went to its QEMU (the guest).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames dropped on the way out (a tap whose QEMU does not read: a paused VM).
    pub tx_dropped: u64,
}

impl SegmentNetns {
    /// The namespace of the host process whose data dir is `data_dir` (`hangar-` and a
    /// hash of its absolute path: one per data dir, found again by the next process).
    pub fn for_data_dir(data_dir: &Path) -> SegmentNetns {
        let path = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        SegmentNetns {
            name: format!("hangar-{}", short_hash(path.as_os_str().as_encoded_bytes())),
        }
    }

    /// Its name (`ip netns list`, `ip -n NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file under `/run/netns`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Makes the namespace, with IPv6 off, unless it exists (a previous process of the data
    /// dir, or a concurrent call, made it). Needs root.
    pub fn ensure(&self) -> io::Result<()> {
        // One maker at a time in this process: `ip netns add` makes the file before it
        // mounts the namespace on it, so another thread could open the file too early.
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
        if self.path().exists() {
            return Ok(());
        }
        if let Err(err) = ip(&["netns", "add", &self.name]) {
            if self.path().exists() {
                return Ok(());
            }
            return Err(err);
        }
        self.run(|| {
            for key in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6"), "1")?;
            }
            Ok(())
        })
    }

    /// Deletes the namespace (`ip netns delete`): its taps' QEMUs keep them until they
    /// exit; the bridges go with the namespace. Nothing when it does not exist.
    pub fn remove(&self) -> io::Result<()> {
        if !self.path().exists() {
            return Ok(());
        }
        ip(&["netns", "delete", &self.name])
    }

    /// Makes a non-persistent tap `name` in the namespace (made first if need be), up, without packet information
    /// or vnet header, and returns its file descriptor (for QEMU). A tap of that name that
    /// another open descriptor keeps is an error (`EBUSY`).
    pub fn open_tap(&self, name: &str) -> io::Result<OwnedFd> {
        self.ensure()?;
        let name = name.to_owned();
        self.run(move || {
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            let mut request = ifreq(&name)?;
            request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq, which lives across the call.
            check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) })?;
            set_up(&name, true)?;
            Ok(OwnedFd::from(tun))
        })
    }

    /// Makes bridge `name` (STP off) and brings it up; an existing one is kept.
    pub fn add_bridge(&self, name: &str) -> io::Result<()> {
        let name = name.to_owned();
        self.run(move || {
            let socket = control_socket()?;
            let c_name = CString::new(name.as_str()).map_err(io::Error::other)?;
            // SAFETY: SIOCBRADDBR reads the NUL-terminated name, alive across the call.
            let made = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDBR, c_name.as_ptr()) };
            match check(made) {
                Err(err) if err.raw_os_error() != Some(libc::EEXIST) => return Err(err),
                _ => {}
            }
            set_up(&name, true)
        })
    }

    /// Deletes bridge `name` (down first); its ports are let go. Nothing when it is gone.
    pub fn delete_bridge(&self, name: &str) -> io::Result<()> {
        let name = name.to_owned();
        self.run(move || {
            match set_up(&name, false) {
                Err(err) if err.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                other => other?,
            }
            let socket = control_socket()?;
            let c_name = CString::new(name.as_str()).map_err(io::Error::other)?;
            // SAFETY: SIOCBRDELBR reads the NUL-terminated name, alive across the call.
            check(unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRDELBR, c_name.as_ptr()) })
        })
    }

    /// Adds interface `port` (a tap) to bridge `bridge`; already there: nothing.
    pub fn attach(&self, bridge: &str, port: &str) -> io::Result<()> {
        self.bridge_port(bridge, port, SIOCBRADDIF)
    }

    /// Takes `port` off `bridge`. Nothing when either is gone or it is not a port of it.
    pub fn detach(&self, bridge: &str, port: &str) -> io::Result<()> {
        match self.bridge_port(bridge, port, SIOCBRDELIF) {
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENODEV | libc::EINVAL)) => Ok(()),
            other => other,
        }
    }

    fn bridge_port(&self, bridge: &str, port: &str, op: libc::Ioctl) -> io::Result<()> {
        let (bridge, port) = (bridge.to_owned(), port.to_owned());
        self.run(move || {
            let socket = control_socket()?;
            let index = if_index(&socket, &port)?;
            let mut request = ifreq(&bridge)?;
            request.ifr_ifru.ifru_ifindex = index;
            // SAFETY: the bridge ioctls read the ifreq, alive across the call.
            match check(unsafe { libc::ioctl(socket.as_raw_fd(), op, &mut request) }) {
                // Adding a port twice.
                Err(err) if op == SIOCBRADDIF && err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
                other => other,
            }
        })
    }

    /// The counters of the namespace's interfaces named in `names` (those that exist).
    pub fn counters(&self, names: &[String]) -> io::Result<Vec<(String, LinkCounters)>> {
        let names = names.to_vec();
        self.run(move || {
            let table = std::fs::read_to_string("/proc/thread-self/net/dev")?;
            Ok(parse_net_dev(&table)
                .into_iter()
                .filter(|(name, _)| names.contains(name))
                .collect())
        })
    }

    /// Runs `work` on a new thread inside the namespace and returns what it returned.
    fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let netns = File::open(self.path()).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("opening network namespace {}: {err}", self.path().display()),
            )
        })?;
        std::thread::Builder::new()
            .name("hangar-netns".into())
            .spawn(move || {
                // SAFETY: setns(2) on a descriptor this thread owns; it moves only this
                // thread, which ends with `work`.
                check(unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) })?;
                work()
            })?
            .join()
            .map_err(|_| io::Error::other("the network namespace thread panicked"))?
    }
}

/// The name of VM `vm`'s segment tap (at most 15 bytes, as interface names are).
pub fn tap_name(vm: &str) -> String {
    format!("hv{}", short_hash(vm.as_bytes()))
}

/// The name of segment `segment`'s bridge.
pub fn bridge_name(segment: &str) -> String {
    format!("hb{}", short_hash(segment.as_bytes()))
}

/// 12 hex digits of the SHA-256 of `bytes`.
fn short_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output().map_err(|err| {
        io::Error::new(err.kind(), format!("running ip {}: {err}", args.join(" ")))
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    )))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses), valid
    // all zero.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

/// A socket for interface ioctls, in the calling thread's namespace.
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: a fresh descriptor no one else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn if_index(socket: &OwnedFd, name: &str) -> io::Result<libc::c_int> {
    let mut request = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into the ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFINDEX, &mut request) })?;
    // SAFETY: the kernel filled the union's index.
    Ok(unsafe { request.ifr_ifru.ifru_ifindex })
}

/// Brings interface `name` up or down.
fn set_up(name: &str, up: bool) -> io::Result<()> {
    let socket = control_socket()?;
    let mut request = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq's flags.
    unsafe {
        check(libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCGIFFLAGS,
            &mut request,
        ))?;
        let flags = request.ifr_ifru.ifru_flags;
        let up_flag = libc::IFF_UP as libc::c_short;
        request.ifr_ifru.ifru_flags = if up {
            flags | up_flag
        } else {
            flags & !up_flag
        };
        check(libc::ioctl(
            socket.as_raw_fd(),
            libc::SIOCSIFFLAGS,
            &mut request,
        ))
    }
}

/// `(name, counters)` of each interface in a `/proc/net/dev` table.
fn parse_net_dev(table: &str) -> Vec<(String, LinkCounters)> {
    table
        .lines()
        .skip(2)
        .filter_map(|line| {
            let (name, numbers) = line.split_once(':')?;
            let numbers: Vec<u64> = numbers
                .split_whitespace()
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            // Receive: bytes packets errs drop fifo frame compressed multicast; then
            // transmit: bytes packets errs drop ...
            Some((
                name.trim().to_owned(),
                LinkCounters {
                    tx_bytes: *numbers.get(8)?,
                    tx_packets: *numbers.get(9)?,
                    tx_dropped: *numbers.get(11)?,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_name_and_differ() {
        for name in [
            tap_name("vm-01m8tv6k125r4zszwceec6sgrb"),
            bridge_name("shop"),
        ] {
            assert_eq!(name.len(), 14, "{name}");
            assert!(ifreq(&name).is_ok());
        }
        assert_ne!(tap_name("vm-1"), tap_name("vm-2"));
        assert_eq!(tap_name("vm-1"), tap_name("vm-1"));
        let a = SegmentNetns::for_data_dir(Path::new("/var/lib/hangar"));
        let b = SegmentNetns::for_data_dir(Path::new("/var/lib/hangar2"));
        assert_ne!(a, b);
        assert!(a.name().starts_with("hangar-"));
        assert_eq!(a.path(), Path::new("/run/netns").join(a.name()));
        assert!(ifreq("a-name-too-long-for-linux").is_err());
    }

    #[test]
    fn net_dev_tables_are_parsed() {
        let table = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
             lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
             hv0123456789ab: 1000 10 0 0 0 0 0 0 52000 40 0 3 0 0 0 0\n";
        let parsed = parse_net_dev(table);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            parsed[1],
            (
                "hv0123456789ab".to_owned(),
                LinkCounters {
                    tx_bytes: 52000,
                    tx_packets: 40,
                    tx_dropped: 3
                }
            )
        );
    }
}
