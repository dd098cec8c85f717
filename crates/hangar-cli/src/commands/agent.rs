//! `hangar agent`: one machine of a farm. Runs VMs under QEMU here for the control plane
//! (`hangar server`) elsewhere: serves the agent API, registers and sends heartbeats. The
//! loop itself is `hangar_host::agent::run_agent`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use hangar_host::images::ImageSource;
use hangar_host::images::pulled::PulledImages;
use hangar_vmm::Accel;

use super::server::{default_data_dir, init_logging, shutdown_signal};

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The control plane's URLs, comma-separated, tried in order (the servers' replies
    /// update the list).
    #[arg(
        long = "server",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true,
        env = "HANGAR_SERVERS"
    )]
    servers: Vec<String>,
    /// The farm token, shared by the servers and agents [or --token-file].
    #[arg(long, env = "HANGAR_FARM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the farm token (its first line); wins over --token.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// A file holding a token (its first line, 16 characters or more; mode 0600) that
    /// reads this agent's `GET /metrics` and nothing else, for Prometheus's
    /// `credentials_file`; without it `/metrics` wants the farm token.
    #[arg(long, value_name = "PATH", env = "HANGAR_AGENT_METRICS_TOKEN_FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Address of the agent's API, which the control plane calls: a loopback address,
    /// unless --insecure-listen.
    #[arg(long, default_value = "127.0.0.1:7071", env = "HANGAR_AGENT_LISTEN")]
    listen: SocketAddr,
    /// Allow a --listen address other machines can reach (as a farm host on other
    /// machines needs). Plain HTTP: the farm token crosses the network in clear (use a
    /// private network or a TLS proxy in front).
    #[arg(long, env = "HANGAR_INSECURE_LISTEN")]
    insecure_listen: bool,
    /// The agent's API as the control plane reaches it [default: http://<--listen>, or
    /// http://<--endpoint-host>:<port> when --listen is 0.0.0.0].
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// Where this host keeps VM disks, templates and cached images [default:
    /// $XDG_DATA_HOME/hangar/agent]. Not a server's data directory.
    #[arg(long, env = "HANGAR_AGENT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// This host's name in the farm: letters, digits, `-`, `_`, `.` [default: the
    /// machine's hostname].
    #[arg(long)]
    name: Option<String>,
    /// Labels that placement constraints match (`hangar request --on zone=a`).
    #[arg(long, value_name = "K=V[,K=V...]", value_delimiter = ',', value_parser = super::parse_env)]
    labels: Vec<(String, String)>,
    /// Relative cost of a VM-hour on this host; placement prefers cheaper hosts.
    #[arg(long, default_value_t = 1)]
    cost: u32,
    /// Operator preference: hosts with a higher priority are filled first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Accelerator: auto picks KVM only on bare metal (nested KVM is slower than TCG).
    #[arg(long, default_value = "auto", env = "HANGAR_ACCEL")]
    accel: Accel,
    /// Private segments' switching: bridge (a tap per VM on a kernel bridge per segment,
    /// in a network namespace of the data dir's; needs root), switch (hangar's own switch,
    /// any user), or auto (bridge when running as root).
    #[arg(long, default_value = "auto", env = "HANGAR_SEGMENT_NET")]
    segment_net: hangar_vmm::tap::SegmentNet,
    /// The TSC frequency guests are told, in kHz [default: this machine's, measured at
    /// start]. Pin one value on a farm of identical hosts to keep templates' keys equal
    /// whatever each host measures.
    #[arg(long, value_name = "KHZ", env = "HANGAR_GUEST_TSC_KHZ",
          value_parser = clap::value_parser!(u64).range(100_000..20_000_000))]
    guest_tsc_khz: Option<u64>,
    /// This machine's address as clients reach it: VM endpoints listen there (not a
    /// wildcard such as 0.0.0.0).
    #[arg(long, default_value = "127.0.0.1", env = "HANGAR_ENDPOINT_HOST")]
    endpoint_host: IpAddr,
    /// Boot every VM instead of cloning it from its service's template.
    #[arg(long)]
    no_templates: bool,
}

/// Runs the agent until SIGINT or SIGTERM; VMs keep running after it.
pub async fn run(args: AgentArgs) -> ExitCode {
    // Every file the agent and QEMU write is private.
    hangar_image::hostfs::restrict_umask();
    init_logging();
    match start(args).await {
        Ok(()) => {
            tracing::info!("agent stopped; VMs keep running and are reported at the next start");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("hangar agent: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn start(args: AgentArgs) -> Result<(), String> {
    let token = token(&args)?;
    let metrics_token = match &args.metrics_token_file {
        Some(path) => Some(metrics_token(path)?),
        None => None,
    };
    let name = match &args.name {
        Some(name) => name.clone(),
        None => hostname()?,
    };
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir().join("agent"));
    let images = image_source(&args.servers, &token, &data_dir)?;
    let config = hangar_host::agent::AgentConfig {
        name,
        servers: args.servers,
        token,
        metrics_token,
        listen: args.listen,
        insecure_listen: args.insecure_listen,
        advertise: args.advertise,
        data_dir,
        accel: args.accel,
        segment_net: args.segment_net,
        guest_tsc_khz: args.guest_tsc_khz,
        endpoint_host: args.endpoint_host,
        labels: args.labels.into_iter().collect(),
        cost: args.cost,
        priority: args.priority,
        templates: !args.no_templates,
        images,
    };
    hangar_host::agent::run_agent(config, shutdown_signal())
        .await
        .map_err(|err| hangar_server::error::error_chain(&err))
}

/// Where the agent's images come from: pulled from the control plane by content hash
/// (sha256, verified, resumable) into `<data-dir>/images`, never built here.
fn image_source(
    servers: &[String],
    token: &str,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn ImageSource>, String> {
    PulledImages::new(data_dir.join("images"), servers.to_vec(), token.to_owned())
        .map(|images| Arc::new(images) as Arc<dyn ImageSource>)
        .map_err(|err| hangar_server::error::error_chain(&err))
}

/// The farm token: `--token-file`'s first line, else `--token` / `HANGAR_FARM_TOKEN`.
fn token(args: &AgentArgs) -> Result<String, String> {
    let token = match (&args.token_file, &args.token) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|err| format!("reading the token file {}: {err}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        (None, Some(token)) => token.trim().to_owned(),
        (None, None) => {
            return Err("no farm token: give --token, --token-file or HANGAR_FARM_TOKEN".into());
        }
    };
    if token.is_empty() {
        return Err("the farm token is empty".into());
    }
    Ok(token)
}

/// The metrics token in `path`: a private file (no access for group or others) whose first
/// line has 16 characters or more.
fn metrics_token(path: &std::path::Path) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|err| format!("the metrics token file {}: {err}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the metrics token file {} is readable by others (mode {mode:o}); `chmod 600` it",
            path.display()
        ));
    }
    let token = std::fs::read_to_string(path)
        .map_err(|err| format!("reading the metrics token file {}: {err}", path.display()))?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if token.len() < 16 {
        return Err(format!(
            "the metrics token in {} is shorter than 16 characters",
            path.display()
        ));
    }
    Ok(token)
}

/// The machine's hostname.
fn hostname() -> Result<String, String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .ok_or_else(|| "cannot read the hostname; give --name".to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn servers_and_labels_split_at_commas() {
        let cli = Cli::try_parse_from([
            "agent",
            "--server",
            "http://a:7070,http://b:7070",
            "--labels",
            "zone=a,disk=ssd",
            "--priority",
            "-2",
            "--token",
            "t",
        ])
        .unwrap();
        assert_eq!(cli.agent.servers, ["http://a:7070", "http://b:7070"]);
        assert_eq!(
            cli.agent.labels,
            [
                ("zone".to_owned(), "a".to_owned()),
                ("disk".to_owned(), "ssd".to_owned())
            ]
        );
        assert_eq!(cli.agent.priority, -2);
        assert_eq!(token(&cli.agent).unwrap(), "t");
    }

    #[test]
    fn the_token_file_wins_and_an_empty_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\nrest\n").unwrap();
        let cli = Cli::try_parse_from([
            "agent",
            "--server",
            "http://a:7070",
            "--token",
            "flag",
            "--token-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(token(&cli.agent).unwrap(), "from-file");
        let cli =
            Cli::try_parse_from(["agent", "--server", "http://a:7070", "--token", " "]).unwrap();
        assert!(token(&cli.agent).is_err());
    }
}
