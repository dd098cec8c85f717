//! hangar-api's typed client against the API served on loopback (fake backend): every client
//! method decodes the server's answer, and errors arrive as the client's three kinds.

use std::sync::Arc;
use std::time::Duration;

use hangar_api::{ArchiveBody, Client, ClientError, ImageBody, PolicyBody, PoolBoundsBody, Served};
use hangar_core::{Mode, TierChoice, VmState};

use crate::manager::{Manager, ManagerConfig};
use crate::test_support::{fake_manager, request};

const CATALOG: &str = crate::test_support::WEB_AND_NEVER_READY;

/// Serves the API for `manager` on a loopback port; a client of it.
async fn serve(manager: Arc<Manager>) -> Client {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, crate::api::router(manager)).into_future());
    Client::new(&url)
        .unwrap()
        .with_token(crate::test_support::ADMIN_TOKEN)
}

fn status(err: &ClientError) -> u16 {
    err.status()
        .unwrap_or_else(|| panic!("expected an error answer, got {err:?}"))
        .as_u16()
}

#[tokio::test]
async fn every_client_method_reads_the_servers_answer() {
    let (manager, _, _) = fake_manager(CATALOG, ManagerConfig::default());
    let api = serve(manager).await;

    assert_eq!(api.health().await.unwrap().status, "ok");
    let document = api.openapi().await.unwrap();
    assert!(document["paths"]["/v1/vms/{id}/wake"]["post"].is_object());
    let services = api.services().await.unwrap();
    assert!(
        services
            .iter()
            .any(|s| s.name == "web" && s.ports[0].guest == 80)
    );

    let grant = api.request(&request("web", Mode::Dedicated)).await.unwrap();
    assert_eq!(grant.value.served, Served::Created);
    assert_eq!(grant.value.state, VmState::Active);
    let id = grant.value.vm.clone();

    assert_eq!(api.vms(false).await.unwrap()[0].id, id);
    assert_eq!(api.vm(&id).await.unwrap().services, ["web"]);
    assert_eq!(api.sleep(&id).await.unwrap().state, VmState::Sleeping);
    let woken = api.wake(&id).await.unwrap();
    assert_eq!(woken.value.state, VmState::Active);
    assert!(!woken.stages().is_empty(), "{:?}", woken.server_timing);
    let archived = api
        .archive(
            &id,
            &ArchiveBody {
                tier: TierChoice::Raw,
            },
        )
        .await
        .unwrap();
    assert_eq!(archived.state, VmState::Archived);
    assert_eq!(archived.archive.unwrap().tier, "raw");
    api.wake(&id).await.unwrap();

    let pools = api.pools().await.unwrap();
    let pool = api
        .set_pool(
            "web",
            &PoolBoundsBody {
                min: Some(0),
                max: Some(3),
                ready: None,
            },
        )
        .await
        .unwrap();
    assert_eq!((pool.min, pool.max), (0, 3));
    assert!(pools.len() <= api.pools().await.unwrap().len());
    assert!(api.templates().await.unwrap().is_empty());

    let policy = api
        .set_policy(
            "web",
            &PolicyBody {
                sleep_after: Some(Some("10m".into())),
                ..PolicyBody::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(policy.policy.sleep_after, Some(Duration::from_secs(600)));
    assert!(
        api.policies()
            .await
            .unwrap()
            .services
            .iter()
            .any(|p| p.service == "web")
    );
    assert_eq!(
        api.reset_policy("web").await.unwrap().source,
        hangar_api::PolicySource::Catalog
    );

    let task = grant.value.task.clone().unwrap();
    assert_eq!(api.task(&task).await.unwrap().state, "succeeded");
    assert!(api.tasks().await.unwrap().iter().any(|t| t.id == task));
    api.images().await.unwrap();
    let image = ImageBody {
        service: "nope".into(),
        ..ImageBody::default()
    };
    assert_eq!(status(&api.build_image(&image).await.unwrap_err()), 404);
    assert_eq!(status(&api.export(&image).await.unwrap_err()), 404);

    assert_eq!(api.delete_vm(&id).await.unwrap().state, VmState::Deleted);
    assert!(api.vms(false).await.unwrap().is_empty());
    assert_eq!(api.vms(true).await.unwrap()[0].id, id);
}

#[tokio::test]
async fn errors_arrive_as_unreachable_error_answers_or_undecodable_answers() {
    let (manager, _, _) = fake_manager(CATALOG, ManagerConfig::default());
    let api = serve(manager).await;

    // An error answer: its status, JSON body and Retry-After.
    let err = api.vm("vm-unknown").await.unwrap_err();
    assert_eq!(status(&err), 404);
    assert_eq!(err.body().unwrap().error.code, "not_found");
    let mut typo = request("wbe", Mode::Shared);
    let err = api.request(&typo).await.unwrap_err();
    assert_eq!(err.body().unwrap().error.alternatives, ["web"]);
    typo.service = Some("never-ready".into());
    typo.deadline_ms = Some(50);
    match api.request(&typo).await.unwrap_err() {
        ClientError::Api {
            status,
            body,
            retry_after,
        } => {
            assert_eq!(status, 503);
            assert_eq!(body.error.code, "try_again");
            assert_eq!(retry_after, Some(Duration::from_secs(2)));
        }
        other => panic!("expected try again, got {other:?}"),
    }

    // No answer: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = Client::new(&format!("http://{}", closed.local_addr().unwrap())).unwrap();
    drop(closed);
    let err = nobody.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    assert!(
        std::error::Error::source(&err).is_some(),
        "keeps its source"
    );

    // An answer of another shape: a server whose /healthz is not the API's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = Client::new(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    let router =
        axum::Router::new().route("/healthz", axum::routing::get(|| async { "{\"up\": 1}" }));
    tokio::spawn(axum::serve(listener, router).into_future());
    let err = other.health().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Decode { status, .. } if *status == 200),
        "{err:?}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "keeps its source"
    );
}
