//! Which addresses hangar's APIs may listen on, and which an endpoint may be advertised at
//! (issue 13, finding 9). Pure checks, applied by `hangar server` and `hangar agent`
//! before anything binds.
//!
//! - An API (the server's REST API, an agent's API) listens on a loopback address unless
//!   the operator says, explicitly, that it may be reached from other machines
//!   (`--insecure-listen`). hangar has no TLS of its own: over the network its bearer
//!   tokens and answers travel in clear, so that is a decision to make (a private network,
//!   or a TLS-terminating proxy in front), never a default.
//! - An endpoint host is the address clients are told to connect to, so it must be one
//!   they can connect to: never a wildcard (`0.0.0.0`, `::`). To serve endpoints on every
//!   interface of a machine, give the address clients reach it by; the listeners bind to
//!   that address.

use std::net::{IpAddr, SocketAddr};

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExposureError {
    /// A non-loopback API address without the explicit opt-in.
    #[error(
        "{what} address {addr} can be reached from other machines, and hangar speaks plain \
         HTTP (tokens would cross the network in clear): listen on a loopback address \
         (127.0.0.1), or pass --insecure-listen to accept that (a private network, or a \
         TLS proxy in front)"
    )]
    InsecureListen {
        what: &'static str,
        addr: SocketAddr,
    },
    /// A wildcard address given as the address endpoints are advertised at.
    #[error(
        "endpoint host {0} is a wildcard, not an address clients can connect to: give this \
         machine's address as clients reach it (--endpoint-host 192.0.2.10, or 127.0.0.1)"
    )]
    WildcardEndpointHost(IpAddr),
}

/// Whether an API listening on `addr` can be reached only from this machine.
pub fn is_local_only(addr: IpAddr) -> bool {
    addr.to_canonical().is_loopback()
}

/// Checks where an API (`what`: "API", "agent API") is to listen. A loopback address is
/// fine; any other needs `insecure_allowed` (`--insecure-listen`). `Ok(true)` when the API
/// is reachable from the network (the caller warns loudly), `Ok(false)` when it is local.
pub fn check_listen(
    what: &'static str,
    addr: SocketAddr,
    insecure_allowed: bool,
) -> Result<bool, ExposureError> {
    if is_local_only(addr.ip()) {
        Ok(false)
    } else if insecure_allowed {
        Ok(true)
    } else {
        Err(ExposureError::InsecureListen { what, addr })
    }
}

/// Checks the address endpoints listen on and are advertised at: any concrete address,
/// never a wildcard.
pub fn check_endpoint_host(host: IpAddr) -> Result<(), ExposureError> {
    if host.to_canonical().is_unspecified() {
        Err(ExposureError::WildcardEndpointHost(host))
    } else {
        Ok(())
    }
}

/// The warning to log when [`check_listen`] allowed a network-reachable API.
pub fn insecure_warning(what: &str, addr: SocketAddr) -> String {
    format!(
        "INSECURE: the {what} listens on {addr}, reachable from other machines, over plain \
         HTTP: its bearer tokens and answers cross the network in clear; put it on a private \
         network or behind a TLS proxy"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn only_loopback_apis_need_no_opt_in() {
        for local in [
            "127.0.0.1:7070",
            "127.9.8.7:1",
            "[::1]:7070",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert_eq!(
                check_listen("API", addr(local), false),
                Ok(false),
                "{local}"
            );
            assert_eq!(check_listen("API", addr(local), true), Ok(false), "{local}");
        }
        for exposed in [
            "0.0.0.0:7070",
            "[::]:7070",
            "10.1.2.3:7070",
            "[2001:db8::1]:1",
        ] {
            let refused = check_listen("API", addr(exposed), false).unwrap_err();
            assert_eq!(
                refused,
                ExposureError::InsecureListen {
                    what: "API",
                    addr: addr(exposed)
                }
            );
            assert!(
                refused.to_string().contains("--insecure-listen"),
                "{refused}"
            );
            assert_eq!(
                check_listen("API", addr(exposed), true),
                Ok(true),
                "{exposed}"
            );
        }
    }

    #[test]
    fn a_wildcard_is_never_an_endpoint_host() {
        for wildcard in ["0.0.0.0", "::", "::ffff:0.0.0.0"] {
            let host: IpAddr = wildcard.parse().unwrap();
            assert_eq!(
                check_endpoint_host(host),
                Err(ExposureError::WildcardEndpointHost(host))
            );
        }
        for concrete in ["127.0.0.1", "10.77.0.2", "::1", "2001:db8::1"] {
            assert_eq!(check_endpoint_host(concrete.parse().unwrap()), Ok(()));
        }
    }
}
