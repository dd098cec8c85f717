//! The conformance suite, continued: alerts kept, replaced and removed by key.

use std::collections::BTreeMap;

use hangar_core::alerts::{AlertKind, Phase};

use crate::*;

fn alert(key: &str, kind: AlertKind, phase: Phase) -> Alert {
    Alert {
        key: key.into(),
        kind,
        labels: BTreeMap::from([
            ("host".into(), "host1".into()),
            ("state".into(), "lost".into()),
        ]),
        summary: "host host1 is lost: no heartbeat for 6s".into(),
        phase,
        active_since_ms: 1_000,
        firing_since_ms: None,
        clear_since_ms: None,
        resolved_at_ms: None,
    }
}

pub(super) async fn alerts_are_kept_replaced_and_removed(store: &dyn Store) {
    assert!(store.alerts().await.unwrap().is_empty());
    let pending = alert("host_down/host1", AlertKind::HostDown, Phase::Pending);
    store.put_alert(&pending).await.unwrap();
    assert_eq!(store.alerts().await.unwrap(), vec![pending.clone()]);
    // Replaced by key: firing, then clearing, then resolved (every time kept).
    let firing = Alert {
        phase: Phase::Firing,
        firing_since_ms: Some(2_000),
        clear_since_ms: Some(3_000),
        ..pending.clone()
    };
    store.put_alert(&firing).await.unwrap();
    assert_eq!(store.alerts().await.unwrap(), vec![firing.clone()]);
    let resolved = Alert {
        phase: Phase::Resolved,
        resolved_at_ms: Some(u64::try_from(i64::MAX).unwrap()),
        labels: BTreeMap::new(),
        ..firing
    };
    store.put_alert(&resolved).await.unwrap();
    assert_eq!(store.alerts().await.unwrap(), vec![resolved.clone()]);
    // Every kind round-trips; listed by key.
    for kind in AlertKind::ALL.into_iter().rev() {
        store
            .put_alert(&alert(&kind.key("x"), kind, Phase::Firing))
            .await
            .unwrap();
    }
    let keys: Vec<String> = store
        .alerts()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.key)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
    assert_eq!(keys.len(), AlertKind::ALL.len() + 1);
    assert!(store.remove_alert("host_down/host1").await.unwrap());
    assert!(!store.remove_alert("host_down/host1").await.unwrap());
    assert!(
        store
            .alerts()
            .await
            .unwrap()
            .iter()
            .all(|a| a.key != "host_down/host1")
    );
}
