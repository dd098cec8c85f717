//! `hangar bench` in smoke mode (one or two samples of everything): every figure of the
//! table is there, libvirt's included when libvirt is installed (scripts/install-deps.sh
//! installs it), the report files are written, and nothing the run made is left behind.
//! The figures themselves mean nothing here.

mod common;

use std::path::Path;
use std::process::Command;

fn libvirt_installed() -> bool {
    Path::new("/usr/sbin/libvirtd").exists()
        && Command::new("virsh")
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
}

#[test]
fn bench_smoke_reports_every_figure_and_leaves_nothing_behind() {
    let out = tempfile::tempdir().unwrap();
    let with_libvirt = libvirt_installed();
    // As documented: `hangar bench` runs the hangar-bench built beside it.
    let mut command = Command::new(common::hangar());
    command
        .args(["bench", "--quick", "--json", "--accel", "tcg", "--out"])
        .arg(out.path())
        .arg("--cache")
        .arg(common::shared_cache())
        .env("HANGAR_BENCH_SMOKE", "1");
    if !with_libvirt {
        eprintln!("libvirt is not installed: measuring hangar alone");
        command.arg("--no-libvirt");
    }
    let report = common::json_of(&mut command, "hangar bench");
    assert_eq!(report["mode"], "smoke");

    let rows = report["rows"].as_array().unwrap();
    let row = |start: &str| {
        rows.iter()
            .find(|r| r["metric"].as_str().unwrap().starts_with(start))
            .unwrap_or_else(|| panic!("no row {start:?} in {rows:#?}"))
    };
    let positive = |v: &serde_json::Value| v.as_f64().is_some_and(|v| v > 0.0);
    for metric in [
        "cold boot → answering, p50",
        "restore from template → answering, p50",
        "warm-pool grant → answering (pool of clones), p99",
        "wake from sleeping → answering, p50",
        "archive an active VM, raw tier",
        "wake from archive, raw tier → answering, p50",
        "wake from archive, zstd tier → answering, p50",
        "archive size, zstd tier",
        "wake from archive, delta tier → answering, p50",
        "host memory per paused pool VM (a clone), RSS",
        "host memory per paused pool VM (a clone), PSS",
        "host memory per sleeping clone, PSS",
        "paused pool VMs per GiB of host memory",
        "sustained dedicated grants per second",
        "shared-mode requests per second",
        "placement decisions per second, 1,000 simulated hosts",
    ] {
        assert!(
            positive(&row(metric)["hangar"]),
            "{metric}: {:#}",
            row(metric)
        );
    }
    if with_libvirt {
        for metric in [
            "cold boot → answering, p50",
            "wake from sleeping → answering, p50",
            "archive an active VM, raw tier",
            "wake from archive, raw tier → answering, p50",
            "restore from template → answering, p50",
            "wake from archive, delta tier → answering, p50",
            "warm-pool grant → answering (pool of clones), p50",
            "host memory per paused pool VM (a clone), PSS",
            "host memory per sleeping clone, RSS",
            "paused pool VMs per GiB of host memory",
        ] {
            let row = row(metric);
            assert!(
                positive(&row["libvirt"]) && positive(&row["ratio"]),
                "{metric}: {row:#}"
            );
        }
    }

    let png = std::fs::read(out.path().join("latency.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "latency.png is a PNG");
    for log in ["server.log", "server-templates.log"] {
        assert!(out.path().join(log).exists(), "the servers' logs are kept");
    }
    let md = std::fs::read_to_string(out.path().join("bench.md")).unwrap();
    assert!(
        md.contains("| metric | hangar | libvirt | libvirt ÷ hangar |"),
        "{md}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("bench.json")).unwrap())
            .unwrap();
    assert_eq!(json["rows"], report["rows"]);

    // Nothing left: the server's data dir and VMs, libvirt's domains, files and daemons.
    let details = &report["details"];
    for server in ["server_data_dir", "templates_server_data_dir"] {
        let data_dir = details[server].as_str().unwrap();
        assert!(!Path::new(data_dir).exists(), "{data_dir} was removed");
        assert_eq!(common::processes_mentioning(data_dir), Vec::<u32>::new());
    }
    if with_libvirt {
        let dir = details["libvirt_dir"].as_str().unwrap();
        assert!(!Path::new(dir).exists(), "{dir} was removed");
        assert_eq!(common::processes_mentioning(dir), Vec::<u32>::new());
        let prefix = details["libvirt_domain_prefix"].as_str().unwrap();
        let notes = report["notes"].to_string();
        if notes.contains("for this run") {
            // The daemons were started for the run and are stopped again.
            assert!(
                !common::socket_answers("/run/libvirt/libvirt-sock"),
                "libvirtd was stopped: {notes}"
            );
        } else {
            let listed = Command::new("virsh")
                .args(["-c", "qemu:///system", "list", "--all", "--name"])
                .output()
                .unwrap();
            let names = String::from_utf8_lossy(&listed.stdout);
            assert!(!names.contains(prefix), "domains left: {names}");
        }
    }
}

/// `hangar bench placement` reaches the pure placement benchmark (no server, no guests):
/// its JSON has the median decisions per second of its rounds, its table the same figure.
#[test]
fn bench_placement_reports_decisions_per_second() {
    let args = ["bench", "placement", "--hosts", "200", "--rounds", "3"];
    let report = common::json_of(
        Command::new(common::hangar())
            .args(args)
            .args(["--round", "50ms", "--json"]),
        "hangar bench placement",
    );
    assert_eq!(
        (report["hosts"].as_u64(), report["rounds"].as_u64()),
        (Some(200), Some(3))
    );
    let rounds: Vec<f64> = report["round_per_s"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_f64().unwrap())
        .collect();
    let per_s = report["per_s"].as_f64().unwrap();
    assert!(per_s > 0.0 && rounds.contains(&per_s), "{report:#}");

    let output = Command::new(common::hangar())
        .args(args)
        .args(["--round", "20ms"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        table.contains("decisions/s (median of 3)") && table.contains("| 200 |"),
        "{table}"
    );
}
