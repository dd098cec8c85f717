//! Network interfaces set up with the kernel's socket ioctls: link state, MAC, one IPv4
//! address with its prefix, a default route.
//!
//! These replace `busybox ip`: each `ip` was a fork and exec of busybox, whose code a
//! freshly cloned guest under TCG translates anew, so a join spent most of its time
//! starting programs rather than configuring anything. An ioctl is one system call.
//!
//! The calls need `CAP_NET_ADMIN` in the caller's network namespace (PID 1 has it).
//! Errors name the interface and the operation, for the host's reply.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A datagram socket to issue interface ioctls on (any family-`AF_INET` socket will do).
fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes no pointers; a non-negative return is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming `interface`, its union zeroed.
fn request(interface: &str) -> io::Result<libc::ifreq> {
    let bytes = interface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {interface:?}"),
        ));
    }
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

/// `ioctl(socket, op, req)`.
fn ioctl(socket: &OwnedFd, op: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `req` is a valid, writable ifreq for the call, which is what every SIOC*IF*
    // operation used here reads or writes.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), op as _, req as *mut libc::ifreq) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A `sockaddr` holding an IPv4 address (port 0), as the address ioctls take it.
fn inet_sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain old data; the kernel
    // reads the family first, as every sockaddr user does.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Sets `interface` up or down, keeping its other flags.
pub fn set_up(interface: &str, up: bool) -> Result<(), String> {
    let what = if up { "up" } else { "down" };
    let fail = |e: io::Error| format!("setting {interface} {what}: {e}");
    let socket = control_socket().map_err(fail)?;
    let mut req = request(interface).map_err(fail)?;
    ioctl(&socket, libc::SIOCGIFFLAGS, &mut req).map_err(fail)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let wanted = if up {
        flags | libc::IFF_UP as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    if wanted == flags {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = wanted;
    ioctl(&socket, libc::SIOCSIFFLAGS, &mut req).map_err(fail)
}

/// Sets an Ethernet interface's MAC (virtio-net takes a new one while the link is down).
pub fn set_mac(interface: &str, mac: [u8; 6]) -> Result<(), String> {
    let fail = |e: io::Error| format!("setting {interface}'s MAC: {e}");
    let socket = control_socket().map_err(fail)?;
    let mut req = request(interface).map_err(fail)?;
    // SAFETY: sockaddr is plain old data; all-zero bytes are a valid value.
    let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
    hw.sa_family = libc::ARPHRD_ETHER;
    for (dst, src) in hw.sa_data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_hwaddr = hw;
    ioctl(&socket, libc::SIOCSIFHWADDR, &mut req).map_err(fail)
}

/// Gives `interface` exactly one IPv4 address, `address/prefix`, replacing the one it
/// had (the kernel then routes the prefix to it; a changed address drops the old
/// prefix's route).
pub fn set_ipv4(interface: &str, address: Ipv4Addr, prefix: u8) -> Result<(), String> {
    let fail = |e: io::Error| format!("setting {interface}'s address {address}/{prefix}: {e}");
    if !(1..=32).contains(&prefix) {
        return Err(fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "prefix length must be 1 to 32",
        )));
    }
    let socket = control_socket().map_err(fail)?;
    let mut req = request(interface).map_err(fail)?;
    req.ifr_ifru.ifru_addr = inet_sockaddr(address);
    ioctl(&socket, libc::SIOCSIFADDR, &mut req).map_err(fail)?;
    let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)));
    req.ifr_ifru.ifru_netmask = inet_sockaddr(mask);
    ioctl(&socket, libc::SIOCSIFNETMASK, &mut req).map_err(fail)
}

/// Adds the default route via `gateway` out of `interface`; one already there is kept.
pub fn add_default_route(interface: &str, gateway: Ipv4Addr) -> Result<(), String> {
    let fail = |e: io::Error| format!("adding the default route via {gateway} on {interface}: {e}");
    let socket = control_socket().map_err(fail)?;
    let name = std::ffi::CString::new(interface)
        .map_err(|_| fail(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: rtentry is plain old data; all-zero bytes are a valid value (no device,
    // destination and mask 0.0.0.0: the default route).
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = inet_sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = inet_sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = inet_sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    route.rt_dev = name.as_ptr().cast_mut();
    // SAFETY: `route` is a valid rtentry and `name` (its rt_dev) outlives the call; the
    // kernel only reads both.
    let ret = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT as _, &route) };
    if ret == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EEXIST) {
        Ok(())
    } else {
        Err(fail(error))
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("not an IPv4 address with prefix length: {text:?}");
    let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&prefix) {
        return Err(bad());
    }
    Ok((address, prefix))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("not a MAC address: {text:?}");
    let mut mac = [0u8; 6];
    let mut pairs = text.split(':');
    for byte in &mut mac {
        let pair = pairs.next().ok_or_else(bad)?;
        if pair.len() != 2 || !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
    }
    if pairs.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_macs() {
        assert_eq!(
            parse_cidr("10.213.0.11/24"),
            Ok((Ipv4Addr::new(10, 213, 0, 11), 24))
        );
        for bad in [
            "10.213.0.11",
            "10.213.0.11/0",
            "10.213.0.11/33",
            "x/24",
            "/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_mac("02:68:00:00:00:0b"),
            Ok([0x02, 0x68, 0, 0, 0, 0x0b])
        );
        for bad in [
            "",
            "02:68:00:00:00",
            "-x:68:00:00:00:0b",
            "02:68:00:00:00:0bb",
            "02:68:00:00:00:0b:00",
            "+2:68:00:00:00:0b",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    /// The IPv4 address and netmask of `interface`, read back with SIOCGIF*.
    fn read_ipv4(interface: &str) -> (Ipv4Addr, Ipv4Addr) {
        let socket = control_socket().expect("socket");
        let read = |op| {
            let mut req = request(interface).expect("ifreq");
            ioctl(&socket, op, &mut req).expect("ioctl");
            // SAFETY: SIOCGIFADDR / SIOCGIFNETMASK fill the union with a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe {
                std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(req.ifr_ifru.ifru_addr)
            };
            Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
        };
        (read(libc::SIOCGIFADDR), read(libc::SIOCGIFNETMASK))
    }

    /// In a network namespace of its own (a thread's `unshare`; needs root, as the
    /// guest's PID 1 has): loopback set up, given an address twice (the second replaces
    /// the first) and a default route, each read back.
    #[test]
    fn configures_an_interface_in_a_namespace_of_its_own() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to make a network namespace");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: unshare(2) takes no pointers; it moves this thread alone into a new
            // network namespace, which goes with the thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            set_up("lo", true).expect("lo up");
            set_ipv4("lo", Ipv4Addr::new(10, 213, 0, 11), 24).expect("first address");
            assert_eq!(
                read_ipv4("lo"),
                (
                    Ipv4Addr::new(10, 213, 0, 11),
                    Ipv4Addr::new(255, 255, 255, 0)
                )
            );
            set_ipv4("lo", Ipv4Addr::new(10, 214, 1, 7), 16).expect("second address");
            assert_eq!(
                read_ipv4("lo"),
                (Ipv4Addr::new(10, 214, 1, 7), Ipv4Addr::new(255, 255, 0, 0))
            );
            add_default_route("lo", Ipv4Addr::new(10, 214, 0, 1)).expect("route");
            add_default_route("lo", Ipv4Addr::new(10, 214, 0, 1)).expect("route again");
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").expect("routes");
            // Default route: destination 00000000, gateway 10.214.0.1 in the kernel's
            // little-endian hex.
            assert!(
                routes.lines().any(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.get(1) == Some(&"00000000") && fields.get(2) == Some(&"0100D60A")
                }),
                "{routes}"
            );
            set_up("lo", false).expect("lo down");
            assert!(
                set_up("no-such-if", true)
                    .unwrap_err()
                    .contains("no-such-if")
            );
        })
        .join()
        .expect("namespace thread");
    }
}
