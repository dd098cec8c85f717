//! `hangar bench migrate` in a short run: two real agents on this machine, a real
//! `http-counter` guest live-migrated twice under a client polling its stable endpoint,
//! then three VMs (active, sleeping, archived) evacuated: every figure is reported, no
//! request failed, the guest's counter went on, every VM moved, and nothing it started is
//! left. The figures themselves mean nothing here.

// Not every helper of the shared test support is used here.
#[allow(dead_code)]
mod common;

use std::process::Command;

#[test]
fn bench_migrate_reports_every_figure_and_leaves_nothing_behind() {
    let report = common::json_of(
        Command::new(common::hangar())
            .args(["bench", "migrate", "--migrations", "2", "--evacuate", "3"])
            .args(["--accel", "tcg", "--json", "--cache"])
            .arg(common::shared_cache()),
        "hangar bench migrate",
    );

    let migrations = report["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 2, "{report:#}");
    assert_eq!(
        (migrations[0]["from"].clone(), migrations[0]["to"].clone()),
        (migrations[1]["to"].clone(), migrations[1]["from"].clone()),
        "back and forth: {report:#}"
    );
    for migration in migrations {
        assert_eq!(migration["failed_requests"], 0, "{migration:#}");
        assert!(
            migration["requests"].as_u64().unwrap() > 10,
            "{migration:#}"
        );
        for figure in ["longest_gap_ms", "took_ms", "held_ms", "switchover_ms"] {
            assert!(
                migration[figure].as_f64().unwrap() > 0.0,
                "{figure}: {migration:#}"
            );
        }
    }
    assert_eq!(report["failed_requests"], 0);
    assert_eq!(report["counter_kept"], true, "{report:#}");
    for summary in ["longest_gap", "held", "switchover", "took"] {
        assert_eq!(report[summary]["n"], 2, "{summary}: {report:#}");
        assert!(report[summary]["max_ms"].as_f64().unwrap() > 0.0);
    }
    let evacuation = &report["evacuation"];
    assert_eq!(
        evacuation["states"],
        serde_json::json!(["active", "sleeping", "archived"])
    );
    assert_eq!(
        (evacuation["moved"].as_u64(), evacuation["failed"].as_u64()),
        (Some(3), Some(0)),
        "{evacuation:#}"
    );
    assert!(evacuation["took_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(evacuation["answered"]["n"], 3);

    // The server, the agents and their guests ran in data dirs named so.
    for dir in ["/tmp/hgbench", "/tmp/hgagent"] {
        let left = common::processes_mentioning(dir);
        assert!(left.is_empty(), "processes left in {dir}*: {left:?}");
    }
}
