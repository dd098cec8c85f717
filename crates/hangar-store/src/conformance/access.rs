//! The conformance suite, continued: users, API tokens, the audit log and idempotency keys.

use futures::future::join_all;
use hangar_core::Role;

use super::is_not_found;
use crate::*;

fn user(name: &str, role: Role) -> UserRecord {
    UserRecord {
        name: name.into(),
        role,
        created_at_ms: 5,
    }
}

fn token(id: &str, user: &str, created_at_ms: u64) -> TokenRecord {
    TokenRecord {
        id: id.into(),
        user: user.into(),
        role: Role::Provisioner,
        hash: format!("{:064x}", created_at_ms),
        created_at_ms,
        expires_at_ms: Some(u64::from(u32::MAX) * 1000),
        revoked_at_ms: None,
        last_used_at_ms: None,
    }
}

pub(super) async fn users_are_unique_and_listed_by_name(store: &dyn Store) {
    assert!(store.users().await.unwrap().is_empty());
    store.insert_user(&user("zoe", Role::Access)).await.unwrap();
    store
        .insert_user(&user("admin", Role::Admin))
        .await
        .unwrap();
    let err = store
        .insert_user(&user("zoe", Role::Admin))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict(Conflict::Exists {
                kind: Entity::User,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(
        store.users().await.unwrap(),
        [user("admin", Role::Admin), user("zoe", Role::Access)]
    );
    assert_eq!(
        store.user("zoe").await.unwrap(),
        Some(user("zoe", Role::Access))
    );
    assert_eq!(store.user("nobody").await.unwrap(), None);
}

pub(super) async fn tokens_are_kept_revoked_and_marked_used(store: &dyn Store) {
    store
        .insert_user(&user("ana", Role::Provisioner))
        .await
        .unwrap();
    store.insert_user(&user("bo", Role::Access)).await.unwrap();
    // A token needs its user.
    assert!(is_not_found(
        store.insert_token(&token("t-0", "nobody", 1)).await
    ));
    let first = token("t-1", "ana", 10);
    let mut second = token("t-2", "bo", 20);
    second.expires_at_ms = None;
    second.role = Role::Access;
    store.insert_token(&first).await.unwrap();
    store.insert_token(&second).await.unwrap();
    let err = store.insert_token(&first).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Conflict(Conflict::Exists {
                kind: Entity::Token,
                ..
            })
        ),
        "{err}"
    );
    assert_eq!(store.token("t-1").await.unwrap(), Some(first.clone()));
    assert_eq!(store.token("t-9").await.unwrap(), None);
    assert_eq!(
        store.tokens(None).await.unwrap(),
        [first.clone(), second.clone()]
    );
    assert_eq!(store.tokens(Some("bo")).await.unwrap(), [second.clone()]);
    assert!(store.tokens(Some("nobody")).await.unwrap().is_empty());

    // Last use only moves forward.
    store.token_used("t-1", 500).await.unwrap();
    store.token_used("t-1", 400).await.unwrap();
    assert_eq!(
        store.token("t-1").await.unwrap().unwrap().last_used_at_ms,
        Some(500)
    );
    assert!(is_not_found(store.token_used("t-9", 1).await));

    // Revoked once; revoking again keeps the first time.
    let revoked = store.revoke_token("t-1", 600).await.unwrap();
    assert_eq!(revoked.revoked_at_ms, Some(600));
    assert!(!revoked.usable_at(601));
    let again = store.revoke_token("t-1", 700).await.unwrap();
    assert_eq!(again.revoked_at_ms, Some(600));
    assert!(is_not_found(store.revoke_token("t-9", 1).await));
    assert!(second.usable_at(u64::MAX));
}

pub(super) async fn the_audit_log_keeps_order_and_reads_by_time(store: &dyn Store) {
    let entry = |at_ms: u64, route: &str, target: Option<&str>, status: u16| AuditRecord {
        seq: 0,
        at_ms,
        user: "ana".into(),
        method: "POST".into(),
        route: route.into(),
        target: target.map(Into::into),
        status,
    };
    let mut seqs = Vec::new();
    for (at, route, target, status) in [
        (100, "/v1/requests", Some("vm-1"), 200),
        (200, "/v1/vms/{id}/sleep", Some("vm-1"), 409),
        (300, "/v1/pools/{name}", None, 403),
    ] {
        seqs.push(
            store
                .insert_audit(&entry(at, route, target, status))
                .await
                .unwrap(),
        );
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let all = store.audit(0, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[0].seq, seqs[0]);
    assert_eq!(
        all[1],
        AuditRecord {
            seq: seqs[1],
            ..entry(200, "/v1/vms/{id}/sleep", Some("vm-1"), 409)
        }
    );
    assert_eq!(all[2].target, None);
    // Since a time; the latest `limit`, oldest first.
    let since = store.audit(200, 100).await.unwrap();
    assert_eq!(
        since.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        [200, 300]
    );
    let latest = store.audit(0, 2).await.unwrap();
    assert_eq!(
        latest.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        [200, 300]
    );
}

pub(super) async fn an_idempotency_key_is_claimed_once_answered_and_released(store: &dyn Store) {
    // New: the caller holds it; others see it running.
    assert_eq!(
        store
            .claim_idempotency_key("ana", "k1", "fp", 1000, 0)
            .await
            .unwrap(),
        None
    );
    let running = store
        .claim_idempotency_key("ana", "k1", "fp", 1001, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(running.answer, None);
    assert_eq!(running.fingerprint, "fp");
    assert_eq!(running.created_at_ms, 1000);
    // Keys are per user.
    assert_eq!(
        store
            .claim_idempotency_key("bo", "k1", "other", 1001, 0)
            .await
            .unwrap(),
        None
    );
    // Answered: later claims get the answer, stale or not.
    store
        .answer_idempotency_key("ana", "k1", 200, r#"{"vm":"vm-1"}"#)
        .await
        .unwrap();
    let done = store
        .claim_idempotency_key("ana", "k1", "fp", 5000, 4000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.answer, Some((200, r#"{"vm":"vm-1"}"#.into())));
    // Released (its call failed): the next claim holds it; an answered key is not released.
    store.release_idempotency_key("bo", "k1").await.unwrap();
    assert_eq!(
        store
            .claim_idempotency_key("bo", "k1", "fp2", 1002, 0)
            .await
            .unwrap(),
        None
    );
    store.release_idempotency_key("ana", "k1").await.unwrap();
    assert!(
        store
            .claim_idempotency_key("ana", "k1", "fp", 5000, 0)
            .await
            .unwrap()
            .is_some()
    );
    // Left unanswered past the stale mark: taken over.
    assert_eq!(
        store
            .claim_idempotency_key("bo", "k1", "fp3", 9000, 2000)
            .await
            .unwrap(),
        None
    );
    assert!(is_not_found(
        store.answer_idempotency_key("cy", "k1", 200, "{}").await
    ));
}

pub(super) async fn concurrent_claims_of_a_key_have_one_holder(store: &dyn Store) {
    let claims =
        join_all((0..8).map(|_| store.claim_idempotency_key("ana", "race", "fp", 1000, 0))).await;
    let holders = claims
        .into_iter()
        .map(Result::unwrap)
        .filter(Option::is_none)
        .count();
    assert_eq!(holders, 1);
}
