//! Egress policies enforced by QEMU's user-mode network (slirp), on the host side.
//!
//! - `open`: `-netdev user` as it always was: the guest reaches whatever the host can.
//! - `none` and `segment`: `restrict=on`: slirp drops every connection the guest opens
//!   (TCP and UDP, also to the host's `10.0.2.2`); port forwards *into* the guest
//!   (`hostfwd`) keep working.
//! - `allow`: `restrict=on` plus, per allowed target, a `guestfwd` at the target's guest
//!   address ([`hangar_core::egress::guest_address`]) on its port whose `cmd:` slirp runs
//!   for each connection the guest opens: [`relay_program`]` egress-relay HOST:PORT`
//!   ([`relay`]), connected to the guest's connection by its stdin and stdout. A target
//!   down when the VM starts is reached once it is up (each connection connects anew);
//!   any number of connections at once. `restrict=on` lets guest forwards through
//!   (libslirp checks them before dropping).
//!
//! Running a command means QEMU forks and execs, which [`crate::confine::SANDBOX`]
//! forbids (the child also calls `setsid`); a VM with an allow list therefore runs under
//! [`SANDBOX_WITH_RELAY`], the same filter with `spawn` and `elevateprivileges` allowed.
//! QEMU still runs as its unprivileged user, so `set*id` gains it nothing; what a guest
//! escaping into that QEMU could do in addition is run programs as that user. The slirp
//! configuration is not part of QEMU's migration stream (only sockets of chardev guest
//! forwards and DHCP leases are), so a restored VM (wake, migration, template clone) is
//! held to the policy on its own command line: its spec's.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use hangar_core::EgressPolicy;

use crate::{PortForward, VmSpec};

/// The seccomp filter of a VM whose allow list makes slirp run [`relay_program`] per
/// connection: [`crate::confine::SANDBOX`] with fork/exec (and the child's `setsid`).
pub const SANDBOX_WITH_RELAY: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=allow,resourcecontrol=deny";

/// The environment variable naming the program slirp runs to relay an allowed connection
/// (default: this process's own executable, the `hangar` binary).
pub const RELAY_ENV: &str = "HANGAR_EGRESS_RELAY";

/// The hidden `hangar` subcommand that relays one connection ([`relay`]).
pub const RELAY_SUBCOMMAND: &str = "egress-relay";

/// The `-sandbox` option for `spec`.
pub fn sandbox(spec: &VmSpec) -> &'static str {
    if spec.egress.forwards().is_empty() {
        crate::confine::SANDBOX
    } else {
        SANDBOX_WITH_RELAY
    }
}

/// The program slirp runs for each allowed connection: `$HANGAR_EGRESS_RELAY`, else this
/// process's executable (the server or agent that starts QEMU is the `hangar` binary). It
/// must be executable by the user QEMU runs as, and its path free of spaces and commas.
pub fn relay_program() -> PathBuf {
    std::env::var_os(RELAY_ENV)
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("hangar"))
}

/// The `-netdev` option of the VM's user-mode NIC `n0`: its port forwards and its policy.
pub fn netdev(forwards: &[PortForward], policy: &EgressPolicy) -> String {
    let mut netdev = "user,id=n0".to_string();
    if !policy.is_open() {
        netdev.push_str(",restrict=on");
    }
    for forward in forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:{}:{}-:{}",
            forward.host, forward.host_port, forward.guest_port
        ));
    }
    let forwards = policy.forwards();
    if !forwards.is_empty() {
        let program = relay_program();
        for forward in forwards {
            // Targets are addresses or DNS names with a port (checked when parsed), so
            // nothing here needs quoting for QEMU's option parser or slirp's shell split.
            netdev.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:{} {RELAY_SUBCOMMAND} {}",
                forward.guest,
                forward.port,
                program.display(),
                forward.target
            ));
        }
    }
    netdev
}

/// How long the relay waits for the target to accept.
pub const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Relays this process's stdin and stdout (one guest connection, as slirp hands it to its
/// `cmd:`) to `target` (`HOST:PORT`, resolved now) until both directions end. Writes
/// nothing else to stdout or stderr: both are the guest's connection. A target that
/// cannot be reached ends the relay at once, which closes the guest's connection.
pub fn relay(target: &str) -> std::io::Result<()> {
    let addrs: Vec<_> = target.to_socket_addrs()?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, RELAY_CONNECT_TIMEOUT) {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(err) => last = err,
        }
    }
    let stream = stream.ok_or(last)?;
    let upstream = stream.try_clone()?;
    // Guest → target on a thread of its own; target → guest here.
    let sending = std::thread::spawn(move || {
        let _ = copy(&mut std::io::stdin().lock(), &mut &upstream);
        let _ = upstream.shutdown(Shutdown::Write);
    });
    let _ = copy(&mut &stream, &mut std::io::stdout().lock());
    // The target closed: the guest's connection ends with this process (stdin, stdout
    // and stderr are its only references here).
    let _ = sending.join();
    Ok(())
}

/// Copies until end of input, flushing each chunk (stdout is buffered).
fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buffer[..n])?;
        to.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward() -> PortForward {
        PortForward {
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            host_port: 40000,
            guest_port: 80,
        }
    }

    #[test]
    fn open_is_the_old_netdev_and_none_restricts_it() {
        assert_eq!(
            netdev(&[forward()], &EgressPolicy::Open),
            "user,id=n0,hostfwd=tcp:127.0.0.1:40000-:80"
        );
        for policy in [EgressPolicy::None, EgressPolicy::Segment] {
            assert_eq!(
                netdev(&[forward()], &policy),
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40000-:80"
            );
        }
    }

    #[test]
    fn an_allow_list_adds_one_relayed_guest_forward_per_target() {
        let policy: EgressPolicy = "allow=127.0.0.1:5432,db.internal:80".parse().unwrap();
        let program = relay_program().display().to_string();
        assert_eq!(
            netdev(&[], &policy),
            format!(
                "user,id=n0,restrict=on\
                 ,guestfwd=tcp:10.0.2.100:5432-cmd:{program} egress-relay 127.0.0.1:5432\
                 ,guestfwd=tcp:10.0.2.101:80-cmd:{program} egress-relay db.internal:80"
            )
        );
    }

    #[test]
    fn a_relay_to_a_target_that_is_down_fails_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let started = std::time::Instant::now();
        assert!(relay(&format!("127.0.0.1:{port}")).is_err());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
