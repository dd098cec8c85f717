//! The REST API (`hangar_server::api::router`) from the first byte of a request: method,
//! path and query, content type and body, through the real router, handlers and command
//! layer, over a domain whose infrastructure is stubbed: an in-memory store, the fake
//! hypervisor, and an image source that refuses everything (so that no VM is ever made and
//! nothing accumulates between inputs). Every answer is a well-formed HTTP answer; every
//! error answer (4xx, 5xx) carries the API's one JSON error shape; nothing panics.
//!
//! Input: byte 0 chooses the method; then the path and query up to the first newline; then
//! the content type up to the next newline; the rest is the body.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request};
use hangar_core::{Catalog, Service};
use hangar_host::images::{ImageSource, ImageSourceError, ProgressFn, RootImage};
use hangar_host::{LocalHost, LocalHostConfig};
use hangar_image::GuestAssets;
use hangar_server::{Manager, ManagerConfig};
use hangar_vmm::fake::FakeBackend;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// Images that cannot be had: creations and builds fail at once, before any VM exists.
struct NoImagesAtAll;

#[async_trait::async_trait]
impl ImageSource for NoImagesAtAll {
    async fn guest_assets(&self) -> Result<GuestAssets, ImageSourceError> {
        Err(ImageSourceError::NoOs("fuzzing".into()))
    }
    async fn root_image(
        &self,
        _service: &Service,
        os: &str,
        _progress: ProgressFn,
    ) -> Result<RootImage, ImageSourceError> {
        Err(ImageSourceError::NoOs(os.to_owned()))
    }
    async fn os_image(&self, os: &str) -> Result<Option<PathBuf>, ImageSourceError> {
        Err(ImageSourceError::NoOs(os.to_owned()))
    }
}

struct Api {
    runtime: tokio::runtime::Runtime,
    router: Router,
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let router = runtime.block_on(async {
            let store = Arc::new(hangar_store::SqliteStore::open_in_memory().expect("store"));
            let images: Arc<dyn ImageSource> = Arc::new(NoImagesAtAll);
            let host = LocalHost::new(
                Arc::new(FakeBackend::new()),
                images.clone(),
                LocalHostConfig::default(),
            );
            let export =
                std::env::temp_dir().join(format!("hangar-fuzz-api-{}", std::process::id()));
            let config = ManagerConfig {
                export_dir: export,
                default_deadline: std::time::Duration::from_millis(200),
                ..ManagerConfig::default()
            };
            let manager = Manager::new(
                store,
                Arc::new(host),
                images,
                Arc::new(Catalog::demo()),
                config,
            );
            hangar_server::api::router(manager)
        });
        Api { runtime, router }
    })
}

const METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
];

fuzz_target!(|data: &[u8]| {
    let Some((&method, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(method) % METHODS.len()].clone();
    let mut parts = rest.splitn(3, |b| *b == b'\n');
    let path = parts.next().unwrap_or_default();
    let content_type = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default().to_vec();
    let Ok(path) = std::str::from_utf8(path) else {
        return;
    };
    if !path.starts_with('/') {
        return;
    }
    let mut request = Request::builder().method(method.clone()).uri(path);
    if !content_type.is_empty() {
        request = request.header("content-type", content_type);
    }
    let Ok(request) = request.body(Body::from(body)) else {
        return; // not a request the HTTP layer would hand to the router
    };
    let api = api();
    let (status, body) = api.runtime.block_on(async {
        let answer = api
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = answer.status();
        let body = axum::body::to_bytes(answer.into_body(), 64 << 20)
            .await
            .expect("the answer's body is readable");
        (status, body)
    });
    if (status.is_client_error() || status.is_server_error()) && method != Method::HEAD {
        let error: Result<hangar_api::ErrorBody, _> = serde_json::from_slice(&body);
        assert!(
            error.is_ok(),
            "{method} {path}: {status} without the JSON error shape: {:?}",
            String::from_utf8_lossy(&body)
        );
    }
});
