//! The conformance suite, continued: quotas, what each owner's VMs take, and the usage
//! records of state changes.

use std::collections::BTreeMap;

use hangar_core::{Mode, VmState};

use super::{pooled, vm};
use crate::*;

pub(super) async fn quotas_are_set_replaced_and_removed(store: &dyn Store) {
    assert!(store.quotas().await.unwrap().is_empty());
    let ann = Limits {
        vms: Some(3),
        vcpus: None,
        memory_mib: Some(1024),
        archive_bytes: Some(5 << 30),
    };
    store.set_quota("ann", Some(&ann)).await.unwrap();
    store
        .set_quota("bob", Some(&Limits::UNLIMITED))
        .await
        .unwrap();
    assert_eq!(
        store.quotas().await.unwrap(),
        [
            ("ann".to_string(), ann),
            ("bob".to_string(), Limits::UNLIMITED)
        ]
    );
    let lower = Limits {
        vms: Some(0),
        ..Limits::UNLIMITED
    };
    store.set_quota("ann", Some(&lower)).await.unwrap();
    store.set_quota("bob", None).await.unwrap();
    store.set_quota("nobody", None).await.unwrap();
    assert_eq!(store.quotas().await.unwrap(), [("ann".to_string(), lower)]);
}

pub(super) async fn use_by_owner_counts_what_quotas_count(store: &dyn Store) {
    let owned = |id: &str, owner: &str, state: VmState| VmRecord {
        owner: owner.into(),
        vcpus: 2,
        memory_mib: 256,
        ..vm(id, "web", Mode::Dedicated, state)
    };
    for record in [
        owned("a-active", "ann", VmState::Active),
        owned("a-creating", "ann", VmState::Creating),
        owned("a-sleeping", "ann", VmState::Sleeping),
        owned("a-archived", "ann", VmState::Archived),
        owned("a-deleted", "ann", VmState::Deleted),
        owned("a-failed", "ann", VmState::Failed),
        owned("b-active", "bob", VmState::Active),
        // A warm pool's VM is nobody's yet.
        VmRecord {
            owner: "ann".into(),
            ..pooled("a-pooled")
        },
    ] {
        store.insert_vm(&record).await.unwrap();
    }
    store
        .put_archive(&ArchiveRecord {
            vm_id: "a-archived".into(),
            tier: "zstd".into(),
            size_bytes: 5_000_000,
            host: "local".into(),
            created_at_ms: 1,
        })
        .await
        .unwrap();
    let ann = Usage {
        vms: 4,
        vcpus: 6,
        memory_mib: 768,
        archive_bytes: 5_000_000,
    };
    let bob = Usage {
        vms: 1,
        vcpus: 2,
        memory_mib: 256,
        archive_bytes: 0,
    };
    assert_eq!(
        store.use_by_owner(None).await.unwrap(),
        [("ann".to_string(), ann), ("bob".to_string(), bob)]
    );
    assert_eq!(
        store.use_by_owner(Some("bob")).await.unwrap(),
        [("bob".to_string(), bob)]
    );
    assert!(store.use_by_owner(Some("carol")).await.unwrap().is_empty());
    // Claimed out of its pool, the VM counts.
    store
        .claim("a-pooled", Mode::Dedicated, &BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(
        store.use_by_owner(Some("ann")).await.unwrap()[0].1,
        ann.plus(Usage::vm(1, 128))
    );
}

pub(super) async fn every_state_change_is_recorded_for_usage(store: &dyn Store) {
    let record = VmRecord {
        state_since_ms: 1000,
        created_at_ms: 1000,
        ..vm("vm-u", "web", Mode::Dedicated, VmState::Creating)
    };
    store.insert_vm(&record).await.unwrap();
    let booting = store
        .transition("vm-u", VmState::Booting, None)
        .await
        .unwrap();
    let active = store
        .transition("vm-u", VmState::Active, None)
        .await
        .unwrap();
    // Not a change of anything metered: no record.
    store.touch("vm-u").await.unwrap();
    store.set_owner("vm-u", "ann").await.unwrap();
    let sleeping = store
        .transition("vm-u", VmState::Sleeping, None)
        .await
        .unwrap();
    store
        .put_archive(&ArchiveRecord {
            vm_id: "vm-u".into(),
            tier: "zstd".into(),
            size_bytes: 7_000_000,
            host: "local".into(),
            created_at_ms: 1,
        })
        .await
        .unwrap();
    let archived = store
        .transition("vm-u", VmState::Archived, None)
        .await
        .unwrap();
    store.insert_vm(&pooled("vm-p")).await.unwrap();
    let claimed = store
        .claim("vm-p", Mode::Dedicated, &BTreeMap::new())
        .await
        .unwrap();

    let events = store.usage_events(0).await.unwrap();
    let seen: Vec<(&str, VmState, &str)> = events
        .iter()
        .map(|e| (e.vm_id.as_str(), e.state, e.owner.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("vm-p", VmState::Ready, "anonymous"),
            ("vm-p", VmState::Active, "anonymous"),
            ("vm-u", VmState::Creating, "anonymous"),
            ("vm-u", VmState::Booting, "anonymous"),
            ("vm-u", VmState::Active, "anonymous"),
            ("vm-u", VmState::Active, "ann"),
            ("vm-u", VmState::Sleeping, "ann"),
            ("vm-u", VmState::Archived, "ann"),
        ]
    );
    let u: Vec<&UsageEvent> = events.iter().filter(|e| e.vm_id == "vm-u").collect();
    assert_eq!(u[0].at_ms, 1000);
    assert_eq!(u[1].at_ms, booting.state_since_ms);
    assert_eq!(u[2].at_ms, active.state_since_ms);
    // Stamped by the database's clock (no state change): the same clock, to the ms.
    assert!(
        u[3].at_ms + 5 >= active.state_since_ms && u[3].at_ms <= sleeping.state_since_ms + 5,
        "{} in {}..{}",
        u[3].at_ms,
        active.state_since_ms,
        sleeping.state_since_ms
    );
    assert_eq!(u[4].at_ms, sleeping.state_since_ms);
    assert_eq!(u[5].at_ms, archived.state_since_ms);
    assert_eq!(
        (u[5].archive_bytes, u[4].archive_bytes),
        (7_000_000, 0),
        "an archived record carries its archive's size"
    );
    assert_eq!(
        (
            u[0].services.as_str(),
            u[0].host.as_str(),
            u[0].vcpus,
            u[0].memory_mib
        ),
        ("web", "local", 1, 128)
    );
    let claimed_at = events
        .iter()
        .find(|e| e.vm_id == "vm-p" && e.state == VmState::Active)
        .unwrap()
        .at_ms;
    assert_eq!(claimed_at, claimed.state_since_ms);

    // A VM deleted before the window is left out; one deleted within it is not.
    let deleted = store
        .transition("vm-p", VmState::Deleted, None)
        .await
        .unwrap();
    let later = store
        .usage_events(deleted.state_since_ms + 1)
        .await
        .unwrap();
    assert!(later.iter().all(|e| e.vm_id == "vm-u"), "{later:?}");
    let within = store.usage_events(deleted.state_since_ms).await.unwrap();
    assert!(
        within
            .iter()
            .any(|e| e.vm_id == "vm-p" && e.state == VmState::Deleted)
    );
}
