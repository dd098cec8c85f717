//! `hangar request`: a service or a machine configuration; prints the address of a VM
//! offering it.

use std::io::IsTerminal;
use std::time::Duration;

use hangar_api::Served;

use super::parse_env;
use crate::error::CliError;
use crate::output::{print_json, wire_name};
use hangar_api::client::Client;

#[derive(clap::Args)]
pub struct RequestArgs {
    /// Service name (see `hangar services`); or give a configuration with --vcpus etc.
    #[arg(required_unless_present = "memory")]
    service: Option<String>,
    /// Configuration: at least this many vCPUs.
    #[arg(long, requires = "memory", conflicts_with = "service")]
    vcpus: Option<u32>,
    /// Configuration: memory in MiB, `N` or a range `MIN-MAX`.
    #[arg(long, value_parser = parse_memory, conflicts_with = "service")]
    memory: Option<(u32, u32)>,
    /// Configuration: OS as `NAME` or `NAME@MIN_VERSION`.
    #[arg(long, requires = "memory", default_value = "busybox")]
    os: String,
    /// Configuration: an application the VM must offer (repeatable).
    #[arg(long = "app", requires = "memory")]
    apps: Vec<String>,
    /// Configuration: least root disk in MiB (checked against the OS's and the
    /// applications' minimums).
    #[arg(long, value_name = "MIB", requires = "memory")]
    disk: Option<u32>,
    /// Slice a larger VM down to the requested memory and vCPUs.
    #[arg(long)]
    exact_size: bool,
    /// Environment setting KEY=VALUE (repeatable), e.g. --env os=busybox.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A VM of your own, never shared with other requests.
    #[arg(long)]
    dedicated: bool,
    /// How long to wait for a VM (e.g. 30s, 2m); past it the answer is "try again shortly".
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
    /// Isolation group: a VM made for this request never shares a host with another VM of
    /// GROUP (a-z, 0-9, '-', '_', '.').
    #[arg(long, value_name = "GROUP")]
    isolate: Option<String>,
    /// Only on hosts labelled KEY=VALUE (repeatable; every one must match).
    #[arg(long = "on", value_name = "KEY=VALUE", value_parser = parse_env)]
    on: Vec<(String, String)>,
    /// What the VM's guest may reach out of it: `none` (the default, also `loopback`: no
    /// connection out; its endpoints still answer), `open` (anywhere this host reaches), `segment` (a stack
    /// member: `none` on its user-mode NIC), or `allow=HOST:PORT[,HOST:PORT…]` (only
    /// those, each reached by the guest at 10.0.2.100, .101, … on the target's port; a
    /// named target is in the guest's /etc/hosts under its name).
    #[arg(long, value_name = "POLICY", value_parser = parse_egress)]
    egress: Option<hangar_core::EgressPolicy>,
    /// Retries with the same key (by the same user) get the first answer, the same VM,
    /// instead of another VM.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_egress(text: &str) -> Result<hangar_core::EgressPolicy, String> {
    text.parse()
        .map_err(|err: hangar_core::egress::EgressError| err.to_string())
}

/// `N` or `MIN-MAX` MiB, as `(min, max)`.
fn parse_memory(text: &str) -> Result<(u32, u32), String> {
    let parse = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("expected MiB as N or MIN-MAX, got {text:?}"))
    };
    match text.split_once('-') {
        Some((min, max)) => Ok((parse(min)?, parse(max)?)),
        None => parse(text).map(|n| (n, n)),
    }
}

impl RequestArgs {
    /// The request these arguments describe (`POST /v1/requests`, and the same body for
    /// `POST /v1/requests/check`).
    pub fn service_request(&self) -> Result<hangar_api::ServiceRequest, CliError> {
        let config = self.memory.map(|(min, max)| {
            let (name, min_version) = match self.os.split_once('@') {
                Some((name, version)) => (name.to_owned(), Some(version.to_owned())),
                None => (self.os.clone(), None),
            };
            serde_json::json!({
                "vcpus": self.vcpus.unwrap_or(1),
                "memory_mib": { "min": min, "max": max },
                "os": { "name": name, "min_version": min_version },
                "apps": self.apps,
                "disk_mib": self.disk,
            })
        });
        let body = serde_json::json!({
            "service": self.service,
            "config": config,
            "exact_size": self.exact_size,
            "env": self.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "mode": if self.dedicated { "dedicated" } else { "shared" },
            "deadline_ms": self.deadline.map(|d| d.as_millis() as u64),
            "isolate": self.isolate,
            "on": self.on.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "egress": self.egress.clone().unwrap_or_default(),
        });
        serde_json::from_value(body)
            .map_err(|err| CliError::Usage(format!("not a valid request: {err}")))
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }
}

pub async fn run(client: &Client, args: RequestArgs) -> Result<(), CliError> {
    let request = args.service_request()?;
    let RequestArgs {
        service,
        idempotency_key,
        json,
        ..
    } = args;
    if !json && std::io::stderr().is_terminal() {
        eprintln!(
            "waiting for a VM offering {}...",
            service.as_deref().unwrap_or("that configuration")
        );
    }
    let grant = match &idempotency_key {
        Some(key) => client.request_idempotent(&request, key).await?.value,
        None => client.request(&request).await?.value,
    };
    if json {
        return print_json(&grant);
    }
    println!(
        "{}",
        if grant.endpoint.is_empty() {
            &grant.vm
        } else {
            &grant.endpoint
        }
    );
    if grant.endpoints.len() > 1 {
        for (name, addr) in &grant.endpoints {
            eprintln!("endpoint {name}: {addr}");
        }
    }
    if let Some(why) = &grant.placement {
        eprintln!("{}", placement_line(&grant.host, why));
    }
    if !grant.installed_at_deploy.is_empty() {
        eprintln!(
            "installed at deploy: {}",
            grant.installed_at_deploy.join(", ")
        );
    }
    if let Some(chosen) = &grant.chosen {
        eprintln!("chosen: {}", chosen.reason);
    }
    for allowed in &grant.egress.allow {
        eprintln!("egress: {} reached at {}", allowed.target, allowed.guest);
    }
    if std::io::stderr().is_terminal() {
        let how = match grant.served {
            Served::Shared => "shared, already running".to_owned(),
            Served::Created => format!(
                "new, booted in {} ms",
                grant.boot_ms.map_or("null".to_owned(), |ms| ms.to_string())
            ),
            Served::Woken => "shared, woken from sleep or archive".to_owned(),
            kind => format!("{} match from a warm pool", wire_name(&kind)),
        };
        eprintln!("vm {} ({how})", grant.vm);
    }
    Ok(())
}

/// The human line saying where a new VM was placed and why.
fn placement_line(host: &str, why: &str) -> String {
    format!("placed on host {host}: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: RequestArgs,
    }

    #[test]
    fn isolation_and_label_constraints_reach_the_request() {
        let cli = Cli::try_parse_from([
            "request",
            "web",
            "--isolate",
            "db",
            "--on",
            "zone=eu",
            "--on",
            "disk=ssd",
        ])
        .unwrap();
        assert_eq!(cli.args.isolate.as_deref(), Some("db"));
        assert_eq!(
            cli.args.on,
            [("zone".into(), "eu".into()), ("disk".into(), "ssd".into())]
        );
        assert!(Cli::try_parse_from(["request", "web", "--on", "zone"]).is_err());
        assert_eq!(
            placement_line("b", "cheapest among 2 eligible hosts (load 10%, cost 1)"),
            "placed on host b: cheapest among 2 eligible hosts (load 10%, cost 1)"
        );
    }

    #[test]
    fn memory_is_one_size_or_a_range() {
        assert_eq!(parse_memory("128"), Ok((128, 128)));
        assert_eq!(parse_memory("128-512"), Ok((128, 512)));
        assert!(parse_memory("lots").is_err());
    }
}
