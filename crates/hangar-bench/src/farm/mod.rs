//! `hangar bench farm`: the farm's control plane under load, through its public API.
//!
//! A throwaway PostgreSQL ([`hangar_test_postgres`]) and a `hangar server --no-local-host
//! --store postgres://...` started as a real process; simulated hosts register with the
//! farm token and send heartbeats (their facts are made up here; no agent runs). Measured:
//! - **placements through the API**: `clients` concurrent clients issue `POST
//!   /v1/placements` (a dry-run placement over the 3 hosts' live facts and the VMs the
//!   store holds) for `duration`: decisions per second, p50 and p99 latency;
//! - **heartbeat cost**: `heartbeats` heartbeats from `heartbeat_hosts` more simulated
//!   hosts; the server's CPU time (utime + stime from `/proc/PID/stat`) over them, less
//!   what it spends idle in the same time, per heartbeat; PostgreSQL's CPU likewise; and
//!   what 1,000 hosts at one heartbeat a second cost;
//! - **pure placement** over 1,000 simulated hosts, in process ([`crate::placement`]);
//! - **remote against local warm-pool grants** ([`remote`]): real guests, on the server's
//!   own host and on a `hangar agent`'s, in the same run.
//!
//! Every process started here (server, PostgreSQL) ends with the benchmark, on error and
//! on panic too: the server by pid when its [`BenchServer`] is dropped, PostgreSQL when
//! this process ends (see [`hangar_test_postgres`]), the agent and its guests by pid.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hangar_api::{Heartbeat, HostFactsView, HostRegistration, HostVmView, PlacementBody};
use serde::Serialize;

mod remote;

use crate::client::BenchError;
use crate::placement;
use crate::server::{BenchServer, ServerOptions, load_average, machine};
use crate::stats::{self, Summary};

#[derive(clap::Args)]
pub struct FarmBench {
    /// Concurrent clients issuing placements.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long the clients issue placements.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Service placed (its size; must be in the demo catalog or `--catalog`).
    #[arg(long, default_value = "http-static")]
    service: String,
    /// VMs recorded on the 3 placement hosts (evenly; active, reported running by their
    /// hosts' heartbeats): the use placement reads.
    #[arg(long, default_value_t = 300)]
    vms: usize,
    /// Heartbeats sent to measure their cost.
    #[arg(long, default_value_t = 2000)]
    heartbeats: usize,
    /// Simulated hosts the heartbeats come from.
    #[arg(long, default_value_t = 100)]
    heartbeat_hosts: usize,
    /// Simulated hosts of the pure placement figure.
    #[arg(long, default_value_t = 1000)]
    pure_hosts: usize,
    /// Catalog for the benchmark's server [default: built-in demo].
    #[arg(long)]
    catalog: Option<std::path::PathBuf>,
    /// Warm-pool grants timed on each side (server's own host, agent's host); 0 skips
    /// the remote-against-local comparison.
    #[arg(long, default_value_t = 6)]
    grants: usize,
    /// Pool size for the grants (they are taken in bursts of this many).
    #[arg(long, default_value_t = 2)]
    pool: u32,
    /// Accelerator for the guests of the grant comparison.
    #[arg(long, default_value = "auto")]
    accel: String,
    /// Guest asset cache to reuse (kernel, images) for the grant comparison [default: the
    /// default data dir's cache].
    #[arg(long)]
    cache: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The server's own host's name.
pub const LOCAL_HOST: &str = hangar_server::manager::LOCAL_HOST;

/// The 3 simulated hosts placements choose from.
const PLACEMENT_HOSTS: [&str; 3] = ["sim-1", "sim-2", "sim-3"];

/// Placements through the API.
#[derive(Debug, Clone, Serialize)]
pub struct Placements {
    pub hosts: usize,
    /// VMs the store holds on those hosts.
    pub vms: usize,
    pub clients: usize,
    pub seconds: f64,
    pub decisions: usize,
    /// Answers other than 200 (none expected).
    pub errors: usize,
    pub per_s: f64,
    pub latency: Summary,
    /// How many decisions chose each host.
    pub chosen: BTreeMap<String, usize>,
}

/// What heartbeats cost the control plane.
#[derive(Debug, Clone, Serialize)]
pub struct Heartbeats {
    pub hosts: usize,
    pub heartbeats: usize,
    pub seconds: f64,
    /// The server's CPU time while they were sent.
    pub server_cpu_ms: f64,
    /// The server's CPU time when idle (its loops, the 3 placement hosts' heartbeats),
    /// scaled to the same wall time; subtracted from `server_cpu_ms`.
    pub server_idle_cpu_ms: f64,
    /// (server_cpu_ms - server_idle_cpu_ms) / heartbeats.
    pub server_cpu_ms_per_heartbeat: f64,
    /// PostgreSQL's CPU time per heartbeat, likewise (its idle time subtracted); `None`
    /// when its processes could not be found.
    pub postgres_cpu_ms_per_heartbeat: Option<f64>,
    /// 1,000 hosts at one heartbeat a second: the share of one core the server spends.
    pub thousand_hosts_server_core_share: f64,
    pub latency: Summary,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    /// 1-minute load average when the run started and when it ended.
    load_average: [f64; 2],
    /// Whether this benchmark binary is an optimised build (the server is the `hangar`
    /// next to it, built with it).
    release_build: bool,
    placements: Placements,
    heartbeats: Heartbeats,
    pure_placement: placement::PlacementRun,
    /// Remote against local warm-pool grants, when measured.
    remote_grants: Option<remote::RemoteGrants>,
    /// Why they were not, when not.
    remote_grants_skipped: Option<String>,
    /// The processes the measures ran against (all ended by now): the server and
    /// PostgreSQL's postmaster, when found.
    server_pid: u32,
    postgres_pid: Option<u32>,
    rows: Vec<Row>,
    seconds: f64,
}

/// One line of the table: a figure and its target.
#[derive(Serialize)]
struct Row {
    measure: String,
    figure: String,
    target: String,
    /// Whether the target is met; `None` where there is no target.
    met: Option<bool>,
}

pub async fn run(args: FarmBench) -> Result<(), BenchError> {
    if args.clients == 0 || args.heartbeats == 0 || args.heartbeat_hosts == 0 {
        return Err(BenchError::Usage(
            "--clients, --heartbeats and --heartbeat-hosts must be at least 1".into(),
        ));
    }
    let started = Instant::now();
    let load_before = load_average();
    eprintln!("starting PostgreSQL...");
    let database = tokio::task::spawn_blocking(|| {
        std::panic::catch_unwind(hangar_test_postgres::TestDatabase::create)
            .map_err(|panic| panic_text(&panic))
    })
    .await
    .map_err(|err| BenchError::Failed(err.to_string()))?
    .map_err(BenchError::Failed)?;
    let postgres = PostgresCpu::find(database.url());
    eprintln!("starting a control plane on it (no host of its own)...");
    let server = BenchServer::start_with(
        &ServerOptions {
            accel: "auto".into(),
            catalog: args.catalog.clone(),
            cache: None,
            pool_memory_mib: 0,
            templates: false,
        },
        &["--no-local-host", "--store", database.url()],
    )
    .map_err(BenchError::Failed)?;
    let token = std::fs::read_to_string(server.data_dir().join("farm.token"))
        .map_err(|err| BenchError::Failed(format!("the server's farm token: {err}")))?
        .trim()
        .to_owned();
    let admin = server.token().map_err(BenchError::Failed)?;
    let mut farm = Farm::new(&server.url, &token, &admin, args.clients)?;
    eprintln!(
        "recording {} VMs on the {} hosts...",
        args.vms,
        PLACEMENT_HOSTS.len()
    );
    farm.seed_vms(database.url(), &args.service, 256, args.vms)
        .await?;

    for name in PLACEMENT_HOSTS {
        farm.register(name).await?;
    }
    let beating = farm.keep_beating(PLACEMENT_HOSTS.iter().map(|h| h.to_string()).collect());

    eprintln!(
        "placements through the API: {} clients for {:?}...",
        args.clients, args.duration
    );
    let body = PlacementBody {
        service: Some(args.service.clone()),
        ..PlacementBody::default()
    };
    // Warm up: connections opened, the farm's hosts known to the scheduler.
    farm.placements(&body, args.clients, Duration::from_millis(500))
        .await?;
    let placements = farm.placements(&body, args.clients, args.duration).await?;
    if placements.errors > 0 || placements.decisions == 0 {
        return Err(BenchError::Failed(format!(
            "{} of {} placements failed",
            placements.errors,
            placements.decisions + placements.errors
        )));
    }

    eprintln!(
        "heartbeat cost: {} heartbeats from {} hosts...",
        args.heartbeats, args.heartbeat_hosts
    );
    let heartbeats = farm
        .heartbeat_cost(
            server.pid(),
            postgres.as_ref(),
            args.heartbeat_hosts,
            args.heartbeats,
        )
        .await?;
    beating.stop();

    eprintln!("pure placement over {} hosts...", args.pure_hosts);
    let hosts = args.pure_hosts;
    let pure = tokio::task::spawn_blocking(move || placement::run(hosts, Duration::from_secs(2)))
        .await
        .map_err(|err| BenchError::Failed(err.to_string()))?;

    let server_pid = server.pid();
    let postgres_pid = postgres.as_ref().map(|pg| pg.postmaster);
    drop(server);
    drop(database);

    let (remote_grants, remote_grants_skipped) = if args.grants == 0 {
        (None, Some("--grants 0".to_owned()))
    } else if !crate::agent::agent_available() {
        (
            None,
            Some("this `hangar` has no `agent` command".to_owned()),
        )
    } else {
        eprintln!(
            "warm-pool grants, server's own host against an agent's ({} each)...",
            args.grants
        );
        (
            Some(
                remote::run(
                    &args.service,
                    args.pool,
                    args.grants,
                    &args.accel,
                    args.cache.clone(),
                )
                .await?,
            ),
            None,
        )
    };

    let mut rows = rows(&placements, &heartbeats, &pure);
    match (&remote_grants, &remote_grants_skipped) {
        (Some(grants), _) => rows.push(Row {
            measure: format!(
                "warm-pool grant p50, agent's host − server's own ({}, {} each)",
                grants.service, grants.local.n
            ),
            figure: format!(
                "{:+.2} ms ({:.2} → {:.2} ms)",
                grants.added_p50_ms, grants.local.p50_ms, grants.remote.p50_ms
            ),
            target: "≤ 2 ms".into(),
            met: Some(grants.added_p50_ms <= 2.0),
        }),
        (None, why) => rows.push(Row {
            measure: "warm-pool grant p50, agent's host − server's own".into(),
            figure: format!("not measured: {}", why.as_deref().unwrap_or("")),
            target: "≤ 2 ms".into(),
            met: None,
        }),
    }
    let report = Report {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        machine: machine(),
        load_average: [load_before, load_average()],
        release_build: !cfg!(debug_assertions),
        placements,
        heartbeats,
        pure_placement: pure,
        remote_grants,
        remote_grants_skipped,
        server_pid,
        postgres_pid,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::report::print_json_or(&report, args.json, print_report);
    Ok(())
}

fn rows(
    placements: &Placements,
    heartbeats: &Heartbeats,
    pure: &placement::PlacementRun,
) -> Vec<Row> {
    let pg = heartbeats
        .postgres_cpu_ms_per_heartbeat
        .map_or("not measured".to_owned(), |ms| format!("{ms:.3} ms"));
    vec![
        Row {
            measure: format!(
                "placements/s through the API (PostgreSQL, {} hosts, {} VMs, {} clients)",
                placements.hosts, placements.vms, placements.clients
            ),
            figure: format!("{:.0}/s", placements.per_s),
            target: "≥ 500/s".into(),
            met: Some(placements.per_s >= 500.0),
        },
        Row {
            measure: "  placement latency p50 / p99".into(),
            figure: format!(
                "{:.2} / {:.2} ms",
                placements.latency.p50_ms, placements.latency.p99_ms
            ),
            target: String::new(),
            met: None,
        },
        Row {
            measure: format!(
                "heartbeat: server CPU per heartbeat ({} heartbeats, {} hosts)",
                heartbeats.heartbeats, heartbeats.hosts
            ),
            figure: format!("{:.3} ms", heartbeats.server_cpu_ms_per_heartbeat),
            target: "< 1 ms".into(),
            met: Some(heartbeats.server_cpu_ms_per_heartbeat < 1.0),
        },
        Row {
            measure: "  heartbeat: PostgreSQL CPU per heartbeat".into(),
            figure: pg,
            target: String::new(),
            met: None,
        },
        Row {
            measure: "1,000 hosts at 1 heartbeat/s: share of one core (server)".into(),
            figure: format!(
                "{:.0}%",
                heartbeats.thousand_hosts_server_core_share * 100.0
            ),
            target: "< 100%".into(),
            met: Some(heartbeats.thousand_hosts_server_core_share < 1.0),
        },
        Row {
            measure: format!("pure placement decisions/s, {} simulated hosts", pure.hosts),
            figure: format!("{:.0}/s ({:.1} µs each)", pure.per_s, pure.mean_us),
            target: String::new(),
            met: None,
        },
    ]
}

fn print_report(report: &Report) {
    println!(
        "hangar bench farm on {} ({} build), load {:.1} → {:.1}, {:.0} s",
        report.machine,
        if report.release_build {
            "release"
        } else {
            "debug"
        },
        report.load_average[0],
        report.load_average[1],
        report.seconds
    );
    println!("a control plane on PostgreSQL with simulated hosts, measured through its API\n");
    println!("| measure | figure | target | met |");
    println!("|---|---|---|---|");
    for row in &report.rows {
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!(
            "| {} | {} | {} | {met} |",
            row.measure, row.figure, row.target
        );
    }
    let hb = &report.heartbeats;
    println!(
        "\n1,000 hosts × 1 heartbeat/s × {:.3} ms = {:.0} ms of server CPU per second = {:.0}% of one core",
        hb.server_cpu_ms_per_heartbeat,
        hb.server_cpu_ms_per_heartbeat * 1000.0,
        hb.thousand_hosts_server_core_share * 100.0
    );
    if let Some(pg) = hb.postgres_cpu_ms_per_heartbeat {
        println!(
            "PostgreSQL: 1,000 × {pg:.3} ms = {:.0}% of one core",
            pg * 100.0
        );
    }
}

/// The simulated hosts' side: registration and heartbeats with the farm token, and the
/// placement clients.
#[derive(Clone)]
struct Farm {
    farm: hangar_api::Client,
    api: hangar_api::Client,
    /// The VMs each simulated host runs (what its heartbeats report).
    vms: Arc<BTreeMap<String, Vec<HostVmView>>>,
}

/// The facts a simulated host reports: a machine of at least 32 CPUs and 128 GiB, larger
/// when it holds more recorded VMs (`vms`), so that each keeps room for 64 more 1-vCPU,
/// 256 MiB VMs at the server's overcommit of guest vCPUs.
fn facts(vms: usize) -> HostFactsView {
    let overcommit = hangar_server::scheduler::VCPU_OVERCOMMIT as usize;
    let vcpus = (vms + 64).div_ceil(overcommit).max(32);
    let memory_mib = ((vms as u64 + 64) * 256).max(131_072);
    HostFactsView {
        hypervisor: "qemu".into(),
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        memory_mib,
        free_memory_mib: memory_mib / 2,
        free_disk_mib: 500_000,
        load: 0.5,
        ..HostFactsView::default()
    }
}

/// The incarnation every simulated host registers with (one run of this benchmark).
fn incarnation() -> String {
    format!("bench-{}", std::process::id())
}

impl Farm {
    fn new(url: &str, token: &str, admin: &str, clients: usize) -> Result<Farm, BenchError> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(clients.max(8))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|err| BenchError::Failed(err.to_string()))?;
        let api = hangar_api::Client::with_http(url, http)
            .map_err(|err| BenchError::Failed(err.to_string()))?;
        Ok(Farm {
            farm: api.clone().with_token(token),
            api: api.with_token(admin),
            vms: Arc::default(),
        })
    }

    /// Registers the simulated host `name` (its address answers nothing: placements are
    /// dry runs, nothing is ever asked of it).
    async fn register(&self, name: &str) -> Result<(), BenchError> {
        let registration = HostRegistration {
            name: name.to_owned(),
            address: "http://127.0.0.1:9".into(),
            incarnation: incarnation(),
            labels: BTreeMap::new(),
            cost: 1,
            priority: 0,
            facts: facts(self.running(name).len()),
            vms: self.running(name),
        };
        self.farm
            .register_host(&registration)
            .await
            .map(|_| ())
            .map_err(|err| BenchError::Failed(format!("registering {name}: {err}")))
    }

    /// What host `name` reports running.
    fn running(&self, name: &str) -> Vec<HostVmView> {
        self.vms.get(name).cloned().unwrap_or_default()
    }

    /// Records `count` active VMs of `service` in the store, spread evenly over the
    /// placement hosts, and has those hosts report them running from now on.
    async fn seed_vms(
        &mut self,
        store_url: &str,
        service: &str,
        memory_mib: u32,
        count: usize,
    ) -> Result<(), BenchError> {
        let store = hangar_store::open(store_url)
            .await
            .map_err(|err| BenchError::Failed(format!("the benchmark's store: {err}")))?;
        let now = hangar_store::now_ms();
        let mut vms: BTreeMap<String, Vec<HostVmView>> = BTreeMap::new();
        for i in 0..count {
            let host = PLACEMENT_HOSTS[i % PLACEMENT_HOSTS.len()];
            let id = format!("vm-bench-{i:05}");
            let record = hangar_store::VmRecord {
                id: id.clone(),
                host: host.to_owned(),
                services: vec![service.to_owned()],
                env: BTreeMap::new(),
                mode: hangar_core::Mode::Dedicated,
                owner: "bench".into(),
                state: hangar_core::VmState::Active,
                endpoints: BTreeMap::new(),
                direct_endpoints: BTreeMap::new(),
                spec: serde_json::Value::Null,
                pid: None,
                error: None,
                created_at_ms: now,
                updated_at_ms: now,
                last_used_at_ms: now,
                state_since_ms: now,
                boot_ms: None,
                memory_mib,
                vcpus: 1,
                pool: None,
                os: None,
                isolation: None,
            };
            store
                .insert_vm(&record)
                .await
                .map_err(|err| BenchError::Failed(format!("recording {id}: {err}")))?;
            vms.entry(host.to_owned()).or_default().push(HostVmView {
                id,
                state: "running".into(),
            });
        }
        self.vms = Arc::new(vms);
        Ok(())
    }

    async fn heartbeat(&self, name: &str) -> Result<(), BenchError> {
        let heartbeat = Heartbeat {
            incarnation: incarnation(),
            facts: facts(self.running(name).len()),
            vms: self.running(name),
        };
        self.farm
            .heartbeat(name, &heartbeat)
            .await
            .map(|_| ())
            .map_err(|err| BenchError::Failed(format!("heartbeat of {name}: {err}")))
    }

    /// Sends a heartbeat for each of `hosts` every second until the answer is stopped.
    fn keep_beating(&self, hosts: Vec<String>) -> Beating {
        let stop = Arc::new(AtomicBool::new(false));
        let farm = self.clone();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            while !stopped.load(Ordering::Relaxed) {
                for host in &hosts {
                    if let Err(err) = farm.heartbeat(host).await {
                        eprintln!("warning: {err}");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Beating { stop, task }
    }

    /// `clients` clients issue `body` as placements, back to back, for `duration`.
    async fn placements(
        &self,
        body: &PlacementBody,
        clients: usize,
        duration: Duration,
    ) -> Result<Placements, BenchError> {
        let started = Instant::now();
        let until = started + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let api = self.api.clone();
            let body = body.clone();
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut chosen: BTreeMap<String, usize> = BTreeMap::new();
                let mut errors = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    match api.placement(&body).await {
                        Ok(placed) => {
                            latencies.push(sent.elapsed());
                            *chosen.entry(placed.host).or_default() += 1;
                        }
                        Err(err) => errors.push(err.to_string()),
                    }
                }
                (latencies, chosen, errors)
            });
        }
        let mut latencies = Vec::new();
        let mut chosen: BTreeMap<String, usize> = BTreeMap::new();
        let mut errors = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (l, c, e) = joined.map_err(|err| BenchError::Failed(err.to_string()))?;
            latencies.extend(l);
            for (host, n) in c {
                *chosen.entry(host).or_default() += n;
            }
            errors.extend(e);
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some(first) = errors.first() {
            eprintln!(
                "warning: {} placements failed, first: {first}",
                errors.len()
            );
        }
        let decisions = latencies.len();
        let latency = stats::summary(&mut latencies).ok_or_else(|| {
            BenchError::Failed(format!(
                "no placement succeeded: {}",
                errors.first().map_or("", String::as_str)
            ))
        })?;
        Ok(Placements {
            hosts: PLACEMENT_HOSTS.len(),
            vms: self.vms.values().map(Vec::len).sum(),
            clients,
            seconds,
            decisions,
            errors: errors.len(),
            per_s: decisions as f64 / seconds,
            latency,
            chosen,
        })
    }

    /// Registers `hosts` more simulated hosts, then sends `count` heartbeats from them
    /// (round robin, 4 at a time) and measures the server's and PostgreSQL's CPU time over
    /// them, less their CPU time over as long idle.
    async fn heartbeat_cost(
        &self,
        server_pid: u32,
        postgres: Option<&PostgresCpu>,
        hosts: usize,
        count: usize,
    ) -> Result<Heartbeats, BenchError> {
        let names: Vec<String> = (0..hosts).map(|i| format!("beat-{i:04}")).collect();
        for name in &names {
            self.register(name).await?;
        }
        // Idle: what the server and PostgreSQL spend without these heartbeats.
        let idle_for = Duration::from_secs(2);
        let server_idle = cpu_over(server_pid, postgres, idle_for).await?;

        let server_before = process_cpu_ms(server_pid)?;
        let pg_before = postgres.map(PostgresCpu::cpu_ms);
        let started = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let names = Arc::new(names);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let farm = self.clone();
            let (next, names) = (next.clone(), names.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<_, BenchError>(latencies);
                    }
                    let sent = Instant::now();
                    farm.heartbeat(&names[i % names.len()]).await?;
                    latencies.push(sent.elapsed());
                }
            });
        }
        let mut latencies = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            latencies.extend(joined.map_err(|err| BenchError::Failed(err.to_string()))??);
        }
        let elapsed = started.elapsed();
        let server_cpu_ms = process_cpu_ms(server_pid)? - server_before;
        let scale = elapsed.as_secs_f64() / idle_for.as_secs_f64();
        let server_idle_cpu_ms = server_idle.0 * scale;
        let per = (server_cpu_ms - server_idle_cpu_ms).max(0.0) / count as f64;
        let pg_per = match (pg_before, server_idle.1, postgres) {
            (Some(before), Some(idle), Some(pg)) => {
                Some((pg.cpu_ms() - before - idle * scale).max(0.0) / count as f64)
            }
            _ => None,
        };
        Ok(Heartbeats {
            hosts,
            heartbeats: count,
            seconds: elapsed.as_secs_f64(),
            server_cpu_ms,
            server_idle_cpu_ms,
            server_cpu_ms_per_heartbeat: per,
            postgres_cpu_ms_per_heartbeat: pg_per,
            // 1,000 heartbeats a second × `per` ms each, per 1,000 ms of one core.
            thousand_hosts_server_core_share: per * 1000.0 / 1000.0,
            latency: stats::summary(&mut latencies).expect("count ≥ 1 heartbeats"),
        })
    }
}

/// The heartbeats of [`Farm::keep_beating`]; stopped when dropped.
struct Beating {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Beating {
    fn stop(self) {}
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// The CPU time of the server and of PostgreSQL over `idle` of doing nothing.
async fn cpu_over(
    server_pid: u32,
    postgres: Option<&PostgresCpu>,
    idle: Duration,
) -> Result<(f64, Option<f64>), BenchError> {
    let server = process_cpu_ms(server_pid)?;
    let pg = postgres.map(PostgresCpu::cpu_ms);
    tokio::time::sleep(idle).await;
    Ok((
        process_cpu_ms(server_pid)? - server,
        pg.zip(postgres).map(|(before, pg)| pg.cpu_ms() - before),
    ))
}

/// A process's user + system CPU time so far, in milliseconds, and that of its children
/// it has waited for (with `children`).
fn cpu_ms(pid: u32, children: bool) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat, children).map(|ticks| ticks as f64 * 1000.0 / clock_ticks())
}

fn process_cpu_ms(pid: u32) -> Result<f64, BenchError> {
    cpu_ms(pid, false).ok_or_else(|| BenchError::Failed(format!("cannot read /proc/{pid}/stat")))
}

/// utime + stime (+ cutime + cstime with `children`) of a `/proc/PID/stat` line, in clock
/// ticks. The command name (field 2) may hold spaces and parentheses: fields are counted
/// after its last `)`.
fn parse_cpu_ticks(stat: &str, children: bool) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (3), ppid (4), ... utime (14), stime (15), cutime (16),
    // cstime (17); index = field - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let own = field(14)? + field(15)?;
    Some(if children {
        own + field(16)? + field(17)?
    } else {
        own
    })
}

/// The parent pid of a `/proc/PID/stat` line.
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// PostgreSQL's processes for one cluster: its postmaster (found by the port on its
/// command line) and its children (the backends serving connections).
struct PostgresCpu {
    postmaster: u32,
}

impl PostgresCpu {
    /// The postmaster listening on the port of `url`, if it runs on this machine.
    fn find(url: &str) -> Option<PostgresCpu> {
        let port = url
            .rsplit_once('@')
            .map_or(url, |(_, rest)| rest)
            .split('/')
            .next()?
            .rsplit_once(':')?
            .1
            .to_owned();
        let postmaster = std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .find_map(|entry| {
                let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
                let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                let is_postgres = args.first()?.ends_with(b"/postgres");
                let on_port = args
                    .windows(2)
                    .any(|pair| pair[0] == b"-p" && pair[1] == port.as_bytes());
                (is_postgres && on_port).then_some(pid)
            })?;
        Some(PostgresCpu { postmaster })
    }

    /// CPU time of the postmaster, the children it has waited for, and its living
    /// children, in milliseconds.
    fn cpu_ms(&self) -> f64 {
        let mut total = cpu_ms(self.postmaster, true).unwrap_or(0.0);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return total;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_str()
                .is_none_or(|n| n.parse::<u32>().is_err())
            {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if parse_ppid(&stat) == Some(self.postmaster)
                && let Some(ticks) = parse_cpu_ticks(&stat, false)
            {
                total += ticks as f64 * 1000.0 / clock_ticks();
            }
        }
        total
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "PostgreSQL could not be started".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_and_parents_are_read_after_the_command_name() {
        let stat = "4242 (post gres) (x)) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 1 0 1000 0 0";
        assert_eq!(parse_cpu_ticks(stat, false), Some(300));
        assert_eq!(parse_cpu_ticks(stat, true), Some(310));
        assert_eq!(parse_ppid(stat), Some(17));
        assert_eq!(parse_cpu_ticks("garbage", false), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_cpu_ticks(&own, true).is_some());
        assert_eq!(parse_ppid(&own), Some(std::os::unix::process::parent_id()));
    }
}
