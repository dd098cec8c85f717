//! The agent's `GET /metrics`: this machine's own facts, read at scrape time
//! ([`Host::facts`], [`Host::inventory`]), after whatever the process recorded
//! ([`crate::metrics`]), in Prometheus's text format.
//!
//! It tells what the machine runs and has, so it wants a token like the rest of the agent
//! API: the farm token, or the agent's metrics token when one is given (`hangar agent
//! --metrics-token-file`), which opens this route and nothing else, so a Prometheus need
//! not hold the farm token.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `hangar_agent_vms` | gauge | `state` (`running`, `paused`, `gone`) | VMs this host holds, by process state (every state listed, 0 included) |
//! | `hangar_agent_vcpus` | gauge | | CPUs this process may use |
//! | `hangar_agent_memory_bytes`, `hangar_agent_memory_free_bytes` | gauge | | memory; available (`/proc/meminfo`) |
//! | `hangar_agent_disk_free_bytes` | gauge | | free disk under the data directory |
//! | `hangar_agent_load1` | gauge | | one-minute load average |
//! | `hangar_agent_templates` | gauge | | service templates held |

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Unit, describe_gauge, gauge};

use super::wire::{ErrorKind, WireError};
use crate::{Host, HostFacts, RunState, VmRun};

const MIB: f64 = 1_048_576.0;

#[derive(Clone)]
struct MetricsState {
    host: Arc<dyn Host>,
    /// SHA-256 of each token that may read the page.
    tokens: Vec<[u8; 32]>,
}

/// `GET /metrics` over `host`, for callers presenting `farm_token` or, when given,
/// `metrics_token` as `Authorization: Bearer`; 401 with an [`ErrorKind::Unauthorized`]
/// body otherwise, 500 when the host cannot tell its facts.
pub fn router(host: Arc<dyn Host>, farm_token: &str, metrics_token: Option<&str>) -> Router {
    let tokens = std::iter::once(farm_token)
        .chain(metrics_token)
        .filter(|token| !token.is_empty())
        .map(|token| super::serve::digest(token.as_bytes()))
        .collect();
    Router::new()
        .route("/metrics", get(page))
        .with_state(MetricsState { host, tokens })
}

async fn page(State(state): State<MetricsState>, request: Request) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
        .map(|token| super::serve::digest(token.trim_ascii()));
    let allowed = presented.is_some_and(|given| {
        state
            .tokens
            .iter()
            .fold(false, |any, token| any | super::serve::same(&given, token))
    });
    if !allowed {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(WireError::new(
                ErrorKind::Unauthorized,
                "/metrics wants the farm token or the agent's metrics token (Authorization: Bearer TOKEN)",
            )),
        )
            .into_response();
    }
    let (facts, vms) = match (state.host.facts().await, state.host.inventory().await) {
        (Ok(facts), Ok(vms)) => (facts, vms),
        (Err(err), _) | (_, Err(err)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                axum::Json(WireError::from(&err)),
            )
                .into_response();
        }
    };
    let mut body = crate::metrics::render_recorded();
    body.push_str(&crate::metrics::render_snapshot(|| record(&facts, &vms)));
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// The machine's facts and VMs as gauges.
fn record(facts: &HostFacts, vms: &[VmRun]) {
    describe_gauge!(
        "hangar_agent_vms",
        "VMs this host holds, by process state (running, paused, gone)"
    );
    describe_gauge!("hangar_agent_vcpus", "CPUs the agent may use");
    describe_gauge!(
        "hangar_agent_memory_bytes",
        Unit::Bytes,
        "Memory of this host"
    );
    describe_gauge!(
        "hangar_agent_memory_free_bytes",
        Unit::Bytes,
        "Memory available on this host (MemAvailable)"
    );
    describe_gauge!(
        "hangar_agent_disk_free_bytes",
        Unit::Bytes,
        "Free disk under the agent's data directory"
    );
    describe_gauge!("hangar_agent_load1", "One-minute load average of this host");
    describe_gauge!(
        "hangar_agent_templates",
        "Service templates held on this host"
    );
    for (state, label) in [
        (RunState::Running, "running"),
        (RunState::Paused, "paused"),
        (RunState::Gone, "gone"),
    ] {
        let count = vms.iter().filter(|vm| vm.state == state).count();
        gauge!("hangar_agent_vms", "state" => label).set(count as f64);
    }
    gauge!("hangar_agent_vcpus").set(f64::from(facts.vcpus));
    gauge!("hangar_agent_memory_bytes").set(facts.memory_mib as f64 * MIB);
    gauge!("hangar_agent_memory_free_bytes").set(facts.free_memory_mib as f64 * MIB);
    gauge!("hangar_agent_disk_free_bytes").set(facts.free_disk_mib as f64 * MIB);
    gauge!("hangar_agent_load1").set(facts.load);
    gauge!("hangar_agent_templates").set(facts.templates.len() as f64);
}
