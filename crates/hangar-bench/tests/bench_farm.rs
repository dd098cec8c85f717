//! `hangar bench farm` in a short run: a real PostgreSQL and a real control plane with
//! simulated hosts, then one warm-pool grant from the server's own host and one from a
//! real agent's (real guests); every figure is reported, the placements are all answered,
//! and nothing it started is left. The figures themselves mean nothing here.

// Not every helper of the shared test support is used here.
#[allow(dead_code)]
mod common;

use std::process::Command;

#[test]
fn bench_farm_reports_every_figure_and_leaves_no_server_behind() {
    let report = common::json_of(
        Command::new(common::hangar())
            .args(["bench", "farm", "--duration", "1s", "--clients", "2"])
            .args([
                "--vms",
                "30",
                "--heartbeats",
                "200",
                "--heartbeat-hosts",
                "10",
            ])
            .args(["--pure-hosts", "100", "--grants", "1", "--pool", "1"])
            .args(["--accel", "tcg", "--json", "--cache"])
            .arg(common::shared_cache()),
        "hangar bench farm",
    );

    let placements = &report["placements"];
    assert_eq!(placements["errors"], 0, "{report:#}");
    assert_eq!(placements["vms"], 30);
    assert!(placements["per_s"].as_f64().unwrap() > 0.0, "{report:#}");
    let chosen: u64 = placements["chosen"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(host, n)| {
            assert!(host.starts_with("sim-"), "placed on {host}");
            n.as_u64().unwrap()
        })
        .sum();
    assert_eq!(Some(chosen), placements["decisions"].as_u64());

    let heartbeats = &report["heartbeats"];
    assert_eq!(heartbeats["heartbeats"], 200);
    let per = heartbeats["server_cpu_ms_per_heartbeat"].as_f64().unwrap();
    assert!(per >= 0.0, "{report:#}");
    assert_eq!(
        heartbeats["thousand_hosts_server_core_share"].as_f64(),
        Some(per),
        "1,000 heartbeats a second of `per` ms each is `per` seconds per second"
    );
    assert_eq!(report["pure_placement"]["hosts"], 100);
    let grants = &report["remote_grants"];
    assert_eq!(grants["local"]["n"], 1, "{report:#}");
    assert_eq!(grants["remote"]["n"], 1, "{report:#}");
    assert!(report["remote_grants_skipped"].is_null());
    let measures: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["measure"].as_str().unwrap())
        .collect();
    for start in [
        "placements/s",
        "heartbeat: server CPU",
        "1,000 hosts",
        "pure placement",
    ] {
        assert!(
            measures.iter().any(|m| m.starts_with(start)),
            "no row {start:?}: {measures:?}"
        );
    }

    let server = report["server_pid"].as_u64().unwrap();
    assert!(
        !std::path::Path::new(&format!("/proc/{server}")).exists(),
        "the benchmark's server {server} still runs"
    );
    // The grant comparison's server, agent and guests ran in data dirs named so.
    for dir in ["/tmp/hgbench", "/tmp/hgagent"] {
        let left = common::processes_mentioning(dir);
        assert!(left.is_empty(), "processes left in {dir}*: {left:?}");
    }
}
