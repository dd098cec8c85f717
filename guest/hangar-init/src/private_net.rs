//! The guest's private segment (the second NIC): [`hangar_proto::PrivateNetwork`].
//!
//! Applied in order, each step's error returned as text for the host's reply: the
//! interface's MAC (a clone's NIC still has its template's), its one address (replacing
//! any earlier one; no route beyond the segment), the root's `/etc/hosts` (localhost, the
//! hostname, then the peers), the files. Restarting services is the caller's
//! ([`crate::services::stop_service`]).

use std::path::Path;

use hangar_proto::{FileWrite, PrivateNetwork};

use crate::config::{ip, wait_for, write_files};

/// Link, address, `/etc/hosts` and files of `network`, in the root at `root`.
pub fn apply(network: &PrivateNetwork, root: &Path, hostname: &str) -> Result<(), String> {
    check_mac(&network.mac)?;
    let dev = network.interface.as_str();
    let sys = Path::new("/sys/class/net").join(dev);
    wait_for(&sys).map_err(|()| format!("no network interface {dev}"))?;
    // virtio-net takes a new MAC while the link is down.
    ip(&["link", "set", dev, "down"])?;
    ip(&["link", "set", dev, "address", &network.mac])?;
    ip(&["addr", "flush", "dev", dev])?;
    ip(&["addr", "add", &network.address, "dev", dev])?;
    ip(&["link", "set", dev, "up"])?;
    let mut files = vec![FileWrite {
        path: "/etc/hosts".into(),
        contents: hosts_file(hostname, &network.hosts),
        mode: 0o644,
    }];
    files.extend(network.files.iter().cloned());
    write_files(root, &files)
}

/// `/etc/hosts` as hangar writes it for every guest, with the peers after.
pub fn hosts_file(hostname: &str, peers: &[(String, String)]) -> String {
    let mut text =
        format!("127.0.0.1 localhost\n127.0.1.1 {hostname}\n::1 localhost ip6-localhost\n");
    for (name, address) in peers {
        text.push_str(&format!("{address} {name}\n"));
    }
    text
}

/// Six hex pairs separated by colons (anything else would reach `ip` as an option).
fn check_mac(mac: &str) -> Result<(), String> {
    let pairs: Vec<&str> = mac.split(':').collect();
    if pairs.len() == 6
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(())
    } else {
        Err(format!("not a MAC address: {mac:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lists_peers_after_the_usual_lines() {
        let text = hosts_file("web-1", &[("redis".into(), "10.213.0.12".into())]);
        assert_eq!(
            text,
            "127.0.0.1 localhost\n127.0.1.1 web-1\n::1 localhost ip6-localhost\n10.213.0.12 redis\n"
        );
    }

    #[test]
    fn macs_are_checked() {
        assert!(check_mac("02:68:00:00:00:0b").is_ok());
        for bad in [
            "",
            "02:68:00:00:00",
            "-x:68:00:00:00:0b",
            "02:68:00:00:00:0bb",
        ] {
            assert!(check_mac(bad).is_err(), "{bad}");
        }
    }
}
