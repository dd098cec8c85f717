//! The conformance suite, continued: stacks kept, updated and removed; names and segments
//! unique.

use std::collections::BTreeMap;

use hangar_core::stack::StackState;

use crate::*;

fn stack(name: &str, segment: &str) -> StackRecord {
    StackRecord {
        name: name.into(),
        owner: "alice".into(),
        spec: serde_json::json!({ "name": name, "member": { "a": { "service": "redis" } } }),
        segment: segment.into(),
        state: StackState::Creating,
        members: BTreeMap::new(),
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
    }
}

pub(super) async fn stacks_are_unique_kept_updated_and_removed(store: &dyn Store) {
    assert!(store.stacks().await.unwrap().is_empty());
    assert!(store.stack("shop").await.unwrap().is_none());
    let shop = stack("shop", "10.213.0.0/24");
    store.insert_stack(&shop).await.unwrap();
    assert_eq!(store.stack("shop").await.unwrap(), Some(shop.clone()));
    // The name and the segment are each taken once.
    let err = store
        .insert_stack(&stack("shop", "10.213.1.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let err = store
        .insert_stack(&stack("other", "10.213.0.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    store
        .insert_stack(&stack("blog", "10.213.1.0/24"))
        .await
        .unwrap();
    // Updated: state, members, time; the rest stays.
    for state in StackState::ALL {
        let updated = StackRecord {
            state,
            members: BTreeMap::from([("a".into(), "vm-1".into()), ("b".into(), "vm-2".into())]),
            updated_at_ms: u64::try_from(i64::MAX).unwrap(),
            owner: "mallory".into(),
            ..shop.clone()
        };
        store.update_stack(&updated).await.unwrap();
        let read = store.stack("shop").await.unwrap().unwrap();
        assert_eq!(read.state, state);
        assert_eq!(read.members, updated.members);
        assert_eq!(read.updated_at_ms, updated.updated_at_ms);
        assert_eq!(read.owner, "alice");
    }
    let err = store
        .update_stack(&stack("nope", "10.213.9.0/24"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    let names: Vec<String> = store
        .stacks()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["blog", "shop"]);
    // Removed: its name and segment are free again.
    assert!(store.remove_stack("shop").await.unwrap());
    assert!(!store.remove_stack("shop").await.unwrap());
    store
        .insert_stack(&stack("other", "10.213.0.0/24"))
        .await
        .unwrap();
}
