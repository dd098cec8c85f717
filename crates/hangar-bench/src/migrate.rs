//! `hangar bench migrate`: live migration and evacuation on a farm of two `hangar agent`s
//! (127.0.0.1, ports and data dirs of their own) under a `hangar server --no-local-host`
//! that holds the VMs' stable endpoints. Real QEMU guests; everything is made through the
//! public API and ends with the benchmark.
//!
//! - **Live migrations**: one `http-counter` VM moves back and forth `--migrations` times
//!   while a client makes a fresh HTTP request to its stable endpoint every millisecond.
//!   Per migration: the longest gap between two answers the client saw, its failed
//!   requests, whether the counter (kept only in guest memory) went on by one each time,
//!   and the task's time; from the server's log line of each (`vm live-migrated`): how long
//!   the endpoint held clients (`held_ms`), how long the guest did not run (`switchover_ms`,
//!   the source's pause to the destination's resume) and the downtime QEMU itself reports
//!   (`qemu_downtime_ms`, its own measure of the same switchover: the peer figure). The
//!   floor is the longest gap the same client sees over 2 s without a migration.
//! - **Evacuation**: `--evacuate` VMs on one host (active, sleeping and archived in turn),
//!   `POST /v1/hosts/{name}/evacuate` timed until its task ends; each VM then answers
//!   through its stable endpoint on the other host (woken by the connection when it slept).
//!
//! libvirt is not run beside it: it migrates only between two libvirt daemons of distinct
//! host identities, which this one-machine benchmark does not make.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::agent::BenchAgent;
use crate::client::BenchError;
use crate::server::{BenchServer, ServerOptions, load_average, machine};
use crate::stats::{self, Summary};

#[derive(clap::Args)]
pub struct MigrateBench {
    /// Service of the migrated VMs (its endpoint answers `GET /` with a count that goes up
    /// by one per request, as http-counter's does).
    #[arg(long, default_value = "http-counter")]
    pub service: String,
    /// Live migrations of one VM, back and forth between the two hosts.
    #[arg(long, default_value_t = 10)]
    pub migrations: usize,
    /// VMs on the evacuated host (active, sleeping, archived in turn); 0: no evacuation.
    #[arg(long, default_value_t = 5)]
    pub evacuate: usize,
    /// Image cache (kernel, initramfs, images), kept between runs.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Accelerator: tcg, kvm or auto.
    #[arg(long, default_value = "tcg")]
    pub accel: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One live migration as the client and the server saw it.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
    /// `POST .../migrate` → its task ended.
    pub took_ms: f64,
    /// The longest time between two answers the polling client saw.
    pub longest_gap_ms: f64,
    pub requests: usize,
    pub failed_requests: usize,
    /// The first few failures, as the client saw them.
    pub failures: Vec<String>,
    /// Clients held by the stable endpoint at the switchover (server's log).
    pub held_ms: u64,
    /// The guest not running: the source's pause to the destination's resume.
    pub switchover_ms: u64,
    /// QEMU's own downtime figure for the switchover.
    pub qemu_downtime_ms: u64,
}

/// The evacuation's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Evacuation {
    pub host: String,
    /// The evacuated VMs' states before it, in order.
    pub states: Vec<String>,
    /// `POST .../evacuate` → its task ended.
    pub took_ms: f64,
    pub moved: u32,
    pub failed: u32,
    /// Each VM's first answer through its stable endpoint afterwards (a sleeping or
    /// archived one woken by that connection).
    pub answered: Summary,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRun {
    pub machine: String,
    pub accel: String,
    pub service: String,
    pub load_average: f64,
    /// The longest gap over 2 s of polling without a migration (the client's floor).
    pub idle_gap_ms: f64,
    pub migrations: Vec<Migration>,
    pub longest_gap: Summary,
    pub held: Summary,
    pub switchover: Summary,
    pub qemu_downtime: Summary,
    pub took: Summary,
    pub failed_requests: usize,
    /// Whether every answer's count was the one before plus one (guest memory kept).
    pub counter_kept: bool,
    pub evacuation: Option<Evacuation>,
}

pub async fn run(args: MigrateBench) -> Result<(), BenchError> {
    let run = figures(&args).await?;
    crate::report::print_json_or(&run, args.json, print_table);
    Ok(())
}

/// The two hosts' names; the first has the higher priority, so new VMs go there.
const HOSTS: [&str; 2] = ["bench-a", "bench-b"];

pub async fn figures(args: &MigrateBench) -> Result<MigrateRun, BenchError> {
    if args.migrations == 0 {
        return Err(BenchError::Usage("--migrations must be at least 1".into()));
    }
    if !crate::agent::agent_available() {
        return Err(BenchError::Failed(
            "this hangar has no `agent` command: no farm to migrate in".into(),
        ));
    }
    let options = ServerOptions::without_pools(&args.accel, args.cache.clone(), false);
    let cache = options.cache_dir().map_err(BenchError::Failed)?;
    eprintln!("starting a hangar server and two agents on 127.0.0.1...");
    let server =
        BenchServer::start_with(&options, &["--no-local-host"]).map_err(BenchError::Failed)?;
    let mut agents = Vec::new();
    for (name, priority) in HOSTS.iter().zip([20, 10]) {
        let agent = BenchAgent::start(&server, &cache, &args.accel, name, priority)
            .map_err(BenchError::Failed)?;
        agent.wait_up(&server).await?;
        agents.push(agent);
    }
    let load = load_average();
    let (idle_gap, migrations) = live_migrations(&server, &agents, args).await?;
    let evacuation = if args.evacuate > 0 {
        Some(evacuation(&server, &agents, args).await?)
    } else {
        None
    };
    drop(agents);
    drop(server);

    let summary = |values: Vec<f64>| {
        let mut durations: Vec<Duration> = values
            .into_iter()
            .map(|ms| Duration::from_secs_f64(ms / 1e3))
            .collect();
        stats::summary_or_zero(&mut durations)
    };
    let of = |field: fn(&Migration) -> f64| summary(migrations.iter().map(field).collect());
    Ok(MigrateRun {
        machine: machine(),
        accel: args.accel.clone(),
        service: args.service.clone(),
        load_average: load,
        idle_gap_ms: stats::ms(idle_gap.longest),
        longest_gap: of(|m| m.longest_gap_ms),
        held: of(|m| m.held_ms as f64),
        switchover: of(|m| m.switchover_ms as f64),
        qemu_downtime: of(|m| m.qemu_downtime_ms as f64),
        took: of(|m| m.took_ms),
        failed_requests: migrations.iter().map(|m| m.failed_requests).sum(),
        counter_kept: idle_gap.counter_kept,
        migrations,
        evacuation,
    })
}

/// The client's view of the floor, then each migration's figures.
async fn live_migrations(
    server: &BenchServer,
    agents: &[BenchAgent],
    args: &MigrateBench,
) -> Result<(Seen, Vec<Migration>), BenchError> {
    eprintln!("a {} VM...", args.service);
    let vm = server.timed_request(&args.service, true).await?;
    let mut at = host_of(server, &vm.vm).await?;

    let poller = Poller::start(vm.endpoint);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let floor = poller.finish().await;
    let mut last_count = floor.last_count;
    let mut kept = floor.counter_kept;

    let mut migrations = Vec::new();
    for round in 0..args.migrations {
        let to = agents
            .iter()
            .map(|agent| agent.name.clone())
            .find(|name| *name != at)
            .expect("two hosts");
        let poller = Poller::start(vm.endpoint);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        run_task(
            server,
            &format!("/v1/vms/{}/migrate", vm.vm),
            &serde_json::json!({ "to": to }),
        )
        .await?;
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let seen = poller.finish().await;
        let source = agents
            .iter()
            .find(|agent| agent.name == at)
            .expect("a host");
        let deadline = Instant::now() + Duration::from_secs(10);
        while source.qemus().contains(&vm.vm) {
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "{at} still runs VM {} 10 s after it moved",
                    vm.vm
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing else asks the VM between two rounds: the first count follows the last.
        kept &= seen.counter_kept
            && seen
                .first_count
                .is_none_or(|first| last_count.is_none_or(|last| first == last + 1));
        last_count = seen.last_count.or(last_count);
        eprintln!(
            "  {}/{}: {at} → {to} in {:.0} ms, longest gap {:.0} ms, {} failed",
            round + 1,
            args.migrations,
            stats::ms(took),
            stats::ms(seen.longest),
            seen.failures.len()
        );
        migrations.push(Migration {
            from: std::mem::replace(&mut at, to.clone()),
            to,
            took_ms: stats::ms(took),
            longest_gap_ms: stats::ms(seen.longest),
            requests: seen.requests,
            failed_requests: seen.failures.len(),
            failures: seen.failures.into_iter().take(3).collect(),
            held_ms: 0,
            switchover_ms: 0,
            qemu_downtime_ms: 0,
        });
    }
    // The server's side of each, from its log (one line per live migration, in order).
    let logged = switchovers(server);
    if logged.len() < migrations.len() {
        return Err(BenchError::Failed(format!(
            "{} live migrations in the server's log, {} made:\n{}",
            logged.len(),
            migrations.len(),
            server.log_tail()
        )));
    }
    for (migration, (held, switchover, qemu_downtime)) in migrations.iter_mut().zip(logged) {
        migration.held_ms = held;
        migration.switchover_ms = switchover;
        migration.qemu_downtime_ms = qemu_downtime;
    }
    server.delete_vm(&vm.vm).await?;
    Ok((
        Seen {
            counter_kept: kept,
            ..floor
        },
        migrations,
    ))
}

/// Makes `--evacuate` VMs on the first host, evacuates it and checks each answers on the
/// other.
async fn evacuation(
    server: &BenchServer,
    agents: &[BenchAgent],
    args: &MigrateBench,
) -> Result<Evacuation, BenchError> {
    let host = agents[0].name.clone();
    eprintln!("{} VMs on {host} to evacuate...", args.evacuate);
    let mut vms = Vec::new();
    let mut states = Vec::new();
    for i in 0..args.evacuate {
        let vm = server.timed_request(&args.service, true).await?;
        let on = host_of(server, &vm.vm).await?;
        if on != host {
            return Err(BenchError::Failed(format!(
                "VM {} was placed on {on}, not {host}",
                vm.vm
            )));
        }
        let state = ["active", "sleeping", "archived"][i % 3];
        if state != "active" {
            server
                .timed_action(&vm.vm, "sleep", &serde_json::json!({}), None)
                .await?;
        }
        if state == "archived" {
            server
                .timed_action(&vm.vm, "archive", &serde_json::json!({}), None)
                .await?;
        }
        states.push(state.to_owned());
        vms.push(vm);
    }
    eprintln!("evacuating {host}...");
    let started = Instant::now();
    let outcome = run_task(
        server,
        &format!("/v1/hosts/{host}/evacuate"),
        &serde_json::json!({}),
    )
    .await;
    let took = started.elapsed();
    let report: hangar_api::EvacuationView = server
        .client
        .get(&format!("/v1/hosts/{host}/evacuation"))
        .await?;
    outcome?;
    let mut answered = Vec::new();
    for vm in &vms {
        let on = host_of(server, &vm.vm).await?;
        if on == host {
            return Err(BenchError::Failed(format!(
                "VM {} is still on {host} after the evacuation",
                vm.vm
            )));
        }
        let asked = Instant::now();
        crate::server::wait_answering(vm.endpoint, asked, Duration::from_secs(120))
            .await
            .map_err(BenchError::Failed)?;
        answered.push(asked.elapsed());
    }
    let _: serde_json::Value = server
        .client
        .post(&format!("/v1/hosts/{host}/resume"), &serde_json::json!({}))
        .await?;
    for vm in &vms {
        server.delete_vm(&vm.vm).await?;
    }
    Ok(Evacuation {
        host,
        states,
        took_ms: stats::ms(took),
        moved: report.moved,
        failed: report.failed,
        answered: stats::summary_or_zero(&mut answered),
    })
}

/// `POST path` (which answers a task) and waits, at most 10 minutes, until the task ends;
/// an error unless it succeeded.
async fn run_task(
    server: &BenchServer,
    path: &str,
    body: &serde_json::Value,
) -> Result<(), BenchError> {
    let accepted: hangar_api::AcceptedView = server.client.post(path, body).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let task: hangar_api::TaskView = server
            .client
            .get(&format!("/v1/tasks/{}", accepted.task))
            .await?;
        if task.ended() {
            return match task.state.as_str() {
                "succeeded" => Ok(()),
                state => Err(BenchError::Failed(format!(
                    "{path}: task {} {state}: {}\n{}",
                    task.id,
                    task.error.unwrap_or_default(),
                    server.log_tail()
                ))),
            };
        }
        if Instant::now() > deadline {
            return Err(BenchError::Failed(format!(
                "{path}: task {} did not end within 10 minutes",
                task.id
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn host_of(server: &BenchServer, vm: &str) -> Result<String, BenchError> {
    let view: hangar_api::VmView = server.client.get(&format!("/v1/vms/{vm}")).await?;
    Ok(view.host)
}

/// `(held_ms, switchover_ms, qemu_downtime_ms)` of each live migration in the server's log.
fn switchovers(server: &BenchServer) -> Vec<(u64, u64, u64)> {
    let log = std::fs::read_to_string(server.data_dir().join("server.log")).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("vm live-migrated"))
        .map(|line| {
            (
                log_field(line, "held_ms").unwrap_or(0),
                log_field(line, "switchover_ms").unwrap_or(0),
                log_field(line, "qemu_downtime_ms").unwrap_or(0),
            )
        })
        .collect()
}

/// The number after ` name=` in a log line.
fn log_field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// What the polling client saw.
#[derive(Debug, Clone, Default)]
struct Seen {
    requests: usize,
    failures: Vec<String>,
    longest: Duration,
    first_count: Option<u64>,
    last_count: Option<u64>,
    /// Every answer's count was the one before plus one.
    counter_kept: bool,
}

/// A client making a fresh HTTP request to an endpoint every millisecond until finished.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Seen>,
}

impl Poller {
    fn start(endpoint: SocketAddr) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen {
                counter_kept: true,
                ..Seen::default()
            };
            let mut last_answer = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                seen.requests += 1;
                match get_count(endpoint) {
                    Ok(count) => {
                        seen.longest = seen.longest.max(last_answer.elapsed());
                        last_answer = Instant::now();
                        seen.first_count.get_or_insert(count);
                        if seen.last_count.is_some_and(|last| count != last + 1) {
                            seen.counter_kept = false;
                        }
                        seen.last_count = Some(count);
                    }
                    Err(err) => seen.failures.push(err),
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        Poller { stop, thread }
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().expect("the poller does not panic"))
            .await
            .expect("joined")
    }
}

/// `GET /` on `endpoint` (HTTP/1.0, a fresh connection): the count in the answer's body.
fn get_count(endpoint: SocketAddr) -> Result<u64, String> {
    use std::io::{Read, Write};
    let exchange = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&endpoint, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET / HTTP/1.0\r\nHost: {endpoint}\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer = exchange().map_err(|err| err.to_string())?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP answer: {answer:?}"))?;
    if !head.starts_with("HTTP/1.") || head.get(9..12) != Some("200") {
        return Err(format!("answered {:?}", head.lines().next().unwrap_or("")));
    }
    body.trim()
        .parse()
        .map_err(|_| format!("not a count: {body:?}"))
}

fn print_table(run: &MigrateRun) {
    println!(
        "hangar bench migrate: {} on {}, accel {}, load average {:.1}",
        run.service, run.machine, run.accel, run.load_average
    );
    println!(
        "{} live migrations, a client polling the stable endpoint every ms \
         (longest gap without a migration: {:.0} ms)",
        run.migrations.len(),
        run.idle_gap_ms
    );
    println!("{:<52} {:>10} {:>10}", "", "median", "max");
    for (what, summary) in [
        ("longest gap a client saw", &run.longest_gap),
        ("clients held at the switchover (hangar)", &run.held),
        (
            "guest not running (source pause → destination run)",
            &run.switchover,
        ),
        ("downtime as QEMU reports it", &run.qemu_downtime),
        ("migration task", &run.took),
    ] {
        println!(
            "{:<52} {:>7.0} ms {:>7.0} ms",
            what, summary.p50_ms, summary.max_ms
        );
    }
    println!(
        "failed requests: {}; counter kept across every move: {}",
        run.failed_requests,
        if run.counter_kept { "yes" } else { "no" }
    );
    if let Some(evacuation) = &run.evacuation {
        println!(
            "evacuation of {} ({} VMs: {}): {:.0} ms, {} moved, {} failed; each answered on \
             its new host in median {:.0} ms, max {:.0} ms",
            evacuation.host,
            evacuation.states.len(),
            evacuation.states.join(", "),
            evacuation.took_ms,
            evacuation.moved,
            evacuation.failed,
            evacuation.answered.p50_ms,
            evacuation.answered.max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::log_field;

    #[test]
    fn reads_a_figure_of_a_log_line() {
        let line = "INFO vm live-migrated vm=vm-1 took_ms=2210 qemu_downtime_ms=71 \
                    switchover_ms=98 held_ms=131 drain_ms=0";
        assert_eq!(log_field(line, "held_ms"), Some(131));
        assert_eq!(log_field(line, "switchover_ms"), Some(98));
        assert_eq!(log_field(line, "qemu_downtime_ms"), Some(71));
        assert_eq!(log_field(line, "ms"), None);
        assert_eq!(log_field(line, "absent"), None);
    }
}
