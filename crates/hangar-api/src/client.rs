//! A typed async client of the REST API: one method per route, answers as this crate's types.
//!
//! Every method sends one request and does not retry. Its errors tell three cases apart (see
//! [`ClientError`]): no answer, an error answer (status and [`ErrorBody`]), and an answer
//! that did not decode.

use std::time::Duration;

use hangar_core::ServiceRequest;
use reqwest::header::{CONTENT_RANGE, HeaderMap, RANGE, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::*;

/// A client of one hangar server. Cheap to clone (connections are pooled and shared).
#[derive(Clone)]
pub struct Client {
    base: Url,
    http: reqwest::Client,
    /// Sent as a bearer token with every request.
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// The server URL given to [`Client::new`] is not `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, thiserror::Error)]
#[error("server URL {0:?} is not http://HOST:PORT")]
pub struct BadUrl(pub String);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer came: the connection was refused, reset or timed out before the server
    /// answered. The server may be down or restarting; trying again may help.
    #[error("cannot reach the hangar server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status and its JSON error body.
    #[error("{} (HTTP {status})", body.error.message)]
    Api {
        status: StatusCode,
        body: ErrorBody,
        /// The `Retry-After` header (503 answers): when trying again should succeed.
        retry_after: Option<Duration>,
    },
    /// An answer came but could not be read as the expected type: a body of another shape,
    /// not JSON, or cut short.
    #[error("the answer to {method} {path} (HTTP {status}) did not decode")]
    Decode {
        method: Method,
        path: String,
        status: StatusCode,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ClientError {
    /// The HTTP status of an error answer; `None` when no answer came or it did not decode.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The JSON error body of an error answer.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            ClientError::Api { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// An answer with the server's `Server-Timing` header, for routes that report their stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed<T> {
    pub value: T,
    /// `Server-Timing` as sent, e.g. `claim;dur=0.4, resume;dur=2.1, total;dur=2.6` (empty
    /// when the server sent none).
    pub server_timing: String,
}

impl<T> Timed<T> {
    /// The stages of `Server-Timing` as (name, milliseconds), in order.
    pub fn stages(&self) -> Vec<(String, f64)> {
        parse_server_timing(&self.server_timing)
    }
}

/// Parses a `Server-Timing` header into (name, milliseconds) pairs; entries without a
/// `dur` are left out.
pub fn parse_server_timing(header: &str) -> Vec<(String, f64)> {
    header
        .split(',')
        .filter_map(|entry| {
            let mut parts = entry.split(';').map(str::trim);
            let name = parts.next().filter(|name| !name.is_empty())?;
            let ms = parts
                .find_map(|p| p.strip_prefix("dur="))
                .and_then(|v| v.parse().ok())?;
            Some((name.to_owned(), ms))
        })
        .collect()
}

/// An answer body being received chunk by chunk: an export (`POST /v1/export`) or, inside
/// a [`BlobDownload`], a blob.
#[derive(Debug)]
pub struct Download {
    response: reqwest::Response,
    method: Method,
    path: String,
}

impl Download {
    /// The body's size in bytes, when the server sent it.
    pub fn content_length(&self) -> Option<u64> {
        self.response.content_length()
    }

    /// The next chunk; `None` at the end. An answer cut short is [`ClientError::Decode`].
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let status = self.response.status();
        self.response
            .chunk()
            .await
            .map(|chunk| chunk.map(|bytes| bytes.to_vec()))
            .map_err(|err| ClientError::Decode {
                method: self.method.clone(),
                path: self.path.clone(),
                status,
                source: Box::new(err),
            })
    }
}

/// A blob being received (`GET /v1/farm/blobs/{sha256}`): read it chunk by chunk.
#[derive(Debug)]
pub struct BlobDownload {
    body: Download,
    offset: u64,
}

impl BlobDownload {
    /// Where in the file the bytes sent start: the offset asked for when the server
    /// resumed (206), 0 when it sends the whole file (200).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How many bytes the answer carries, when the server said.
    pub fn content_length(&self) -> Option<u64> {
        self.body.content_length()
    }

    /// The next chunk; `None` at the end. An answer cut short is [`ClientError::Decode`].
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        self.body.chunk().await
    }
}

/// The first byte of a `Content-Range: bytes FIRST-LAST/SIZE` header.
fn content_range_start(header: &str) -> Option<u64> {
    let range = header.trim().strip_prefix("bytes ")?;
    let (first, _) = range.split_once('-')?;
    first.trim().parse().ok()
}

impl Client {
    /// A client of the server at `base` (`http://HOST:PORT`, optionally with a path prefix).
    pub fn new(base: &str) -> Result<Client, BadUrl> {
        Client::with_http(base, reqwest::Client::new())
    }

    /// Like [`Client::new`], over a configured `reqwest` client (timeouts, pool size).
    pub fn with_http(base: &str, http: reqwest::Client) -> Result<Client, BadUrl> {
        let url = Url::parse(base).map_err(|_| BadUrl(base.to_owned()))?;
        if !matches!(url.scheme(), "http" | "https")
            || url.host().is_none()
            || url.cannot_be_a_base()
        {
            return Err(BadUrl(base.to_owned()));
        }
        Ok(Client {
            base: url,
            http,
            token: None,
        })
    }

    /// This client, sending `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.to_owned());
        self
    }

    /// The server's URL as given.
    pub fn base(&self) -> &str {
        self.base.as_str()
    }

    /// `GET /healthz`: whether the server answers.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.call(Method::GET, &["healthz"], None::<&()>).await
    }

    /// `GET /v1/openapi.json`: the OpenAPI document of every route.
    pub async fn openapi(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, &["v1", "openapi.json"], None::<&()>)
            .await
    }

    /// `GET /v1/services`: the catalog's services.
    pub async fn services(&self) -> Result<Vec<ServiceView>, ClientError> {
        self.call(Method::GET, &["v1", "services"], None::<&()>)
            .await
    }

    /// `POST /v1/requests`: a VM offering the service, once it is ready. Errors: 400
    /// malformed, 404 no such service (with alternatives), 422 never available, 503 not
    /// ready within the request's deadline (`retry_after` says when to ask again).
    pub async fn request(&self, request: &ServiceRequest) -> Result<Timed<GrantView>, ClientError> {
        self.call_timed(Method::POST, &["v1", "requests"], Some(request))
            .await
    }

    /// The heuristics engine's verdict on a request (`POST /v1/requests/check`): every
    /// problem with a suggestion, the ranked candidates and the chosen one. Nothing is
    /// provisioned; an invalid request is a 200 with its problems.
    pub async fn check(
        &self,
        request: &ServiceRequest,
    ) -> Result<hangar_core::heuristics::Verdict, ClientError> {
        self.call(Method::POST, &["v1", "requests", "check"], Some(request))
            .await
    }

    /// [`Client::request`] under an `Idempotency-Key`: a retry with the same key (by the
    /// same user) answers the first call's grant, the same VM. 422 when the key was used
    /// with another request.
    pub async fn request_idempotent(
        &self,
        request: &ServiceRequest,
        key: &str,
    ) -> Result<Timed<GrantView>, ClientError> {
        let url = self.url(&["v1", "requests"]);
        let mut builder = self
            .http
            .post(url.clone())
            .header("idempotency-key", key)
            .json(request);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        let response = builder
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.as_str().trim_end_matches('/').to_owned(),
                source,
            })?;
        let (value, headers) = decode(Method::POST, &url, response).await?;
        let server_timing = headers
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Timed {
            value,
            server_timing,
        })
    }

    /// `GET /v1/whoami`: the user and role the client's token speaks for (401 for a token
    /// the server does not accept).
    pub async fn whoami(&self) -> Result<crate::WhoamiView, ClientError> {
        self.call(Method::GET, &["v1", "whoami"], None::<&()>).await
    }

    /// `GET /v1/users` (admin).
    pub async fn users(&self) -> Result<Vec<crate::UserView>, ClientError> {
        self.call(Method::GET, &["v1", "users"], None::<&()>).await
    }

    /// `POST /v1/users` (admin): adds a user. 409 when the name is taken.
    pub async fn add_user(&self, body: &crate::UserBody) -> Result<crate::UserView, ClientError> {
        self.call(Method::POST, &["v1", "users"], Some(body)).await
    }

    /// `GET /v1/tokens`: the caller's tokens (an admin's: everyone's), never their secrets.
    pub async fn tokens(&self) -> Result<Vec<crate::TokenView>, ClientError> {
        self.call(Method::GET, &["v1", "tokens"], None::<&()>).await
    }

    /// `POST /v1/tokens`: a new token, its secret shown this once.
    pub async fn create_token(
        &self,
        body: &crate::TokenBody,
    ) -> Result<crate::CreatedTokenView, ClientError> {
        self.call(Method::POST, &["v1", "tokens"], Some(body)).await
    }

    /// `DELETE /v1/tokens/{id}`: revokes a token (the caller's own; an admin: any).
    pub async fn revoke_token(&self, id: &str) -> Result<crate::TokenView, ClientError> {
        self.call(Method::DELETE, &["v1", "tokens", id], None::<&()>)
            .await
    }

    /// `GET /v1/audit` (admin): the latest mutating calls, oldest first.
    pub async fn audit(
        &self,
        query: &crate::AuditQuery,
    ) -> Result<Vec<crate::AuditView>, ClientError> {
        let mut url = self.url(&["v1", "audit"]);
        if let Some(since) = &query.since {
            url.query_pairs_mut().append_pair("since", since);
        }
        if let Some(limit) = query.limit {
            url.query_pairs_mut()
                .append_pair("limit", &limit.to_string());
        }
        let response = self.send(Method::GET, url.clone(), None::<&()>).await?;
        decode(Method::GET, &url, response).await.map(|(v, _)| v)
    }

    /// `GET /v1/vms`: the state table; with `all`, deleted VMs too.
    pub async fn vms(&self, all: bool) -> Result<Vec<VmView>, ClientError> {
        let mut url = self.url(&["v1", "vms"]);
        if all {
            url.query_pairs_mut().append_pair("all", "true");
        }
        let response = self.send(Method::GET, url.clone(), None::<&()>).await?;
        decode(Method::GET, &url, response).await.map(|(v, _)| v)
    }

    /// `GET /v1/vms/{id}`: one VM. 404 when there is none of that id.
    pub async fn vm(&self, id: &str) -> Result<VmView, ClientError> {
        self.call(Method::GET, &["v1", "vms", id], None::<&()>)
            .await
    }

    /// `DELETE /v1/vms/{id}`: ends the VM and removes its disk, sockets and logs; answers the
    /// VM as deleted. 409 while another operation on it is under way.
    pub async fn delete_vm(&self, id: &str) -> Result<VmView, ClientError> {
        self.call(Method::DELETE, &["v1", "vms", id], None::<&()>)
            .await
    }

    /// `POST /v1/vms/{id}/sleep`: pauses an active VM in memory. 409 in a state that does
    /// not allow it.
    pub async fn sleep(&self, id: &str) -> Result<VmView, ClientError> {
        self.call(Method::POST, &["v1", "vms", id, "sleep"], None::<&()>)
            .await
    }

    /// `POST /v1/vms/{id}/archive`: writes an active or sleeping VM's memory to disk in
    /// `body.tier` and ends its process. 409 in a state that does not allow it.
    pub async fn archive(&self, id: &str, body: &ArchiveBody) -> Result<VmView, ClientError> {
        self.call(Method::POST, &["v1", "vms", id, "archive"], Some(body))
            .await
    }

    /// `POST /v1/vms/{id}/wake`: brings a sleeping or archived VM back; answers once it
    /// runs, with the stages of the wake in `Server-Timing`.
    pub async fn wake(&self, id: &str) -> Result<Timed<VmView>, ClientError> {
        self.call_timed(Method::POST, &["v1", "vms", id, "wake"], None::<&()>)
            .await
    }

    /// `POST /v1/vms/{id}/migrate`: starts moving a VM to farm host `to` (admins only);
    /// answers 202 with the `migrate` task (follow it with [`Client::task`], cancel it with
    /// [`Client::cancel_task`]). 404 for no such VM or host, 409 when the VM cannot move
    /// there now (its state, the host's, room, isolation, a migration under way).
    pub async fn migrate(&self, id: &str, to: &str) -> Result<AcceptedView, ClientError> {
        let body = MigrateBody { to: to.to_owned() };
        self.call(Method::POST, &["v1", "vms", id, "migrate"], Some(&body))
            .await
    }

    /// `POST /v1/stacks`: starts making a stack (202 with its `stack` task; follow it with
    /// [`Client::task`]). 400 for a stack file that is not valid (every message names the
    /// member and field), 404 for an unknown service, 409 when the name is taken.
    pub async fn stack_up(&self, spec: &StackSpec) -> Result<StackAccepted, ClientError> {
        self.call(Method::POST, &["v1", "stacks"], Some(spec)).await
    }

    /// `GET /v1/stacks`: the caller's stacks (an admin's: every stack).
    pub async fn stacks(&self) -> Result<Vec<StackView>, ClientError> {
        self.call(Method::GET, &["v1", "stacks"], None::<&()>).await
    }

    /// `GET /v1/stacks/{name}`.
    pub async fn stack(&self, name: &str) -> Result<StackView, ClientError> {
        self.call(Method::GET, &["v1", "stacks", name], None::<&()>)
            .await
    }

    /// `DELETE /v1/stacks/{name}`: deletes every member and the stack; answers the stack as
    /// it was.
    pub async fn stack_down(&self, name: &str) -> Result<StackView, ClientError> {
        self.call(Method::DELETE, &["v1", "stacks", name], None::<&()>)
            .await
    }

    /// `POST /v1/stacks/{name}/sleep`: every member paused, the front first.
    pub async fn stack_sleep(&self, name: &str) -> Result<StackView, ClientError> {
        self.call(Method::POST, &["v1", "stacks", name, "sleep"], None::<&()>)
            .await
    }

    /// `POST /v1/stacks/{name}/archive`: every member archived, the front first.
    pub async fn stack_archive(&self, name: &str) -> Result<StackView, ClientError> {
        self.call(
            Method::POST,
            &["v1", "stacks", name, "archive"],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/stacks/{name}/wake`: every member woken, peers before the members that
    /// refer to them.
    pub async fn stack_wake(&self, name: &str) -> Result<StackView, ClientError> {
        self.call(Method::POST, &["v1", "stacks", name, "wake"], None::<&()>)
            .await
    }

    /// `GET /v1/pools`: the warm pools and what they hold.
    pub async fn pools(&self) -> Result<Vec<PoolView>, ClientError> {
        self.call(Method::GET, &["v1", "pools"], None::<&()>).await
    }

    /// `PUT /v1/pools/{name}`: changes a pool's bounds or ready criterion (kept across
    /// restarts); fields left out stay as they are. 404 for no such pool or service.
    pub async fn set_pool(
        &self,
        name: &str,
        body: &PoolBoundsBody,
    ) -> Result<PoolView, ClientError> {
        self.call(Method::PUT, &["v1", "pools", name], Some(body))
            .await
    }

    /// `GET /v1/templates`: service templates on disk.
    pub async fn templates(&self) -> Result<Vec<TemplateView>, ClientError> {
        self.call(Method::GET, &["v1", "templates"], None::<&()>)
            .await
    }

    /// `GET /v1/policies`: every service's lifecycle policy and the budgets.
    pub async fn policies(&self) -> Result<PoliciesView, ClientError> {
        self.call(Method::GET, &["v1", "policies"], None::<&()>)
            .await
    }

    /// `PUT /v1/policies/{service}`: changes a service's policy (kept across restarts).
    /// 400 for a malformed duration, 404 for no such service.
    pub async fn set_policy(
        &self,
        service: &str,
        body: &PolicyBody,
    ) -> Result<PolicyView, ClientError> {
        self.call(Method::PUT, &["v1", "policies", service], Some(body))
            .await
    }

    /// `DELETE /v1/policies/{service}`: back to the catalog's policy.
    pub async fn reset_policy(&self, service: &str) -> Result<PolicyView, ClientError> {
        self.call(Method::DELETE, &["v1", "policies", service], None::<&()>)
            .await
    }

    /// `GET /v1/alerts`: firing alerts; with `all`, pending and resolved ones too.
    pub async fn alerts(&self, all: bool) -> Result<Vec<crate::AlertView>, ClientError> {
        let mut url = self.url(&["v1", "alerts"]);
        if all {
            url.query_pairs_mut().append_pair("all", "true");
        }
        let response = self.send(Method::GET, url.clone(), None::<&()>).await?;
        decode(Method::GET, &url, response).await.map(|(v, _)| v)
    }

    /// `GET /v1/quotas`: the default quota and every user's, with what their VMs take.
    pub async fn quotas(&self) -> Result<crate::QuotasView, ClientError> {
        self.call(Method::GET, &["v1", "quotas"], None::<&()>).await
    }

    /// `PUT /v1/quotas/{user}`: sets a user's limits (left out: no limit).
    pub async fn set_quota(
        &self,
        user: &str,
        limits: &crate::Limits,
    ) -> Result<crate::QuotaView, ClientError> {
        self.call(Method::PUT, &["v1", "quotas", user], Some(limits))
            .await
    }

    /// `GET /v1/usage`: usage since `since` (a duration before now, or epoch ms), summed
    /// `by` user, service, host or VM.
    pub async fn usage(
        &self,
        since: Option<&str>,
        by: Option<crate::UsageBy>,
    ) -> Result<crate::UsageView, ClientError> {
        let mut url = self.url(&["v1", "usage"]);
        if let Some(since) = since {
            url.query_pairs_mut().append_pair("since", since);
        }
        if let Some(by) = by {
            url.query_pairs_mut().append_pair("by", by.as_str());
        }
        let response = self.send(Method::GET, url.clone(), None::<&()>).await?;
        decode(Method::GET, &url, response).await.map(|(v, _)| v)
    }

    /// `GET /v1/tasks`: the latest tasks, newest first.
    pub async fn tasks(&self) -> Result<Vec<TaskView>, ClientError> {
        self.call(Method::GET, &["v1", "tasks"], None::<&()>).await
    }

    /// `GET /v1/tasks/{id}`: one task, its progress and its steps. 404 when there is none
    /// of that id (or it is someone else's, for a non-admin).
    pub async fn task(&self, id: &str) -> Result<TaskView, ClientError> {
        self.call(Method::GET, &["v1", "tasks", id], None::<&()>)
            .await
    }

    /// `POST /v1/tasks/{id}/cancel`: cancels a running task (its steps are then undone and
    /// it ends `cancelled`); answers the task as it was asked. 409 when it already ended,
    /// 403 when it is someone else's (for a non-admin), 404 when there is none.
    pub async fn cancel_task(&self, id: &str) -> Result<TaskView, ClientError> {
        self.call(Method::POST, &["v1", "tasks", id, "cancel"], None::<&()>)
            .await
    }

    /// `POST /v1/imports`: uploads the disk image `image` (a `tokio::fs::File`, streamed) as
    /// a new imported machine, answered once it is checked, staged and stored. 422 for an image that is
    /// refused (a backing file, encryption, sizes over the limits, no OS found), 409 for a
    /// name taken.
    pub async fn import_machine(
        &self,
        query: &ImportQuery,
        image: impl Into<reqwest::Body>,
    ) -> Result<ImportView, ClientError> {
        let mut url = self.url(&["v1", "imports"]);
        {
            let mut pairs = url.query_pairs_mut();
            pairs.append_pair("name", &query.name);
            pairs.append_pair("format", &query.format);
            if let Some(ports) = &query.ports {
                pairs.append_pair("ports", ports);
            }
            if let Some(vcpus) = query.vcpus {
                pairs.append_pair("vcpus", &vcpus.to_string());
            }
            if let Some(memory) = query.memory_mib {
                pairs.append_pair("memory_mib", &memory.to_string());
            }
        }
        let mut request = self
            .http
            .request(Method::POST, url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(image);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.as_str().trim_end_matches('/').to_owned(),
                source,
            })?;
        decode(Method::POST, &url, response)
            .await
            .map(|(value, _)| value)
    }

    /// `GET /v1/imports`: the imported machines.
    pub async fn imports(&self) -> Result<Vec<ImportView>, ClientError> {
        self.call(Method::GET, &["v1", "imports"], None::<&()>)
            .await
    }

    /// `DELETE /v1/imports/{name}`: removes an imported machine's model. 409 while VMs of
    /// it live.
    pub async fn delete_import(&self, name: &str) -> Result<ImportView, ClientError> {
        self.call(Method::DELETE, &["v1", "imports", name], None::<&()>)
            .await
    }

    /// `GET /v1/images`: images of every viable service and environment, and their layers.
    pub async fn images(&self) -> Result<ImagesView, ClientError> {
        self.call(Method::GET, &["v1", "images"], None::<&()>).await
    }

    /// `POST /v1/images`: starts building an image; answers its task (follow it with
    /// [`Client::task`]). 404 for no such service, 422 for a combination never available.
    pub async fn build_image(&self, body: &ImageBody) -> Result<BuildView, ClientError> {
        self.call(Method::POST, &["v1", "images"], Some(body)).await
    }

    /// `POST /v1/export`: a self-contained tar of a service's image, received with
    /// [`Download::chunk`]. Errors as for [`Client::build_image`].
    pub async fn export(&self, body: &ImageBody) -> Result<Download, ClientError> {
        let url = self.url(&["v1", "export"]);
        let response = self.send(Method::POST, url.clone(), Some(body)).await?;
        let response = error_of(&Method::POST, &url, response).await?;
        Ok(Download {
            response,
            method: Method::POST,
            path: url.path().to_owned(),
        })
    }

    /// `POST /v1/hosts`: registers a farm host (agents only; farm token). 401 without the
    /// token, 409 when another live agent holds the name.
    pub async fn register_host(
        &self,
        registration: &HostRegistration,
    ) -> Result<HeartbeatReply, ClientError> {
        self.call(Method::POST, &["v1", "hosts"], Some(registration))
            .await
    }

    /// `POST /v1/hosts/{name}/heartbeat`: a farm host's facts now (agents only; farm
    /// token). 404 when the server does not know the host (register again).
    pub async fn heartbeat(
        &self,
        name: &str,
        heartbeat: &Heartbeat,
    ) -> Result<HeartbeatReply, ClientError> {
        self.call(
            Method::POST,
            &["v1", "hosts", name, "heartbeat"],
            Some(heartbeat),
        )
        .await
    }

    /// `GET /v1/hosts`: the hosts of the farm (the server's own in single-node mode).
    pub async fn hosts(&self) -> Result<Vec<HostView>, ClientError> {
        self.call(Method::GET, &["v1", "hosts"], None::<&()>).await
    }

    /// `POST /v1/hosts/{name}/drain` (admins only): no new VMs go to the host; its paused
    /// pool VMs are removed (their pools refill elsewhere). 404 for no such farm host, 409
    /// for a host down or lost, or the server's own.
    pub async fn drain_host(&self, name: &str) -> Result<HostStateView, ClientError> {
        self.call(Method::POST, &["v1", "hosts", name, "drain"], None::<&()>)
            .await
    }

    /// `POST /v1/hosts/{name}/resume` (admins only): a draining host takes VMs again. 409
    /// for a host down or lost, or one being evacuated.
    pub async fn resume_host(&self, name: &str) -> Result<HostStateView, ClientError> {
        self.call(Method::POST, &["v1", "hosts", name, "resume"], None::<&()>)
            .await
    }

    /// `POST /v1/hosts/{name}/evacuate` (admins only): drains the host and starts moving
    /// its VMs to other hosts; answers 202 with the `evacuate` task (follow it with
    /// [`Client::task`], what it did with [`Client::evacuation`]).
    pub async fn evacuate_host(&self, name: &str) -> Result<AcceptedView, ClientError> {
        self.call(
            Method::POST,
            &["v1", "hosts", name, "evacuate"],
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/hosts/{name}/evacuation` (admins only): the host's last evacuation run by
    /// this server, VM by VM. 404 when there is none.
    pub async fn evacuation(&self, name: &str) -> Result<EvacuationView, ClientError> {
        self.call(
            Method::GET,
            &["v1", "hosts", name, "evacuation"],
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/placements`: the host a VM of that service or size would go to now, and
    /// why; nothing is made. Errors: 400 malformed, 404 no such service, 422 never
    /// available, 503 no host has room now.
    pub async fn placement(&self, body: &PlacementBody) -> Result<PlacementView, ClientError> {
        self.call(Method::POST, &["v1", "placements"], Some(body))
            .await
    }

    /// `GET /v1/farm/assets`: the guest assets' manifest (farm token).
    pub async fn farm_assets(&self) -> Result<AssetsManifest, ClientError> {
        self.call(Method::GET, &["v1", "farm", "assets"], None::<&()>)
            .await
    }

    /// `POST /v1/farm/roots`: the root of a service on an OS as blobs, built on the server
    /// first when it is not cached (this can take minutes; farm token). 404 for an unknown
    /// service or OS.
    pub async fn farm_root(&self, body: &RootBody) -> Result<RootManifest, ClientError> {
        self.call(Method::POST, &["v1", "farm", "roots"], Some(body))
            .await
    }

    /// `GET /v1/farm/os/{os}`: the bare root disk of an OS as a blob; `None` for a layered
    /// OS (farm token).
    pub async fn farm_os(&self, os: &str) -> Result<Option<Blob>, ClientError> {
        self.call(Method::GET, &["v1", "farm", "os", os], None::<&()>)
            .await
    }

    /// `GET /v1/farm/blobs/{sha256}`: a blob's bytes from byte `from` on (a `Range`
    /// request when `from > 0`), received with [`BlobDownload::chunk`]. The server may send
    /// the whole file instead: see [`BlobDownload::offset`]. 404 for a hash the server did
    /// not list in a manifest, 416 when `from` is past the end.
    pub async fn farm_blob(&self, sha256: &str, from: u64) -> Result<BlobDownload, ClientError> {
        let url = self.url(&["v1", "farm", "blobs", sha256]);
        let mut request = self.http.get(url.clone());
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if from > 0 {
            request = request.header(RANGE, format!("bytes={from}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.as_str().trim_end_matches('/').to_owned(),
                source,
            })?;
        let response = error_of(&Method::GET, &url, response).await?;
        let status = response.status();
        let offset = if status == StatusCode::PARTIAL_CONTENT {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range_start);
            match range {
                Some(start) => start,
                None => {
                    return Err(ClientError::Decode {
                        method: Method::GET,
                        path: url.path().to_owned(),
                        status,
                        source: "a 206 answer without a valid Content-Range".into(),
                    });
                }
            }
        } else {
            0
        };
        Ok(BlobDownload {
            body: Download {
                response,
                method: Method::GET,
                path: url.path().to_owned(),
            },
            offset,
        })
    }

    /// `base` with `segments` appended, each percent-encoded.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in Client::new")
            .pop_if_empty()
            .extend(segments);
        url
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        self.call_timed(method, segments, body)
            .await
            .map(|timed| timed.value)
    }

    async fn call_timed<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&impl Serialize>,
    ) -> Result<Timed<T>, ClientError> {
        let url = self.url(segments);
        let response = self.send(method.clone(), url.clone(), body).await?;
        let (value, headers) = decode(method, &url, response).await?;
        let server_timing = headers
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok(Timed {
            value,
            server_timing,
        })
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&impl Serialize>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                url: self.base.as_str().trim_end_matches('/').to_owned(),
                source,
            })
    }
}

/// The response itself when it is a success; its error otherwise.
async fn error_of(
    method: &Method,
    url: &Url,
    response: reqwest::Response,
) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_secs);
    let decode_error = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Decode {
        method: method.clone(),
        path: url.path().to_owned(),
        status,
        source,
    };
    let bytes = response
        .bytes()
        .await
        .map_err(|err| decode_error(Box::new(err)))?;
    let body = error_body(&bytes).map_err(decode_error)?;
    Err(ClientError::Api {
        status,
        body,
        retry_after,
    })
}

/// An error answer's body as hangar's [`ErrorBody`]. One of another shape (a peer
/// agent's, a proxy's page) is an error that quotes its start, so what went wrong is seen.
fn error_body(bytes: &[u8]) -> Result<ErrorBody, Box<dyn std::error::Error + Send + Sync>> {
    serde_json::from_slice(bytes).map_err(|err| {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned();
        format!("{err}; the answer began: {}", text.trim()).into()
    })
}

/// A success's body as `T` with its headers; an error answer as [`ClientError::Api`].
async fn decode<T: DeserializeOwned>(
    method: Method,
    url: &Url,
    response: reqwest::Response,
) -> Result<(T, HeaderMap), ClientError> {
    let response = error_of(&method, url, response).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let decode_error = |source: Box<dyn std::error::Error + Send + Sync>| ClientError::Decode {
        method: method.clone(),
        path: url.path().to_owned(),
        status,
        source,
    };
    let bytes = response
        .bytes()
        .await
        .map_err(|err| decode_error(Box::new(err)))?;
    let value = serde_json::from_slice(&bytes).map_err(|err| decode_error(Box::new(err)))?;
    Ok((value, headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error answer whose body is not hangar's [`ErrorBody`] (a peer agent's, a
    /// proxy's) still says what the body said.
    #[test]
    fn an_error_body_of_another_shape_is_quoted() {
        let foreign = br#"{"kind":"other","message":"no template file x is offered here"}"#;
        let err = error_body(foreign).unwrap_err().to_string();
        assert!(err.contains("no template file x is offered here"), "{err}");
        assert!(err.contains("missing field"), "{err}");
        let ours = br#"{"error":{"code":"not_found","message":"no blob"}}"#;
        assert_eq!(error_body(ours).unwrap().error.message, "no blob");
    }

    #[test]
    fn urls_keep_a_prefix_and_encode_segments() {
        let client = Client::new("http://127.0.0.1:7070").unwrap();
        assert_eq!(
            client.url(&["v1", "vms", "a/b c"]).as_str(),
            "http://127.0.0.1:7070/v1/vms/a%2Fb%20c"
        );
        let prefixed = Client::new("http://h:1/hangar/").unwrap();
        assert_eq!(
            prefixed.url(&["v1", "tasks"]).as_str(),
            "http://h:1/hangar/v1/tasks"
        );
        for bad in ["127.0.0.1:7070", "ftp://h/", "nonsense", "unix:/run/x"] {
            assert!(Client::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_content_range_gives_its_first_byte() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }

    #[test]
    fn server_timing_reads_as_named_stages() {
        let timed = Timed {
            value: (),
            server_timing: "claim;dur=0.4, resume;desc=\"x\";dur=2.1, broken, total;dur=2.6".into(),
        };
        assert_eq!(
            timed.stages(),
            [
                ("claim".to_owned(), 0.4),
                ("resume".to_owned(), 2.1),
                ("total".to_owned(), 2.6)
            ]
        );
    }
}
