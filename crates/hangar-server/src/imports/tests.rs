//! Imports through the manager: queries checked, a crafted image refused with nothing
//! left behind (no model, no work directory, no record), the task recorded.

use std::process::Command;

use futures::stream;
use hangar_api::ImportQuery;
use hangar_store::TaskState;

use super::*;
use crate::manager::ManagerConfig;
use crate::test_support::{WEB, fake_manager};

fn query(name: &str, format: &str) -> ImportQuery {
    ImportQuery {
        name: name.into(),
        format: format.into(),
        ports: Some("http=80".into()),
        vcpus: None,
        memory_mib: None,
    }
}

fn chunks(
    data: Vec<u8>,
) -> impl futures::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Unpin {
    stream::iter(
        data.chunks(4096)
            .map(|c| Ok(axum::body::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    )
}

#[test]
fn ports_are_name_equals_port() {
    assert_eq!(
        parse_ports(Some("http=80,ssh=22")).unwrap(),
        BTreeMap::from([("http".to_string(), 80), ("ssh".to_string(), 22)])
    );
    assert!(parse_ports(None).unwrap().is_empty());
    for bad in ["http", "http=0", "http=70000", "Http=80", "a=1,a=2"] {
        assert!(
            matches!(parse_ports(Some(bad)), Err(ImportsError::BadRequest(_))),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_crafted_backing_file_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let config = ManagerConfig {
        models_dir: Some(models.clone()),
        ..ManagerConfig::default()
    };
    let (manager, _backend, store) = fake_manager(WEB, config);
    let evil = dir.path().join("evil.qcow2");
    let out = Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/shadow",
            "-u",
        ])
        .arg(&evil)
        .arg("64M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let data = std::fs::read(&evil).unwrap();

    let err = manager
        .import_machine("alice", &query("evil", "qcow2"), chunks(data.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ImportsError::Refused(ImportError::RefusedBackingFile(p)) if p == "/etc/shadow"),
        "{err}"
    );
    // Nothing stays: no model, no work directory, no record; the task says why.
    assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    assert!(store.imports().await.unwrap().is_empty());
    let tasks = store.tasks(10).await.unwrap();
    let task = tasks.iter().find(|t| t.kind == "import").unwrap();
    assert_eq!(task.state, TaskState::Failed);
    assert!(task.error.as_deref().unwrap().contains("/etc/shadow"));

    // Names are checked before anything is read: a catalog service's, a malformed one.
    let err = manager
        .import_machine("alice", &query("web", "qcow2"), chunks(data.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImportsError::NameTaken(_)), "{err}");
    let err = manager
        .import_machine("alice", &query("Bad Name", "qcow2"), chunks(data.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, ImportsError::BadRequest(_)), "{err}");
    let err = manager
        .import_machine("alice", &query("iso", "iso"), chunks(data))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImportsError::Refused(ImportError::UnknownFormat(_))),
        "{err}"
    );
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_while_it_streams() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    let config = ManagerConfig {
        models_dir: Some(models.clone()),
        import_limits: hangar_image::import::ImportLimits {
            max_upload_bytes: 10_000,
            max_virtual_bytes: 1 << 30,
        },
        ..ManagerConfig::default()
    };
    let (manager, _backend, store) = fake_manager(WEB, config);
    let err = manager
        .import_machine("alice", &query("big", "raw"), chunks(vec![0u8; 20_000]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImportsError::Refused(ImportError::RefusedUploadSize { limit: 10_000 })
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&models).unwrap().count(), 0);
    assert!(store.imports().await.unwrap().is_empty());
}
