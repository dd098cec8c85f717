//! The conformance suite, continued: leases (which of several replicas leads) and host
//! states.

use futures::future::join_all;

use crate::*;

fn lease(name: &str, holder: &str, expires_ms: u64) -> Option<LeaseRecord> {
    Some(LeaseRecord {
        name: name.into(),
        holder: holder.into(),
        expires_ms,
    })
}

pub(super) async fn a_lease_is_taken_renewed_refused_and_taken_over(store: &dyn Store) {
    assert_eq!(store.lease("leader").await.unwrap(), None);
    assert!(
        store
            .acquire_lease("leader", "a", 1000, 10_000)
            .await
            .unwrap()
    );
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "a", 11_000)
    );
    // Held: refused to another holder, and left as it was.
    assert!(
        !store
            .acquire_lease("leader", "b", 1000, 10_500)
            .await
            .unwrap()
    );
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "a", 11_000)
    );
    // Renewed by its holder, before or after it ran out.
    assert!(
        store
            .acquire_lease("leader", "a", 1000, 10_900)
            .await
            .unwrap()
    );
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "a", 11_900)
    );
    // Another holder takes it over from the instant it runs out, not before.
    assert!(
        !store
            .acquire_lease("leader", "b", 5000, 11_899)
            .await
            .unwrap()
    );
    assert!(
        store
            .acquire_lease("leader", "b", 5000, 11_900)
            .await
            .unwrap()
    );
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "b", 16_900)
    );
    assert!(
        !store
            .acquire_lease("leader", "a", 1000, 12_000)
            .await
            .unwrap()
    );
    // Leases are independent by name.
    assert!(store.acquire_lease("other", "a", 10, 12_000).await.unwrap());
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "b", 16_900)
    );
    // A huge time to live does not overflow.
    assert!(
        store
            .acquire_lease("other", "a", u64::MAX, 12_000)
            .await
            .unwrap()
    );
    let forever = store.lease("other").await.unwrap().unwrap().expires_ms;
    assert_eq!(forever, u64::try_from(i64::MAX).unwrap());
}

pub(super) async fn a_lease_is_released_only_by_its_holder(store: &dyn Store) {
    assert!(
        !store.release_lease("leader", "a").await.unwrap(),
        "never taken"
    );
    assert!(
        store
            .acquire_lease("leader", "a", 1000, 10_000)
            .await
            .unwrap()
    );
    assert!(!store.release_lease("leader", "b").await.unwrap());
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "a", 11_000)
    );
    assert!(store.release_lease("leader", "a").await.unwrap());
    assert_eq!(store.lease("leader").await.unwrap(), None);
    assert!(
        !store.release_lease("leader", "a").await.unwrap(),
        "released"
    );
    // Free at once, long before the released lease would have run out.
    assert!(
        store
            .acquire_lease("leader", "b", 1000, 10_001)
            .await
            .unwrap()
    );
    assert_eq!(
        store.lease("leader").await.unwrap(),
        lease("leader", "b", 11_001)
    );
}

/// Eight replicas race for the free lease, then again for it once it has run out: each
/// time exactly one takes it, and the stored lease is the winner's.
pub(super) async fn concurrent_acquires_have_one_winner(store: &dyn Store) {
    for now in [10_000, 20_000] {
        let holders: Vec<String> = (0..8).map(|i| format!("replica-{now}-{i}")).collect();
        let results = join_all(
            holders
                .iter()
                .map(|holder| store.acquire_lease("leader", holder, 5000, now)),
        )
        .await;
        let winners: Vec<&String> = holders
            .iter()
            .zip(results)
            .filter_map(|(holder, result)| result.unwrap().then_some(holder))
            .collect();
        assert_eq!(winners.len(), 1, "exactly one takes the lease: {winners:?}");
        assert_eq!(
            store.lease("leader").await.unwrap(),
            lease("leader", winners[0], now + 5000)
        );
    }
}

pub(super) async fn every_host_state_round_trips(store: &dyn Store) {
    for (i, state) in [
        HostState::Up,
        HostState::Draining,
        HostState::Down,
        HostState::Lost,
    ]
    .into_iter()
    .enumerate()
    {
        let host = HostRecord {
            name: format!("host-{i}"),
            address: "10.0.0.2:7000".into(),
            state,
            facts: serde_json::json!({}),
            last_heartbeat_ms: 5,
        };
        store.upsert_host(&host).await.unwrap();
        assert_eq!(store.host(&host.name).await.unwrap().unwrap(), host);
    }
    let facts = serde_json::json!({"vcpus": 2});
    store
        .heartbeat("host-0", HostState::Lost, &facts, 9)
        .await
        .unwrap();
    let lost = store.host("host-0").await.unwrap().unwrap();
    assert_eq!((lost.state, lost.last_heartbeat_ms), (HostState::Lost, 9));
    let states: Vec<HostState> = store
        .hosts()
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.state)
        .collect();
    assert_eq!(
        states,
        [
            HostState::Lost,
            HostState::Draining,
            HostState::Down,
            HostState::Lost
        ]
    );
}
