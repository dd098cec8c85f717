//! `hangar-init`: PID 1 in every hangar guest.
//!
//! Boot sequence (each step is reported to the host as a [`GuestMessage::Stage`] once the
//! agent channel is open; steps that ran before it are reported right after it opens, with
//! the uptime at which they finished):
//!
//! 1. `mounts`: proc, sysfs, devtmpfs, devpts, tmpfs on `/run` and `/tmp` ([`mounts`]).
//! 2. `modules`: kernel modules from `/lib/modules/load.order` ([`modules`]).
//! 3. `channel`: the virtio-serial port named [`hangar_proto::AGENT_PORT_NAME`], and `lo`
//!    ([`channel`]).
//! 4. Hello until the host sends its configuration, then apply it ([`config`]) and start
//!    the services ([`services`]).
//! 5. Serve host requests forever ([`exec`], [`listen`]) and report service exits.
//!
//! PID 1 must never exit: when it does the kernel panics. Every error is logged to the
//! console and, where the host can use it, reported on the channel; panics are caught and
//! the main loop restarted.

use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use hangar_proto::{GuestConfig, GuestMessage, HELLO_INTERVAL_MS, HostMessage, PROTOCOL_VERSION};

/// Writes one line to the console (PID 1's stderr is `/dev/console`). Never fails.
macro_rules! console {
    ($($arg:tt)*) => {
        $crate::sys::console_line(format_args!($($arg)*))
    };
}

mod channel;
mod config;
mod exec;
mod hex;
mod listen;
mod merge;
mod modules;
mod mounts;
mod netdev;
mod private_net;
mod reload;
mod services;
mod sys;

use channel::Outbox;

/// Where `load.order` lives in the initramfs.
const LOAD_ORDER: &str = "/lib/modules/load.order";

/// State of the running init once the channel is open.
struct Init {
    outbox: Outbox,
    inbox: Receiver<HostMessage>,
    /// Identity and root the guest was configured with (`None` until configured).
    context: services::Context,
    configured: bool,
    /// The configured services, by name, for restarts.
    services: Vec<hangar_proto::ServiceCommand>,
}

fn main() {
    panic::set_hook(Box::new(|info| {
        console!("panic: {info}");
    }));
    console!("hangar-init {}: starting", env!("CARGO_PKG_VERSION"));
    let mut init = boot();
    loop {
        let result = panic::catch_unwind(AssertUnwindSafe(|| init.run()));
        if result.is_err() {
            console!("main loop panicked; restarting it");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Steps 1–3: mounts, modules, channel. Never fails: errors are logged and boot goes on.
fn boot() -> Init {
    let mut stages: Vec<(&'static str, u64)> = Vec::new();

    for error in mounts::early_mounts() {
        console!("mount: {error}");
    }
    stages.push(("mounts", sys::uptime_ms()));

    match std::fs::read_to_string(LOAD_ORDER) {
        Ok(text) => {
            let report = modules::load_all(&modules::parse_load_order(&text));
            for (path, error) in &report.failed {
                console!("module {}: {error}", path.display());
            }
        }
        Err(error) => console!("cannot read {LOAD_ORDER}: {error}; no modules loaded"),
    }
    stages.push(("modules", sys::uptime_ms()));

    // An exported image carries its own configuration and has no host to talk to.
    let standalone = std::fs::read_to_string(hangar_proto::STANDALONE_CONFIG)
        .ok()
        .and_then(|text| match serde_json::from_str::<GuestConfig>(&text) {
            Ok(config) => Some(config),
            Err(error) => {
                console!(
                    "{}: {error}; waiting for a host",
                    hangar_proto::STANDALONE_CONFIG
                );
                None
            }
        });
    let (outbox, inbox) = match &standalone {
        Some(_) => channel::console_only(),
        None => channel::start(channel::open_agent_port()),
    };
    if let Err(error) = netdev::set_up("lo", true) {
        console!("lo: {error}");
    }
    stages.push(("channel", sys::uptime_ms()));

    for (stage, uptime_ms) in stages {
        outbox.send(&GuestMessage::Stage {
            stage: stage.to_string(),
            uptime_ms,
        });
    }
    let mut init = Init {
        outbox,
        inbox,
        context: services::Context::default(),
        configured: false,
        services: Vec::new(),
    };
    if let Some(config) = standalone {
        console!(
            "hangar-init: configuring from {}",
            hangar_proto::STANDALONE_CONFIG
        );
        init.configured = true;
        init.configure(config);
    }
    init
}

impl Init {
    /// Hello until configured, then serve requests. Returns only by panicking.
    fn run(&mut self) {
        let hello_every = Duration::from_millis(HELLO_INTERVAL_MS);
        let mut last_hello: Option<Instant> = None;
        loop {
            let timeout = if self.configured {
                Duration::from_millis(100)
            } else {
                // Only queue a hello when the previous one has left: writes block while no
                // host is connected, and a backlog of stale hellos helps nobody.
                if last_hello.is_none_or(|t| t.elapsed() >= hello_every)
                    && self.outbox.pending() == 0
                {
                    self.outbox.send(&GuestMessage::Hello {
                        protocol: PROTOCOL_VERSION,
                        kernel: sys::kernel_release(),
                        uptime_ms: sys::uptime_ms(),
                    });
                    last_hello = Some(Instant::now());
                }
                hello_every.saturating_sub(last_hello.map_or(Duration::ZERO, |t| t.elapsed()))
            };
            match self
                .inbox
                .recv_timeout(timeout.max(Duration::from_millis(5)))
            {
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The reader thread never ends; if it did, avoid spinning.
                    console!("channel reader stopped");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            self.reap();
        }
    }

    fn handle(&mut self, message: HostMessage) {
        match message {
            HostMessage::Configure(config) => {
                if self.configured {
                    console!("ignoring a second configure: already configured");
                } else {
                    self.configured = true;
                    self.configure(*config);
                }
            }
            // Normally answered by the channel reader itself (see its module docs).
            message @ (HostMessage::Ping { .. } | HostMessage::Reidentify { .. }) => {
                if let Some(answer) = channel::answer_at_once(&message) {
                    self.outbox.send(&answer);
                }
            }
            HostMessage::Exec {
                id,
                argv,
                timeout_ms,
            } => exec::spawn(
                id,
                argv,
                timeout_ms,
                self.context.clone(),
                self.outbox.clone(),
            ),
            HostMessage::Network { id, network } => {
                let result = self.private_network(&network);
                if let Err(error) = &result {
                    console!("private network: {error}");
                }
                self.outbox.send(&GuestMessage::Reply {
                    id,
                    ok: result.is_ok(),
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: result.err(),
                });
            }
            HostMessage::CheckListen { id, port } => {
                let listening = listen::is_listening(port);
                self.outbox.send(&GuestMessage::Reply {
                    id,
                    ok: listening,
                    code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                    error: None,
                });
            }
        }
    }

    /// Applies a private network, then reloads the services it names for a reload (see
    /// [`reload`]; one that does not reload is restarted) and restarts those it names for a
    /// restart (stopped, reaped, started again with their configured command).
    fn private_network(&mut self, network: &hangar_proto::PrivateNetwork) -> Result<(), String> {
        let root = self
            .context
            .root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/"));
        private_net::apply(network, &root, &services::current_hostname())?;
        let mut restart = network.restart.clone();
        for wanted in &network.reload {
            let pids = services::service_pids(&wanted.name);
            let started = std::time::Instant::now();
            match reload::reload(&pids, wanted.signal, reload::RELOAD_WAIT) {
                Ok(()) => console!(
                    "reloaded service {} ({:?}, {} ms)",
                    wanted.name,
                    wanted.signal,
                    started.elapsed().as_millis()
                ),
                Err(error) => {
                    console!("reloading service {}: {error}; restarting it", wanted.name);
                    restart.push(wanted.name.clone());
                }
            }
        }
        for name in &restart {
            let service = self
                .services
                .iter()
                .find(|s| &s.name == name)
                .cloned()
                .ok_or_else(|| format!("no service {name} to restart"))?;
            for exit in services::stop_service(name, Duration::from_secs(5)) {
                self.report_exit(exit);
            }
            let pid = services::spawn_service(&service, &self.context)
                .map_err(|error| format!("restarting service {name}: {error}"))?;
            self.outbox.send(&GuestMessage::ServiceStarted {
                name: name.clone(),
                pid,
            });
        }
        Ok(())
    }

    /// Step 5: applies the configuration, reporting each stage, then `Configured` or
    /// `Failed`.
    fn configure(&mut self, config: GuestConfig) {
        match self.apply(&config) {
            Ok(()) => self.outbox.send(&GuestMessage::Configured {
                uptime_ms: sys::uptime_ms(),
            }),
            Err((stage, error)) => {
                console!("configure failed at {stage}: {error}");
                self.outbox.send(&GuestMessage::Failed {
                    stage: stage.to_string(),
                    error,
                });
            }
        }
    }

    fn apply(&mut self, config: &GuestConfig) -> Result<(), (&'static str, String)> {
        self.stage("identity", config::apply_identity(&config.identity))?;

        if let Some(network) = &config.network {
            self.stage(
                "network",
                config::configure_network(network)
                    .and_then(|()| config::forget_closed_connections()),
            )?;
        }

        let root = match &config.root {
            Some(root) => {
                let path = PathBuf::from(config::SYSROOT);
                self.stage("root", config::mount_root(root, &path))?;
                self.context.root = Some(path.clone());
                path
            }
            None => PathBuf::from("/"),
        };

        let dns = config
            .network
            .as_ref()
            .map(|n| n.dns.as_slice())
            .unwrap_or(&[]);
        let files = config::write_resolv_conf(&root, dns)
            .and_then(|()| config::write_files(&root, &config.files));
        self.stage("files", files)?;

        self.services = config.services.clone();
        for service in &config.services {
            match services::spawn_service(service, &self.context) {
                Ok(pid) => self.outbox.send(&GuestMessage::ServiceStarted {
                    name: service.name.clone(),
                    pid,
                }),
                Err(error) => {
                    return Err(("services", format!("service {}: {error}", service.name)));
                }
            }
        }
        self.stage("services", Ok(()))?;
        Ok(())
    }

    /// Reports a finished stage, or turns its error into the stage's failure.
    fn stage(
        &self,
        stage: &'static str,
        result: Result<(), String>,
    ) -> Result<(), (&'static str, String)> {
        result.map_err(|error| (stage, error))?;
        self.outbox.send(&GuestMessage::Stage {
            stage: stage.to_string(),
            uptime_ms: sys::uptime_ms(),
        });
        Ok(())
    }

    /// Reaps exited children and reports the services among them.
    fn reap(&self) {
        for exit in services::reap() {
            self.report_exit(exit);
        }
    }

    fn report_exit(&self, exit: services::ServiceExit) {
        console!("service {} exited: {:?}", exit.name, exit.status);
        let (code, signal) = exit.status.code_and_signal();
        self.outbox.send(&GuestMessage::ServiceExited {
            name: exit.name,
            code,
            signal,
        });
    }
}
