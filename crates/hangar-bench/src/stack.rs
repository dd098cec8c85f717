//! `hangar bench stack`: how fast a stack (by default `examples/shop.toml`: nginx in front
//! of two http-counter backends and a redis, four VMs on a private segment) comes up and
//! wakes, and how its private segment compares with user-mode networking. In one run:
//!
//! - **stack up from templates**: on a server with templates, the stack is made once (its
//!   services' templates are built after), then made and deleted `--runs` times, every
//!   member a template clone; timed from `POST /v1/stacks` until its task has succeeded
//!   (`api`) and until `GET /` to the front's public endpoint answers 200, i.e. through a
//!   backend (`answering`);
//! - **stack up cold** (`--cold N`, slow): the same on a server without templates, every
//!   member booted (images cached);
//! - **wake from sleep**: the stack put to sleep as a unit, then a connection to the front
//!   wakes it (peers first); timed to the first byte of the answer to `GET /`;
//! - **segment against user-mode** ([`crate::segment`]): two VMs, throughput and request
//!   latency over the segment and over user-mode networking, with their ratio.
//!
//! Where up's time goes comes from the server's log: each member's request (`request_ms`),
//! the member made (`made_ms`, with its endpoints narrowed), its join (`join_ms`, the guest
//! applying the segment and restarting what it must) and joined (`joined_ms`, serving
//! again), medians over the runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_api::{StackAccepted, StackSpec, StackView, TaskView};
use serde::Serialize;
use serde::de::IgnoredAny;

use crate::client::{BenchError, Client};
use crate::endpoints::first_byte;
use crate::server::{BenchServer, ServerOptions, load_average, machine, wait_answering};
use crate::stats::{Summary, summary_or_zero as summary};

/// The example stack, the default.
const SHOP: &str = include_str!("../../../examples/shop.toml");

#[derive(clap::Args)]
pub struct StackBench {
    /// Stack file (TOML) [default: the repository's examples/shop.toml].
    #[arg(long)]
    file: Option<PathBuf>,
    /// Stack ups from templates (and wakes from sleep); the figures are their medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Also this many cold stack ups (every member booted; about 40 s each here).
    #[arg(long, default_value_t = 0)]
    cold: usize,
    /// Size of the file transferred over each path, in MiB (0: skip the segment part).
    #[arg(long, default_value_t = 8)]
    mib: u32,
    /// Transfers per path.
    #[arg(long, default_value_t = 3)]
    transfers: usize,
    /// Small requests per path for latency.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Accelerator for the benchmark's servers and VMs.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Guest asset cache to reuse [default: the default data dir's cache].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// One way of bringing the stack up, summarised.
#[derive(Debug, Serialize)]
struct UpFigures {
    /// `POST /v1/stacks` until its task succeeded.
    api: Summary,
    /// `POST /v1/stacks` until the front answers `GET /` with 200.
    answering: Summary,
    /// The server's `up_ms` (its task from start to end), median ms.
    task_ms: f64,
    /// Member → stage → median ms, from the server's log.
    members: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Debug, Serialize)]
struct Report {
    stack: String,
    members: usize,
    accel: String,
    machine: String,
    /// The 1-minute load average when the run started.
    load_average: f64,
    cold: Option<UpFigures>,
    templates: UpFigures,
    /// A connection to the sleeping stack's front until the first byte of its answer.
    wake_from_sleep: Summary,
    segment: Option<crate::segment::SegmentRun>,
}

fn reply(err: impl std::fmt::Display) -> BenchError {
    BenchError::Reply(err.to_string())
}

pub async fn run(args: StackBench) -> Result<(), BenchError> {
    if args.runs == 0 {
        return Err(BenchError::Usage("--runs must be at least 1".into()));
    }
    let text = match &args.file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|err| BenchError::Usage(format!("{}: {err}", path.display())))?,
        None => SHOP.to_owned(),
    };
    let spec = StackSpec::from_toml(&text).map_err(|err| BenchError::Usage(err.to_string()))?;
    let load = load_average();
    let options =
        |templates| ServerOptions::without_pools(&args.accel, args.cache.clone(), templates);

    let cold = if args.cold > 0 {
        eprintln!("cold stack ups (templates off)...");
        let server = BenchServer::start(&options(false)).map_err(BenchError::Failed)?;
        let mut samples = Samples::default();
        for i in 0..args.cold {
            samples.up(&server, &spec).await?;
            eprintln!("  cold up {}: {:.0} ms", i + 1, ms(samples.answering[i]));
            down(&server.api_client(), &spec.name).await?;
        }
        Some(samples.figures(&server))
    } else {
        None
    };

    eprintln!("stack ups from templates...");
    let server = BenchServer::start(&options(true)).map_err(BenchError::Failed)?;
    let client = server.api_client();
    // Made once so that its services' templates are built.
    Samples::default().up(&server, &spec).await?;
    let services: std::collections::BTreeSet<&str> =
        spec.members.values().map(|m| m.service.as_str()).collect();
    for service in &services {
        server.wait_template(service).await?;
    }
    down(&client, &spec.name).await?;
    let mut samples = Samples::default();
    let mut front = None;
    for i in 0..args.runs {
        if i > 0 {
            down(&client, &spec.name).await?;
        }
        // Let the server finish deleting before the next one.
        tokio::time::sleep(Duration::from_millis(500)).await;
        front = Some(samples.up(&server, &spec).await?);
        eprintln!(
            "  up {}: task done {:.0} ms, front answering {:.0} ms",
            i + 1,
            ms(samples.api[i]),
            ms(samples.answering[i])
        );
    }
    let templates = samples.figures(&server);
    let front = front.expect("at least one run");

    eprintln!("wakes from sleep...");
    let mut wakes = Vec::new();
    for i in 0..args.runs {
        let slept: StackView = client
            .post(
                &format!("/v1/stacks/{}/sleep", spec.name),
                &serde_json::json!({}),
            )
            .await?;
        if slept
            .members
            .iter()
            .any(|m| m.state.as_deref() != Some("sleeping"))
        {
            return Err(reply(format!("not every member sleeps: {slept:?}")));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let took = first_byte(front, "/").map_err(reply)?;
        eprintln!("  wake {}: {:.0} ms", i + 1, ms(took));
        wakes.push(took);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    down(&client, &spec.name).await?;
    let cache = options(true).cache_dir().map_err(BenchError::Failed)?;
    drop(server);

    let segment = if args.mib > 0 {
        eprintln!("segment against user-mode networking...");
        Some(
            crate::segment::figures(&crate::segment::SegmentBench {
                mib: args.mib,
                runs: args.transfers,
                requests: args.requests,
                cache: Some(cache),
                accel: args.accel.clone(),
                segment_net: hangar_vmm::tap::SegmentNet::Auto,
                json: false,
            })
            .await?,
        )
    } else {
        None
    };

    let report = Report {
        stack: spec.name.clone(),
        members: spec.members.len(),
        accel: args.accel.clone(),
        machine: machine(),
        load_average: load,
        cold,
        templates,
        wake_from_sleep: summary(&mut wakes),
        segment,
    };
    crate::report::print_json_or(&report, args.json, print_report);
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The samples of one way of bringing the stack up.
#[derive(Default)]
struct Samples {
    api: Vec<Duration>,
    answering: Vec<Duration>,
    /// Task ids, to find their lines in the server's log.
    tasks: Vec<String>,
}

impl Samples {
    /// Brings the stack up, timed; answers the front's public endpoint.
    async fn up(
        &mut self,
        server: &BenchServer,
        spec: &StackSpec,
    ) -> Result<SocketAddr, BenchError> {
        let client = server.api_client();
        let body = serde_json::to_value(spec).expect("a stack serializes");
        let started = Instant::now();
        let accepted: StackAccepted = client.post("/v1/stacks", &body).await?;
        let task = wait_task(&client, &accepted.task).await?;
        let api = started.elapsed();
        if task.state != "succeeded" {
            return Err(reply(format!(
                "stack up {}: {}",
                task.state,
                task.error.unwrap_or_default()
            )));
        }
        let stack: StackView = client.get(&format!("/v1/stacks/{}", spec.name)).await?;
        let front: SocketAddr = stack
            .members
            .iter()
            .find_map(|m| m.endpoints.values().next())
            .and_then(|addr| addr.parse().ok())
            .ok_or_else(|| reply(format!("no public endpoint in {stack:?}")))?;
        wait_answering(front, started, Duration::from_secs(120))
            .await
            .map_err(BenchError::Failed)?;
        self.answering.push(started.elapsed());
        self.api.push(api);
        self.tasks.push(accepted.task);
        Ok(front)
    }

    fn figures(mut self, server: &BenchServer) -> UpFigures {
        let log = std::fs::read_to_string(server.data_dir().join("server.log")).unwrap_or_default();
        let (task_ms, members) = breakdown(&log, &self.tasks);
        UpFigures {
            api: summary(&mut self.api),
            answering: summary(&mut self.answering),
            task_ms,
            members,
        }
    }
}

/// Polls the task every 10 ms until it ends.
async fn wait_task(client: &Client, id: &str) -> Result<TaskView, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let task: TaskView = client.get(&format!("/v1/tasks/{id}")).await?;
        if task.ended_at.is_some() {
            return Ok(task);
        }
        if Instant::now() > deadline {
            return Err(reply(format!(
                "task {id} still {} after 10 minutes",
                task.state
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn down(client: &Client, name: &str) -> Result<(), BenchError> {
    let _: IgnoredAny = client.delete(&format!("/v1/stacks/{name}")).await?;
    Ok(())
}

/// From the server's log: the median `up_ms` of the stack tasks `tasks`, and for each
/// member the median of each `*_ms` field of its `stack member made` / `joined` lines
/// (the lines of those tasks' stacks: the last `tasks.len()` of each member).
fn breakdown(log: &str, tasks: &[String]) -> (f64, BTreeMap<String, BTreeMap<String, f64>>) {
    let mut up = Vec::new();
    let mut per: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for line in log.lines() {
        let fields = fields(line);
        if line.contains("stack up ended") {
            if fields.get("task").is_some_and(|t| tasks.contains(t))
                && let Some(ms) = fields.get("up_ms").and_then(|v| v.parse().ok())
            {
                up.push(ms);
            }
        } else if line.contains("stack member made") || line.contains("stack member joined") {
            let Some(member) = fields.get("member") else {
                continue;
            };
            for (key, value) in &fields {
                if let (true, Ok(ms)) = (key.ends_with("_ms"), value.parse::<f64>()) {
                    per.entry(member.clone())
                        .or_default()
                        .entry(key.clone())
                        .or_default()
                        .push(ms);
                }
            }
        }
    }
    let median = |values: &mut Vec<f64>| -> f64 {
        let keep = values.len().saturating_sub(tasks.len());
        values.drain(..keep);
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let members = per
        .into_iter()
        .map(|(member, stages)| {
            let stages = stages
                .into_iter()
                .map(|(stage, mut values)| (stage, median(&mut values)))
                .collect();
            (member, stages)
        })
        .collect();
    (median(&mut up), members)
}

/// `key=value` fields of a log line (values unquoted).
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|word| {
            let (key, value) = word.split_once('=')?;
            Some((key.to_owned(), value.trim_matches('"').to_owned()))
        })
        .collect()
}

fn print_report(r: &Report) {
    println!(
        "hangar bench stack: {} ({} members) on {} (accel {}, load average {:.1} at start)\n",
        r.stack, r.members, r.machine, r.accel, r.load_average
    );
    println!("| metric | n | p50 ms | min ms | max ms | server task p50 ms |");
    println!("|---|---|---|---|---|---|");
    let row = |name: &str, s: &Summary, task: Option<f64>| {
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.0} | {} |",
            s.n,
            s.p50_ms,
            s.min_ms,
            s.max_ms,
            task.map_or("-".to_owned(), |ms| format!("{ms:.0}"))
        );
    };
    match &r.cold {
        Some(cold) => {
            row("stack up cold: task done", &cold.api, Some(cold.task_ms));
            row("stack up cold: front answering", &cold.answering, None);
        }
        None => println!("| stack up cold | not measured (--cold N) | | | | |"),
    }
    row(
        "stack up from templates: task done",
        &r.templates.api,
        Some(r.templates.task_ms),
    );
    row(
        "stack up from templates: front answering",
        &r.templates.answering,
        None,
    );
    row("wake from sleep (first byte)", &r.wake_from_sleep, None);

    for (name, figures) in [
        ("from templates", Some(&r.templates)),
        ("cold", r.cold.as_ref()),
    ] {
        let Some(figures) = figures else { continue };
        println!("\nwhere up's time goes ({name}; per member, p50 ms from the server's log)\n");
        println!("| member | request | made | join | joined |");
        println!("|---|---|---|---|---|");
        for (member, stages) in &figures.members {
            let stage = |key: &str| {
                stages
                    .get(key)
                    .map_or("-".to_owned(), |ms| format!("{ms:.0}"))
            };
            println!(
                "| {member} | {} | {} | {} | {} |",
                stage("request_ms"),
                stage("made_ms"),
                stage("join_ms"),
                stage("joined_ms")
            );
        }
    }

    if let Some(seg) = &r.segment {
        let mib = |p: &crate::segment::PathRun| p.throughput_bytes_per_s / f64::from(1u32 << 20);
        println!(
            "\nprivate segment against user-mode networking (two http-counter VMs, {} MiB × {}, {} requests)\n",
            seg.file_bytes >> 20,
            seg.segment.transfers_bytes_per_s.len(),
            seg.segment.requests
        );
        println!("| | segment | user-mode | segment / user-mode |");
        println!("|---|---|---|---|");
        println!(
            "| throughput MiB/s | {:.2} | {:.2} | {:.2} |",
            mib(&seg.segment),
            mib(&seg.user_mode),
            seg.throughput_ratio
        );
        println!(
            "| request latency p50 ms | {:.1} | {:.1} | {:.2} |",
            seg.segment.latency_p50_ms, seg.user_mode.latency_p50_ms, seg.latency_ratio
        );
        println!(
            "| request latency p95 ms | {:.1} | {:.1} | {:.2} |",
            seg.segment.latency_p95_ms,
            seg.user_mode.latency_p95_ms,
            seg.segment.latency_p95_ms / seg.user_mode.latency_p95_ms
        );
        println!(
            "\nswitch: {} frames forwarded, {} dropped",
            seg.switch.frames_forwarded, seg.switch.frames_dropped
        );
    }
    println!(
        "\nlibvirt: not compared (its peer for a segment is a libvirt network, a bridge with \
         TAP devices in the host's network namespace, between two domains; the libvirt \
         harness runs its domains on user-mode networking, passed through \
         <qemu:commandline>)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_stack_parses() {
        let spec = StackSpec::from_toml(SHOP).unwrap();
        assert_eq!(spec.members.len(), 4);
    }

    #[test]
    fn the_log_gives_each_members_stages_of_the_last_runs() {
        let log = "\
2026-12-01T22:00:00Z  INFO hangar_server::stacks::up: stack member made stack=shop member=front vm=v1 served=Cloned request_ms=900 made_ms=950
2026-12-01T22:00:01Z  INFO hangar_server::stacks::up: stack member made stack=shop member=front vm=v2 served=Cloned request_ms=400 made_ms=420
2026-12-01T22:00:02Z  INFO hangar_server::stacks::up: stack member joined stack=shop member=front vm=v2 address=10.213.0.13 join_ms=300 joined_ms=800
2026-12-01T22:00:02Z  INFO hangar_server::stacks::up: stack up ended stack=shop task=t1 state=succeeded up_ms=9000
2026-12-01T22:00:03Z  INFO hangar_server::stacks::up: stack up ended stack=shop task=t2 state=succeeded up_ms=1300
";
        let (up, members) = breakdown(log, &["t2".to_owned()]);
        assert_eq!(up, 1300.0);
        let front = &members["front"];
        assert_eq!(front["request_ms"], 400.0);
        assert_eq!(front["made_ms"], 420.0);
        assert_eq!(front["join_ms"], 300.0);
        assert_eq!(front["joined_ms"], 800.0);
    }
}
