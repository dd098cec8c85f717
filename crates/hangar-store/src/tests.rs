//! Backend-specific tests: opening, migrating and refusing newer schemas. What every
//! backend must do alike is in `conformance.rs`.

use std::collections::BTreeMap;

use hangar_core::{Mode, VmState};
use rusqlite::Connection;

use crate::conformance::vm;
use crate::*;

#[tokio::test]
async fn reopening_a_sqlite_file_keeps_data_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    {
        let store = open(path.to_str().unwrap()).await.unwrap();
        store
            .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
            .await
            .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.vms(false).await.unwrap().len(), 1);
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(store);
    let err = SqliteStore::open(&path)
        .err()
        .expect("a newer schema is refused");
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, .. }));
    assert!(err.to_string().contains("newer than this hangar"), "{err}");
}

#[tokio::test]
async fn vms_made_before_stable_endpoints_keep_their_direct_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    {
        // The schema as it was before stable endpoints (migrations 1-3), with one VM.
        let conn = Connection::open(&path).unwrap();
        for sql in &sqlite::schema::MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO vms (id, host, services, env, mode, owner, state, endpoints, spec,
                              created_at_ms, updated_at_ms, last_used_at_ms, memory_mib, vcpus)
             VALUES ('vm-old', 'local', '[\"web\"]', '{}', 'shared', 'local', 'active',
                     '{\"http\":\"127.0.0.1:4000\"}', '{}', 1, 1, 1, 128, 1)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    let old = store.vm("vm-old").await.unwrap().unwrap();
    assert_eq!(old.endpoints["http"], "127.0.0.1:4000");
    assert_eq!(old.direct_endpoints, old.endpoints);
    // The newer tables came with the migration.
    assert!(store.hosts().await.unwrap().is_empty());

    let direct = BTreeMap::from([("http".to_owned(), "127.0.0.1:5001".to_owned())]);
    let stable = BTreeMap::from([("http".to_owned(), "127.0.0.1:5000".to_owned())]);
    let os = ("busybox".to_owned(), "1.35".to_owned());
    store
        .set_offer("vm-old", &["web".into()], &os, &stable, &direct)
        .await
        .unwrap();
    let vm = store.vm("vm-old").await.unwrap().unwrap();
    assert_eq!((vm.endpoints, vm.direct_endpoints), (stable, direct));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_servers_starting_at_once_migrate_once() {
    let db = hangar_test_postgres::TestDatabase::create();
    let opens = futures::future::join_all((0..4).map(|_| PgStore::connect(db.url()))).await;
    let stores: Vec<PgStore> = opens.into_iter().map(Result::unwrap).collect();
    stores[0]
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
        .await
        .unwrap();
    assert_eq!(stores[3].vms(false).await.unwrap().len(), 1, "one database");
    // Reopening through `open` finds the schema current and keeps the data.
    assert!(is_postgres_url(db.url()));
    let reopened = open(db.url()).await.unwrap();
    assert_eq!(reopened.vms(false).await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_refuses_a_newer_schema() {
    let db = hangar_test_postgres::TestDatabase::create();
    drop(PgStore::connect(db.url()).await.unwrap());
    let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (99, 0)",
            &[],
        )
        .await
        .unwrap();
    let err = PgStore::connect(db.url()).await.err().expect("refused");
    assert!(
        matches!(err, StoreError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_postgres_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://postgres@127.0.0.1:{port}/nothing");
    let err = PgStore::connect(&url).await.err().expect("nothing listens");
    assert!(err.is_unavailable(), "{err}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "keeps its source"
    );
}

/// A PostgreSQL primary killed and its synchronous standby promoted: the store, on the
/// multi-host URL, answers unavailable while no server takes writes, follows the promoted
/// standby without being opened again, and finds every write acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_follows_a_promoted_standby() {
    let pair = tokio::task::spawn_blocking(hangar_test_postgres::ReplicatedPair::start)
        .await
        .unwrap();
    let store = PgStore::connect(&pair.url()).await.unwrap();
    store
        .insert_vm(&vm("vm-a", "web", Mode::Shared, VmState::Creating))
        .await
        .unwrap();
    store
        .transition("vm-a", VmState::Booting, None)
        .await
        .unwrap();
    pair.kill_primary().unwrap();

    // No primary: the standby refuses to be taken for one (read-only), the old one goes
    // (its backends may still commit, replicated, for a moment: those writes count).
    let mut acknowledged = Vec::new();
    loop {
        let id = format!("vm-b{}", acknowledged.len());
        let started = std::time::Instant::now();
        match store
            .insert_vm(&vm(&id, "web", Mode::Shared, VmState::Creating))
            .await
        {
            Ok(()) => acknowledged.push(id),
            Err(err) => {
                assert!(err.is_unavailable(), "{err}");
                let waited = started.elapsed();
                assert!(
                    waited < std::time::Duration::from_secs(5),
                    "failed fast ({waited:?})"
                );
                break;
            }
        }
        assert!(
            acknowledged.len() < 10_000,
            "the killed primary still commits"
        );
    }

    // A write issued now succeeds once the standby is promoted within its retries.
    let writer = {
        let store = std::sync::Arc::new(store);
        let s = store.clone();
        (
            store,
            tokio::spawn(async move { s.transition("vm-a", VmState::Ready, None).await }),
        )
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let promote = tokio::task::spawn_blocking({
        let url = pair.standby_url();
        move || hangar_test_postgres::replicated::query(&url, "SELECT pg_promote(true, 60)")
    });
    assert_eq!(promote.await.unwrap().unwrap(), "t");
    let (store, writer) = writer;
    let moved = writer.await.unwrap().expect("retried onto the new primary");
    assert_eq!(moved.state, VmState::Ready);
    let stored = store
        .vm("vm-a")
        .await
        .unwrap()
        .expect("acknowledged before");
    assert_eq!(stored.state, VmState::Ready);
    for id in &acknowledged {
        assert!(store.vm(id).await.unwrap().is_some(), "{id} acknowledged");
    }
    store
        .insert_vm(&vm("vm-c", "web", Mode::Shared, VmState::Creating))
        .await
        .expect("writes go to the new primary");
    drop(pair);
}
