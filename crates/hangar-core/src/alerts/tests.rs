use std::time::Duration;

use proptest::prelude::*;

use super::*;

const KEY: &str = "host_down/host1";
const KEEP: Duration = Duration::from_secs(3600);

fn seen() -> Observation {
    Observation {
        key: KEY.into(),
        kind: AlertKind::HostDown,
        labels: BTreeMap::from([("host".into(), "host1".into())]),
        summary: "host host1 is down".into(),
    }
}

fn timing(for_s: u64, hold_s: u64) -> impl Fn(AlertKind) -> Timing + Copy {
    move |_| Timing {
        for_: Duration::from_secs(for_s),
        hold: Duration::from_secs(hold_s),
    }
}

/// Feeds `trues` (one look per second from t = 1 s) through [`evaluate`]; returns each
/// transition with the second it happened and the alerts left at the end.
fn run(
    trues: &[bool],
    rule: impl Fn(AlertKind) -> Timing + Copy,
) -> (Vec<(u64, Transition)>, Vec<Alert>) {
    let mut alerts = Vec::new();
    let mut transitions = Vec::new();
    for (i, &on) in trues.iter().enumerate() {
        let now = (i as u64 + 1) * 1000;
        let observed: Vec<Observation> = if on { vec![seen()] } else { Vec::new() };
        let step = evaluate(&alerts, &observed, rule, now, KEEP);
        transitions.extend(step.transitions.iter().map(|(t, _)| (now / 1000, *t)));
        alerts = apply(&alerts, &step);
    }
    (transitions, alerts)
}

fn pattern(text: &str) -> Vec<bool> {
    text.chars().map(|c| c == '#').collect()
}

/// Observations (`#` true, `.` false), `for` s, `hold` s, transitions (second, which).
type Case = (&'static str, u64, u64, &'static [(u64, Transition)]);

#[test]
fn table_of_episodes() {
    use Transition::{Fired, Resolved};
    // (observations, for s, hold s, transitions (second, which))
    let cases: &[Case] = &[
        // Fires at once with no `for`, resolves after `hold` of falses.
        ("##.....", 0, 3, &[(1, Fired), (6, Resolved)]),
        // Pending for `for`; a blip shorter than `for` never fires.
        ("##..####", 2, 1, &[(7, Fired)]),
        ("#.#.#.#.", 2, 1, &[]),
        // Toggling faster than `hold` after firing: fires once, never resolves.
        ("#.#.#.#.#.#", 0, 3, &[(1, Fired)]),
        ("##..##..##..", 0, 3, &[(1, Fired)]),
        // And resolves once the falses last `hold`.
        ("#.#.#....", 0, 3, &[(1, Fired), (9, Resolved)]),
        // A resolved alert whose condition returns fires again (a new episode).
        ("#..#", 0, 1, &[(1, Fired), (3, Resolved), (4, Fired)]),
        // hold 0: resolves at the first false look.
        ("#.#", 0, 0, &[(1, Fired), (2, Resolved), (3, Fired)]),
    ];
    for (text, for_s, hold_s, want) in cases {
        let (got, _) = run(&pattern(text), timing(*for_s, *hold_s));
        assert_eq!(&got, want, "{text} for {for_s}s hold {hold_s}s");
    }
}

#[test]
fn a_firing_alert_records_when_it_began_fired_cleared_and_resolved() {
    let rule = timing(2, 2);
    let mut alerts = Vec::new();
    let at = |alerts: &mut Vec<Alert>, s: u64, on: bool| {
        let observed = if on { vec![seen()] } else { Vec::new() };
        let step = evaluate(alerts, &observed, rule, s * 1000, KEEP);
        *alerts = apply(alerts, &step);
        step
    };
    at(&mut alerts, 10, true);
    assert_eq!(alerts[0].phase, Phase::Pending);
    assert_eq!(alerts[0].active_since_ms, 10_000);
    let quiet = at(&mut alerts, 11, true);
    assert_eq!(quiet, Step::default(), "nothing to write while pending");
    at(&mut alerts, 12, true);
    assert_eq!(alerts[0].phase, Phase::Firing);
    assert_eq!(alerts[0].firing_since_ms, Some(12_000));
    at(&mut alerts, 13, false);
    assert_eq!(alerts[0].clear_since_ms, Some(13_000));
    at(&mut alerts, 15, false);
    assert_eq!(alerts[0].phase, Phase::Resolved);
    assert_eq!(alerts[0].resolved_at_ms, Some(15_000));
    assert_eq!(alerts[0].summary, "host host1 is down");
    // Kept for `keep_resolved`, then removed.
    let kept = evaluate(&alerts, &[], rule, 15_000 + 3_599_000, KEEP);
    assert!(kept.removed.is_empty());
    let gone = evaluate(&alerts, &[], rule, 15_000 + 3_600_000, KEEP);
    assert_eq!(gone.removed, vec![KEY.to_owned()]);
}

#[test]
fn a_restart_that_reads_a_firing_alert_back_does_not_fire_it_again() {
    let rule = timing(0, 5);
    let first = evaluate(&[], &[seen()], rule, 1000, KEEP);
    assert_eq!(first.transitions.len(), 1);
    let stored = apply(&[], &first);
    // Another leader, later, with the stored alerts and the condition still true.
    let again = evaluate(&stored, &[seen()], rule, 60_000, KEEP);
    assert_eq!(again, Step::default());
}

#[test]
fn several_keys_are_independent() {
    let other = Observation {
        key: "host_down/host2".into(),
        ..seen()
    };
    let step = evaluate(&[], &[seen(), other], timing(0, 1), 1000, KEEP);
    assert_eq!(step.transitions.len(), 2);
    let alerts = apply(&[], &step);
    let step = evaluate(&alerts, &[seen()], timing(0, 0), 2000, KEEP);
    assert_eq!(step.transitions.len(), 1);
    assert_eq!(step.transitions[0].1.key, "host_down/host2");
    assert_eq!(step.transitions[0].0, Transition::Resolved);
}

#[test]
fn the_default_configuration_has_every_rule_on() {
    let config = AlertConfig::default();
    for kind in AlertKind::ALL {
        assert!(config.rule(kind).enabled, "{kind:?}");
    }
    assert!(config.webhook.is_none());
}

#[test]
fn a_file_changes_only_what_it_names() {
    let config = AlertConfig::from_toml(
        r#"
        keep_resolved = "1h"
        [webhook]
        url = "http://10.0.0.1:9000/hook"
        attempts = 2
        [rules.host_down]
        hold = "2s"
        [rules.host_memory]
        above_percent = 75
        [rules.pool_empty]
        enabled = false
        "#,
    )
    .unwrap();
    assert_eq!(config.keep_resolved, Duration::from_secs(3600));
    let hook = config.webhook.clone().unwrap();
    assert_eq!(hook.url, "http://10.0.0.1:9000/hook");
    assert_eq!((hook.attempts, hook.timeout), (2, Duration::from_secs(5)));
    let down = config.rule(AlertKind::HostDown);
    assert_eq!(down.timing.hold, Duration::from_secs(2));
    assert_eq!(down.timing.for_, Duration::ZERO, "default kept");
    assert_eq!(config.rule(AlertKind::HostMemory).above_percent, Some(75.0));
    assert!(!config.rule(AlertKind::PoolEmpty).enabled);
    assert_eq!(
        config.rule(AlertKind::VmCrashing),
        &Rule::default_for(AlertKind::VmCrashing)
    );
}

#[test]
fn mistakes_in_a_file_are_refused_by_name() {
    for (text, says) in [
        (
            "[rules.host_dwn]\nhold = \"1s\"",
            "no alert rule named \"host_dwn\"",
        ),
        (
            "[rules.host_down]\nabove_percent = 5",
            "host_down: takes no above_percent",
        ),
        (
            "[rules.host_memory]\nabove_percent = 150",
            "not between 0 and 100",
        ),
        ("[rules.vm_crashing]\nfailures = 0", "1 or more"),
        ("[rules.host_down]\nhold = \"soon\"", "TOML"),
        ("[rules.host_down]\nholds = \"1s\"", "unknown field"),
        ("[webhook]\nurl = \"https://x/hook\"", "not an http:// URL"),
        ("[webhook]\nurl = \"http:///hook\"", "names no host"),
    ] {
        let err = AlertConfig::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(says), "{text}: {err}");
    }
}

proptest! {
    /// Whatever the observations: transitions alternate, starting with a fire; each fire
    /// comes after `for` of trues; each resolve after `hold` of falses; and once fired, an
    /// observation that is never false for `hold` never resolves.
    #[test]
    fn no_flapping(trues in proptest::collection::vec(any::<bool>(), 1..80), for_s in 0u64..5, hold_s in 0u64..5) {
        let (transitions, _) = run(&trues, timing(for_s, hold_s));
        for (i, (second, transition)) in transitions.iter().enumerate() {
            let want = if i % 2 == 0 { Transition::Fired } else { Transition::Resolved };
            prop_assert_eq!(*transition, want);
            let at = (*second - 1) as usize;
            match transition {
                Transition::Fired => {
                    let run_len = trues[..=at].iter().rev().take_while(|on| **on).count() as u64;
                    prop_assert!(run_len > for_s, "fired at {} after {} trues", second, run_len);
                }
                Transition::Resolved => {
                    let run_len = trues[..=at].iter().rev().take_while(|on| !**on).count() as u64;
                    prop_assert!(run_len > hold_s, "resolved at {} after {} falses", second, run_len);
                }
            }
        }
        // Fast toggling (no false run reaches `hold` + 1 looks) never resolves.
        let longest_false = trues.split(|on| *on).map(<[bool]>::len).max().unwrap_or(0) as u64;
        if longest_false <= hold_s {
            prop_assert!(transitions.iter().all(|(_, t)| *t == Transition::Fired));
            prop_assert!(transitions.len() <= 1);
        }
    }

    /// Every true run at least `for` + 1 looks long fires (or finds the alert firing).
    #[test]
    fn long_enough_conditions_always_fire(trues in proptest::collection::vec(any::<bool>(), 1..60), for_s in 0u64..4) {
        let (transitions, alerts) = run(&trues, timing(for_s, 0));
        let long_run = trues.split(|on| !*on).any(|run| run.len() as u64 > for_s);
        prop_assert_eq!(long_run, !transitions.is_empty());
        if trues.last() == Some(&true) && trues.iter().rev().take_while(|on| **on).count() as u64 > for_s {
            prop_assert_eq!(alerts[0].phase, Phase::Firing);
        }
    }
}
