//! The guest's private segment (the second NIC): [`hangar_proto::PrivateNetwork`].
//!
//! Applied in order, each step's error returned as text for the host's reply: the
//! interface's MAC (a clone's NIC still has its template's), its one address (replacing
//! any earlier one; no route beyond the segment), the root's `/etc/hosts` (localhost, the
//! hostname, then the peers), the files. Restarting services is the caller's
//! ([`crate::services::stop_service`]).

use std::path::Path;

use hangar_proto::{FileWrite, PrivateNetwork};

use crate::config::{wait_for, write_files};
use crate::netdev;

/// Link, address, `/etc/hosts` and files of `network`, in the root at `root`.
pub fn apply(network: &PrivateNetwork, root: &Path, hostname: &str) -> Result<(), String> {
    let mac = netdev::parse_mac(&network.mac)?;
    let (address, prefix) = netdev::parse_cidr(&network.address)?;
    let dev = network.interface.as_str();
    let sys = Path::new("/sys/class/net").join(dev);
    wait_for(&sys).map_err(|()| format!("no network interface {dev}"))?;
    // virtio-net takes a new MAC while the link is down.
    netdev::set_up(dev, false)?;
    netdev::set_mac(dev, mac)?;
    netdev::set_ipv4(dev, address, prefix)?;
    netdev::set_up(dev, true)?;
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
}
