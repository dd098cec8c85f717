//! The process's metrics recorder, for the `metrics` facade (`counter!`, `gauge!`,
//! `histogram!`), rendered in Prometheus's text format at `GET /metrics` by the server
//! and by the agent.
//!
//! [`install`] puts one recorder in place for the whole process (the server's and the
//! agent's entry points call it; later calls return the same handle). Until it is called,
//! the macros record into nothing, so libraries and unit tests may record freely.
//! Histograms whose name ends in `_seconds` or `_bytes` are rendered as true Prometheus
//! histograms with the buckets below, not as summaries.
//!
//! What is known at scrape time from a source of truth (the store, `/proc`) is rendered
//! per scrape by [`render_snapshot`] into a recorder of its own, so a series that no
//! longer exists (a host removed, a state no VM is in) disappears instead of staying at
//! its last value.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Upper bounds of latency buckets, in seconds: from a millisecond (a migration's downtime,
/// a request served by an active VM) to two minutes (a VM built from nothing).
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds of size buckets, in bytes: 1 MiB to 16 GiB by powers of four.
pub const BYTES_BUCKETS: &[f64] = &[
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
];

/// The Prometheus text format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|builder| {
            builder.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
        })
        .expect("bucket lists are not empty")
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same handle) and
/// returns the handle that renders it. `None` when another recorder was installed first
/// (by an embedding program): then only the per-scrape snapshot is served.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match builder().install_recorder() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!(error = %err, "another metrics recorder is installed; /metrics serves only what is read at scrape time");
                None
            }
        })
        .as_ref()
}

/// What the process's recorder holds, in the text format; empty before [`install`].
pub fn render_recorded() -> String {
    match HANDLE.get().and_then(Option::as_ref) {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Runs `record` against a recorder of its own (the `metrics` macros inside it record
/// there, not into the process's) and renders what it recorded: the gauges read at scrape
/// time from a source of truth.
pub fn render_snapshot(record: impl FnOnce()) -> String {
    let recorder = builder().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, record);
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_renders_only_what_it_recorded() {
        let text = render_snapshot(|| {
            metrics::describe_gauge!("hangar_test_things", "things, for the test");
            metrics::gauge!("hangar_test_things", "kind" => "a").set(3.0);
            metrics::histogram!("hangar_test_wait_seconds").record(0.02);
        });
        assert!(text.contains("# HELP hangar_test_things things, for the test"));
        assert!(text.contains("hangar_test_things{kind=\"a\"} 3"), "{text}");
        // A histogram with buckets, not a summary.
        assert!(
            text.contains("hangar_test_wait_seconds_bucket{le=\"0.025\"} 1"),
            "{text}"
        );
        assert!(!render_snapshot(|| {}).contains("hangar_test_things"));
    }
}
