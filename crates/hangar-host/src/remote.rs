//! [`RemoteHost`]: a [`Host`] on another machine, reached through its agent's HTTP API
//! ([`crate::agent::router`]).
//!
//! Every call carries the farm token and a deadline sized to the operation: a couple of
//! seconds for facts and listings, a minute for quick VM operations, a quarter of an hour
//! for those that wait for a guest (hand-out, wake, archive, boot), an hour for making a
//! VM (which may build its image first). Connecting gives up after a second, so a host
//! that is down fails fast with [`HostError::Unreachable`].

use std::collections::HashSet;
use std::time::Duration;

use hangar_core::Service;
use reqwest::{Method, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::agent::wire::{
    AdoptBody, ArchiveBody, BootShellBody, CloseForwardsBody, ErrorKind, LeftoversBody, Line,
    MakeBody, TemplatesBody, WireError,
};
use crate::{
    Adopted, ArchiveFacts, ArchiveTier, BootedShell, HandOut, HandedOut, Host, HostError,
    HostFacts, LaunchRecord, MadeVm, PreparedVm, ProgressFn, RunState, ShellPlan, TemplateFacts,
    VmPlan, VmRun, WakeFrom, Woken,
};

/// How long connecting to an agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Facts, inventory, run state, archive facts: answered from memory or `/proc`.
pub const FAST_TIMEOUT: Duration = Duration::from_secs(2);
/// Operations that do not wait for a guest: sleep, stop, destroy, adopt, template
/// listings and removal, leftovers.
pub const SHORT_TIMEOUT: Duration = Duration::from_secs(60);
/// Operations that wait for a guest or write its memory: hand-out, boot of a shell,
/// archive, wake, and whether a template is built (which may resolve images).
pub const LONG_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Preparing and making a VM: may build its image, then boots it to ready.
pub const MAKE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Why a [`RemoteHost`] could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RemoteHostError {
    #[error("bad agent URL {0:?}: want http://HOST:PORT")]
    BadUrl(String),
    #[error("making the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// A machine in the farm, through its agent.
pub struct RemoteHost {
    name: String,
    base: Url,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for RemoteHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHost")
            .field("name", &self.name)
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl RemoteHost {
    /// The host `name` whose agent serves at `base_url` (`http://HOST:PORT`), called with
    /// the farm `token`. Nothing is sent until the first call.
    pub fn new(name: &str, base_url: &str, token: &str) -> Result<RemoteHost, RemoteHostError> {
        let base = Url::parse(base_url).map_err(|_| RemoteHostError::BadUrl(base_url.into()))?;
        if !matches!(base.scheme(), "http" | "https")
            || base.host().is_none()
            || base.cannot_be_a_base()
        {
            return Err(RemoteHostError::BadUrl(base_url.into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(RemoteHostError::Client)?;
        Ok(RemoteHost {
            name: name.to_owned(),
            base,
            token: token.to_owned(),
            http,
        })
    }

    /// The agent's URL as given.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["agent", "v1"]).extend(segments);
        }
        url
    }

    fn unreachable(&self, err: reqwest::Error) -> HostError {
        HostError::Unreachable {
            host: self.name.clone(),
            source: Box::new(err),
        }
    }

    fn protocol(&self, what: String) -> HostError {
        HostError::Remote {
            host: self.name.clone(),
            kind: ErrorKind::Protocol,
            message: what,
        }
    }

    /// Sends a request; an error status becomes the [`HostError`] its body describes.
    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<reqwest::Response, HostError> {
        let mut request = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(&self.token)
            .timeout(timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|err| self.unreachable(err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|err| self.unreachable(err))?;
        Err(match serde_json::from_slice::<WireError>(&bytes) {
            Ok(wire) => wire.into_host_error(&self.name),
            Err(_) => self.protocol(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            )),
        })
    }

    /// A call answered with one JSON value.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(impl Serialize + ?Sized)>,
        timeout: Duration,
    ) -> Result<T, HostError> {
        let response = self.send(method, segments, body, timeout).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|err| self.unreachable(err))?;
        serde_json::from_slice(&bytes)
            .map_err(|err| self.protocol(format!("reading the agent's reply: {err}")))
    }

    /// A call answered with NDJSON [`Line`]s: progress goes to `progress` as it comes,
    /// then the result.
    async fn streamed<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &(impl Serialize + ?Sized),
        progress: ProgressFn,
    ) -> Result<T, HostError> {
        let mut response = self
            .send(Method::POST, segments, Some(body), MAKE_TIMEOUT)
            .await?;
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|err| self.unreachable(err))?;
            let ended = chunk.is_none();
            if let Some(chunk) = chunk {
                pending.extend_from_slice(&chunk);
            } else if !pending.is_empty() {
                pending.push(b'\n');
            }
            while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                let text: Vec<u8> = pending.drain(..=end).collect();
                let text = &text[..text.len() - 1];
                if text.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<Line<T>>(text) {
                    Ok(Line::Progress { stage, percent }) => progress(&stage, percent),
                    Ok(Line::Ok(value)) => return Ok(value),
                    Ok(Line::Err(wire)) => return Err(wire.into_host_error(&self.name)),
                    Err(err) => {
                        return Err(self.protocol(format!("reading the agent's stream: {err}")));
                    }
                }
            }
            if ended {
                return Err(self.protocol(
                    "the agent's stream ended before the operation's result".to_owned(),
                ));
            }
        }
    }
}

/// No body.
const NONE: Option<&()> = None;

#[async_trait::async_trait]
impl Host for RemoteHost {
    fn name(&self) -> &str {
        &self.name
    }

    async fn facts(&self) -> Result<HostFacts, HostError> {
        self.call(Method::GET, &["facts"], NONE, FAST_TIMEOUT).await
    }

    async fn inventory(&self) -> Result<Vec<VmRun>, HostError> {
        self.call(Method::GET, &["inventory"], NONE, FAST_TIMEOUT)
            .await
    }

    async fn run_state(&self, id: &str) -> Result<RunState, HostError> {
        self.call(Method::GET, &["vms", id, "state"], NONE, FAST_TIMEOUT)
            .await
    }

    async fn prepare_vm(
        &self,
        plan: &VmPlan,
        progress: ProgressFn,
    ) -> Result<PreparedVm, HostError> {
        self.streamed(&["vms", &plan.id, "prepare"], plan, progress)
            .await
    }

    async fn make_vm(
        &self,
        plan: &VmPlan,
        prepared: &PreparedVm,
        progress: ProgressFn,
    ) -> Result<MadeVm, HostError> {
        let body = MakeBody {
            plan: plan.clone(),
            prepared: prepared.clone(),
        };
        self.streamed(&["vms", &plan.id, "make"], &body, progress)
            .await
    }

    async fn hand_out(&self, id: &str, how: &HandOut) -> Result<HandedOut, HostError> {
        self.call(
            Method::POST,
            &["vms", id, "hand-out"],
            Some(how),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn boot_shell(
        &self,
        id: &str,
        launch: &LaunchRecord,
        plan: &ShellPlan,
    ) -> Result<BootedShell, HostError> {
        let body = BootShellBody {
            launch: launch.clone(),
            plan: plan.clone(),
        };
        self.call(
            Method::POST,
            &["vms", id, "boot-shell"],
            Some(&body),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn join_segment(&self, id: &str, join: &crate::SegmentJoin) -> Result<(), HostError> {
        self.call(
            Method::POST,
            &["vms", id, "segment"],
            Some(join),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn close_forwards(
        &self,
        id: &str,
        launch: &LaunchRecord,
        guest_ports: &[u16],
    ) -> Result<LaunchRecord, HostError> {
        let body = CloseForwardsBody {
            launch: launch.clone(),
            guest_ports: guest_ports.to_vec(),
        };
        self.call(
            Method::POST,
            &["vms", id, "forwards", "close"],
            Some(&body),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn leave_segment(&self, id: &str) -> Result<(), HostError> {
        self.call(
            Method::POST,
            &["vms", id, "segment", "leave"],
            NONE,
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn sleep(&self, id: &str) -> Result<(), HostError> {
        self.call(Method::POST, &["vms", id, "sleep"], NONE, SHORT_TIMEOUT)
            .await
    }

    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveFacts, HostError> {
        self.call(
            Method::POST,
            &["vms", id, "archive"],
            Some(&ArchiveBody { tier }),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn console(
        &self,
        id: &str,
        from: Option<u64>,
        max: u32,
    ) -> Result<crate::ConsoleChunk, HostError> {
        use crate::agent::wire::{CONSOLE_OFFSET, CONSOLE_SIZE};
        let mut url = self.url(&["vms", id, "console"]);
        {
            let mut query = url.query_pairs_mut();
            if let Some(from) = from {
                query.append_pair("from", &from.to_string());
            }
            query.append_pair("max", &max.to_string());
        }
        let response = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .timeout(FAST_TIMEOUT)
            .send()
            .await
            .map_err(|err| self.unreachable(err))?;
        if !response.status().is_success() {
            let status = response.status();
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(match serde_json::from_slice::<WireError>(&bytes) {
                Ok(wire) => wire.into_host_error(&self.name),
                Err(_) => self.protocol(format!("HTTP {status} from the console route")),
            });
        }
        let number = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .and_then(|text| text.parse::<u64>().ok())
                .ok_or_else(|| self.protocol(format!("the console answer lacks {name}")))
        };
        let (offset, size) = (number(CONSOLE_OFFSET)?, number(CONSOLE_SIZE)?);
        let data = response
            .bytes()
            .await
            .map_err(|err| self.unreachable(err))?
            .to_vec();
        Ok(crate::ConsoleChunk { offset, data, size })
    }

    async fn archive_facts(&self, id: &str) -> Result<Option<ArchiveFacts>, HostError> {
        self.call(Method::GET, &["vms", id, "archive"], NONE, FAST_TIMEOUT)
            .await
    }

    async fn wake(&self, id: &str, from: &WakeFrom) -> Result<Woken, HostError> {
        self.call(Method::POST, &["vms", id, "wake"], Some(from), LONG_TIMEOUT)
            .await
    }

    async fn adopt(
        &self,
        id: &str,
        launch: &LaunchRecord,
        running: bool,
    ) -> Result<Option<Adopted>, HostError> {
        let body = AdoptBody {
            launch: launch.clone(),
            running,
        };
        self.call(
            Method::POST,
            &["vms", id, "adopt"],
            Some(&body),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn migrate_incoming(
        &self,
        id: &str,
        prepared: &PreparedVm,
        source: &LaunchRecord,
    ) -> Result<crate::IncomingVm, HostError> {
        let body = crate::agent::wire::MigrateIncomingBody {
            prepared: prepared.clone(),
            source: source.clone(),
        };
        self.call(
            Method::POST,
            &["vms", id, "migrate", "incoming"],
            Some(&body),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn migrate_start(&self, id: &str, to: &crate::IncomingVm) -> Result<(), HostError> {
        self.call(
            Method::POST,
            &["vms", id, "migrate", "start"],
            Some(to),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn migrate_status(&self, id: &str) -> Result<crate::MigrationProgress, HostError> {
        self.call(
            Method::GET,
            &["vms", id, "migrate", "status"],
            NONE,
            FAST_TIMEOUT,
        )
        .await
    }

    async fn migrate_window(&self, id: &str) -> Result<Option<Duration>, HostError> {
        let window: crate::agent::wire::MigrationWindow = self
            .call(
                Method::GET,
                &["vms", id, "migrate", "window"],
                NONE,
                FAST_TIMEOUT,
            )
            .await?;
        Ok(window.next_us.map(Duration::from_micros))
    }

    async fn migrate_switchover(
        &self,
        id: &str,
        downtime_ms: u64,
    ) -> Result<crate::MigrationProgress, HostError> {
        self.call(
            Method::POST,
            &["vms", id, "migrate", "switchover"],
            Some(&crate::agent::wire::SwitchoverBody { downtime_ms }),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn migrate_abort(&self, id: &str) -> Result<(), HostError> {
        self.call(
            Method::POST,
            &["vms", id, "migrate", "abort"],
            NONE,
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn migrate_finish(&self, id: &str) -> Result<Adopted, HostError> {
        self.call(
            Method::POST,
            &["vms", id, "migrate", "finish"],
            NONE,
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn stop(&self, id: &str) -> Result<(), HostError> {
        self.call(Method::POST, &["vms", id, "stop"], NONE, SHORT_TIMEOUT)
            .await
    }

    async fn destroy(&self, id: &str) -> Result<(), HostError> {
        self.call(Method::POST, &["vms", id, "destroy"], NONE, SHORT_TIMEOUT)
            .await
    }

    async fn remove_leftovers(&self, keep: &HashSet<String>) -> Result<Vec<String>, HostError> {
        let body = LeftoversBody { keep: keep.clone() };
        self.call(
            Method::POST,
            &["leftovers", "remove"],
            Some(&body),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn templates_apply(&self, service: &Service) -> bool {
        match self
            .call(
                Method::POST,
                &["templates", "applies"],
                Some(service),
                SHORT_TIMEOUT,
            )
            .await
        {
            Ok(applies) => applies,
            Err(err) => {
                tracing::warn!(host = %self.name, service = %service.name, error = %crate::local::error_chain(&err), "cannot tell whether templates apply; taking no");
                false
            }
        }
    }

    async fn has_template(&self, service: &Service) -> Result<bool, HostError> {
        self.call(
            Method::POST,
            &["templates", "built"],
            Some(service),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn templates(&self, services: &[Service]) -> Result<Vec<TemplateFacts>, HostError> {
        let body = TemplatesBody {
            services: services.to_vec(),
        };
        self.call(
            Method::POST,
            &["templates", "list"],
            Some(&body),
            SHORT_TIMEOUT,
        )
        .await
    }

    async fn template_bundle(
        &self,
        service: &Service,
    ) -> Result<Option<crate::TemplateBundle>, HostError> {
        // The first ask hashes the template's files (a second or so per 100 MiB).
        self.call(
            Method::POST,
            &["templates", "bundle"],
            Some(service),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn pull_template(
        &self,
        service: &Service,
        bundle: &crate::TemplateBundle,
        from: &crate::PeerSource,
    ) -> Result<TemplateFacts, HostError> {
        let body = crate::agent::wire::PullTemplateBody {
            service: service.clone(),
            bundle: bundle.clone(),
            from: from.clone(),
        };
        self.call(
            Method::POST,
            &["templates", "pull"],
            Some(&body),
            LONG_TIMEOUT,
        )
        .await
    }

    async fn vm_bundle(&self, id: &str) -> Result<crate::VmBundle, HostError> {
        // Hashes the VM's archive and disk layer (a second or so per 100 MiB).
        self.call(Method::POST, &["vms", id, "bundle"], NONE, LONG_TIMEOUT)
            .await
    }

    async fn pull_vm(&self, arrival: &crate::VmArrival) -> Result<crate::PulledVm, HostError> {
        self.call(Method::POST, &["vms", "pull"], Some(arrival), LONG_TIMEOUT)
            .await
    }

    async fn remove_template(&self, id: &str) -> Result<(), HostError> {
        self.call(
            Method::POST,
            &["templates", id, "remove"],
            NONE,
            SHORT_TIMEOUT,
        )
        .await
    }
}
