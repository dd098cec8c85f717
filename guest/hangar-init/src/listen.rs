//! Readiness probe: is a TCP socket listening on a port (`/proc/net/tcp{,6}`)?

/// TCP state `LISTEN` as printed in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// True when `/proc/net/tcp` or `/proc/net/tcp6` shows a listening socket on `port`.
pub fn is_listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .map(|text| listening_ports(&text).any(|p| p == port))
            .unwrap_or(false)
    })
}

/// Local ports of the sockets in state LISTEN in a `/proc/net/tcp`-format table.
///
/// Each row looks like `0: 00000000:0050 00000000:0000 0A ...`: the local address and
/// port in hex, the remote one, then the state. The header row and malformed rows are
/// skipped.
pub fn listening_ports(table: &str) -> impl Iterator<Item = u16> + '_ {
    table.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let local = fields.next()?;
        let _remote = fields.next()?;
        let state = fields.next()?;
        if !state.eq_ignore_ascii_case(TCP_LISTEN) {
            return None;
        }
        let (_, port) = local.rsplit_once(':')?;
        u16::from_str_radix(port, 16).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::listening_ports;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0F02000A:0050 0202000A:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn finds_listening_ports_only() {
        let ports: Vec<u16> = listening_ports(TCP).collect();
        assert_eq!(ports, vec![80, 8080]);
    }

    #[test]
    fn parses_ipv6_rows() {
        assert_eq!(listening_ports(TCP6).collect::<Vec<_>>(), vec![6379]);
    }

    #[test]
    fn ignores_garbage() {
        assert_eq!(listening_ports("x\n1: nope\n\n").count(), 0);
    }
}
