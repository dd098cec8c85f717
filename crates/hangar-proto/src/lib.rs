//! The agent channel: messages between the host (the hangar server or agent) and
//! `hangar-init`, PID 1 in every guest.
//!
//! The channel is a virtio-serial port named [`AGENT_PORT_NAME`]. Each message is one line
//! of JSON (no embedded newlines; `serde_json` never emits them). The guest speaks first:
//! it repeats [`GuestMessage::Hello`] every [`HELLO_INTERVAL_MS`] until it receives
//! [`HostMessage::Configure`], because the host may connect to the port after the guest
//! starts writing and QEMU drops bytes written while no host is connected.
//!
//! After configuration the host may send requests that carry an `id`; the guest answers
//! each with exactly one [`GuestMessage::Reply`] carrying the same `id`. Unsolicited guest
//! events (stages, service starts and exits) may arrive at any time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port (`virtserialport,name=...`) that carries the channel.
pub const AGENT_PORT_NAME: &str = "org.hangar.agent";

/// How often an unconfigured guest repeats its hello.
pub const HELLO_INTERVAL_MS: u64 = 100;

/// Protocol version; the host refuses guests that speak another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostMessage {
    /// Identity and workload of the guest. Sent once, in answer to the first hello;
    /// the guest answers [`GuestMessage::Configured`] when its services are started.
    Configure(Box<GuestConfig>),
    /// New identity after a resume or a clone: hostname, clock, entropy.
    /// Answered with a [`GuestMessage::Reply`].
    Reidentify { id: u64, identity: Identity },
    /// Run a command inside the guest's root and report its exit code and output.
    Exec {
        id: u64,
        argv: Vec<String>,
        timeout_ms: u64,
    },
    /// Is something listening on this TCP port inside the guest (IPv4 or IPv6)?
    /// Answered with `ok: true` when it is.
    CheckListen { id: u64, port: u16 },
    /// Liveness check; answered with `ok: true`.
    Ping { id: u64 },
    /// Puts the guest on its private segment (see [`PrivateNetwork`]); answered with a
    /// [`GuestMessage::Reply`] once applied. Sent again, it replaces the previous one.
    Network {
        id: u64,
        #[serde(flatten)]
        network: PrivateNetwork,
    },
}

/// A guest's place on its private segment (the second NIC, `eth1`): hangar-init sets the
/// interface's MAC, brings it up with `address` alone (no route beyond the segment),
/// writes the root's `/etc/hosts` (localhost, the hostname, then `hosts`), writes `files`,
/// reloads the services named in `reload` and restarts those in `restart`, in that order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateNetwork {
    /// Interface name in the guest, e.g. `eth1`.
    pub interface: String,
    /// `aa:bb:cc:dd:ee:ff`, a unicast address.
    pub mac: String,
    /// IPv4 address with prefix length, e.g. `10.213.0.11/24`.
    pub address: String,
    /// `(name, address)` of each peer, for `/etc/hosts`.
    #[serde(default)]
    pub hosts: Vec<(String, String)>,
    #[serde(default)]
    pub files: Vec<FileWrite>,
    /// Names of configured services to stop and start again (they read `files`).
    #[serde(default)]
    pub restart: Vec<String>,
    /// Configured services told to read `files` again with a signal instead: see
    /// [`ServiceReload`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reload: Vec<ServiceReload>,
}

/// A running service told to read its configuration again, the way pre-forking servers
/// (nginx, Apache, ...) reload: its main process gets `signal` and starts new workers with
/// the new configuration, while the workers it had finish and exit. hangar-init answers
/// once every child the process had before the signal has exited (from then on only new
/// workers accept connections), or, when they have not within 5 s (the new configuration
/// was refused, say), restarts the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceReload {
    pub name: String,
    pub signal: ReloadSignal,
}

/// The signals a service may reload on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ReloadSignal {
    Hup,
    Usr1,
    Usr2,
}

/// Everything a guest needs to become a particular VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub identity: Identity,
    /// Network set-up; `None` leaves only loopback.
    pub network: Option<NetworkConfig>,
    /// Root filesystem the services run in (chrooted); `None` runs them in the initramfs.
    pub root: Option<RootConfig>,
    /// Files written into the root before services start (identity, per-VM settings).
    #[serde(default)]
    pub files: Vec<FileWrite>,
    /// Long-running service processes, started in order.
    #[serde(default)]
    pub services: Vec<ServiceCommand>,
}

/// Per-VM identity. Never baked into a shared image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// Wall-clock time to step the guest clock to, in milliseconds since the Unix epoch.
    pub unix_time_ms: u64,
    /// Hex-encoded random bytes (at least 32) mixed into the guest's RNG with credit,
    /// followed by a forced reseed, so that no two guests share RNG state.
    pub entropy_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interface name in the guest, e.g. `eth0`.
    pub interface: String,
    /// Address with prefix length, e.g. `10.0.2.15/24`.
    pub address: String,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootConfig {
    /// Block device holding the root, e.g. `/dev/vda`, or `serial:NAME` for the virtio
    /// disk with that serial number. With `layers`, the writable upper layer.
    pub device: String,
    /// Filesystem type, e.g. `ext4`.
    pub fstype: String,
    /// Read-only layers under the root, top first: the root is an overlayfs of these with
    /// `device` as its upper layer (`data/` and `work/` on it). Empty: `device` is the root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerMount>,
}

/// A read-only root filesystem layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMount {
    /// `/dev/vdX` or `serial:NAME`.
    pub device: String,
    /// e.g. `squashfs`.
    pub fstype: String,
}

/// Where hangar-init looks for a configuration of its own (an exported image boots
/// without a host on the agent channel): a [`GuestConfig`] as JSON, in the initramfs.
pub const STANDALONE_CONFIG: &str = "/hangar/standalone.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileWrite {
    /// Absolute path inside the root.
    pub path: String,
    pub contents: String,
    /// Unix permission bits, e.g. `0o644`.
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCommand {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the root; `/` when absent.
    pub workdir: Option<String>,
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GuestMessage {
    /// Repeated until configured.
    Hello {
        protocol: u32,
        /// Kernel release (`uname -r`).
        kernel: String,
        /// Guest uptime when sent.
        uptime_ms: u64,
    },
    /// Boot progress: `modules`, `mounts`, `channel`, `network`, `root`, `files`, `services`.
    Stage {
        stage: String,
        uptime_ms: u64,
    },
    /// Configuration applied and every service started.
    Configured {
        uptime_ms: u64,
    },
    /// Configuration failed; the guest stays up so the host can read the reason.
    Failed {
        stage: String,
        error: String,
    },
    ServiceStarted {
        name: String,
        pid: u32,
    },
    ServiceExited {
        name: String,
        /// Exit code, when it exited normally.
        code: Option<i32>,
        /// Signal number, when it was killed.
        signal: Option<i32>,
    },
    /// Answer to a request with an `id`.
    Reply {
        id: u64,
        ok: bool,
        /// Exit code of an `exec`.
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        stdout: String,
        #[serde(default)]
        stderr: String,
        #[serde(default)]
        error: Option<String>,
    },
}

/// Encodes a message as one line, newline included.
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut line = serde_json::to_string(msg).expect("protocol messages always serialize");
    line.push('\n');
    line
}

/// Decodes one line (with or without its newline).
pub fn decode<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, serde_json::Error> {
    serde_json::from_str(line.trim_end_matches(['\r', '\n']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_round_trips_as_one_line() {
        let msg = HostMessage::Configure(Box::new(GuestConfig {
            identity: Identity {
                hostname: "vm-1".into(),
                unix_time_ms: 1_700_000_000_000,
                entropy_hex: "00".repeat(32),
            },
            network: Some(NetworkConfig {
                interface: "eth0".into(),
                address: "10.0.2.15/24".into(),
                gateway: Some("10.0.2.2".into()),
                dns: vec!["10.0.2.3".into()],
            }),
            root: Some(RootConfig {
                device: "/dev/vda".into(),
                fstype: "ext4".into(),
                layers: vec![LayerMount {
                    device: "serial:hangar-layer-0".into(),
                    fstype: "squashfs".into(),
                }],
            }),
            files: vec![FileWrite {
                path: "/etc/motd".into(),
                contents: "line one\nline two\n".into(),
                mode: 0o644,
            }],
            services: vec![ServiceCommand {
                name: "web".into(),
                argv: vec!["httpd".into(), "-f".into()],
                env: BTreeMap::new(),
                workdir: None,
            }],
        }));
        let line = encode(&msg);
        assert_eq!(
            line.matches('\n').count(),
            1,
            "exactly one trailing newline"
        );
        assert!(line.starts_with(r#"{"op":"configure""#), "{line}");
        assert_eq!(decode::<HostMessage>(&line).unwrap(), msg);
    }

    #[test]
    fn guest_events_are_tagged() {
        let line = encode(&GuestMessage::ServiceExited {
            name: "web".into(),
            code: Some(1),
            signal: None,
        });
        assert!(line.starts_with(r#"{"event":"service_exited""#), "{line}");
        let reply: GuestMessage = decode(r#"{"event":"reply","id":7,"ok":true}"#).unwrap();
        assert_eq!(
            reply,
            GuestMessage::Reply {
                id: 7,
                ok: true,
                code: None,
                stdout: String::new(),
                stderr: String::new(),
                error: None
            }
        );
    }

    #[test]
    fn network_round_trips_flat() {
        let msg = HostMessage::Network {
            id: 3,
            network: PrivateNetwork {
                interface: "eth1".into(),
                mac: "02:68:00:00:00:0b".into(),
                address: "10.213.0.11/24".into(),
                hosts: vec![("redis".into(), "10.213.0.12".into())],
                files: Vec::new(),
                restart: vec!["web".into()],
                reload: vec![ServiceReload {
                    name: "proxy".into(),
                    signal: ReloadSignal::Hup,
                }],
            },
        };
        let line = encode(&msg);
        assert!(
            line.starts_with(r#"{"op":"network","id":3,"interface":"eth1""#),
            "{line}"
        );
        assert!(
            line.contains(r#""reload":[{"name":"proxy","signal":"HUP"}]"#),
            "{line}"
        );
        assert_eq!(decode::<HostMessage>(&line).unwrap(), msg);
    }

    #[test]
    fn unknown_ops_are_rejected() {
        assert!(decode::<HostMessage>(r#"{"op":"format_disk"}"#).is_err());
    }
}
