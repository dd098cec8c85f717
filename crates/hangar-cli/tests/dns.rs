//! The DNS server (`hangar server --dns-listen`), asked with `dig` like any client would:
//! the name in a request's answer resolves to its stable endpoint's address.

mod common;

use common::{TestServer, dig, dns_status as status, free_port};

const DOMAIN: &str = "vms.test";

#[test]
fn names_in_answers_resolve_to_their_endpoints_and_others_do_not() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = TestServer::start_with(&[
        "--pool-memory",
        "0",
        "--dns-domain",
        DOMAIN,
        "--dns-listen",
        &listen,
    ]);
    let grant = server.json(&["request", "http-static"]);
    let name = grant["dns_name"].as_str().unwrap().to_owned();
    let endpoint: std::net::SocketAddr = grant["endpoint"].as_str().unwrap().parse().unwrap();
    assert_eq!(name, format!("{}.{DOMAIN}", grant["vm"].as_str().unwrap()));

    // The VM's name: its stable endpoint's address, authoritatively, over UDP and TCP.
    let full = dig(port, &[&name, "A"]);
    assert_eq!(status(&full), "NOERROR", "{full}");
    assert!(full.contains(" aa"), "not authoritative: {full}");
    assert_eq!(
        dig(port, &["+short", &name, "A"]).trim(),
        endpoint.ip().to_string()
    );
    assert_eq!(
        dig(port, &["+short", "+tcp", &name.to_uppercase(), "A"]).trim(),
        endpoint.ip().to_string()
    );
    // Its port, as SRV.
    let srv = dig(port, &["+short", &format!("_http._tcp.{name}"), "SRV"]);
    assert_eq!(srv.trim(), format!("0 0 {} {name}.", endpoint.port()));
    // The shared service's name.
    assert_eq!(
        dig(port, &["+short", &format!("http-static.{DOMAIN}"), "A"]).trim(),
        endpoint.ip().to_string()
    );
    // No AAAA for an IPv4 endpoint: the name exists, with no such record.
    let aaaa = dig(port, &[&name, "AAAA"]);
    assert_eq!(status(&aaaa), "NOERROR", "{aaaa}");
    assert!(aaaa.contains("ANSWER: 0"), "{aaaa}");

    // Unknown names in the domain do not exist; names outside it are refused.
    let unknown = dig(port, &[&format!("vm-nope.{DOMAIN}"), "A"]);
    assert_eq!(status(&unknown), "NXDOMAIN", "{unknown}");
    assert!(
        unknown.contains("SOA"),
        "negative answers carry the SOA: {unknown}"
    );
    let outside = dig(port, &["example.com", "A"]);
    assert_eq!(status(&outside), "REFUSED", "{outside}");

    // A deleted VM's name is gone.
    server.ok(&["rm", grant["vm"].as_str().unwrap()]);
    // Within the zone's age (dns::ZONE_MAX_AGE, 500 ms).
    std::thread::sleep(std::time::Duration::from_millis(600));
    let gone = dig(port, &[&name, "A"]);
    assert_eq!(status(&gone), "NXDOMAIN", "{gone}");
}

#[test]
fn dns_listen_without_a_domain_is_refused_at_start() {
    let output = std::process::Command::new(common::HANGAR)
        .args(["server", "--dns-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--dns-domain"), "{stderr}");
}
