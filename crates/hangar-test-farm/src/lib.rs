//! Test support: several "hosts" on one machine, each in its own network namespace.
//!
//! [`FarmNet::create`]`(n)` makes, with iproute2's `ip` (as root):
//! - a Linux bridge in the root namespace (where the server under test and PostgreSQL
//!   run) with the address `10.A.B.1/24`, on a subnet no interface or route of the machine
//!   already covers;
//! - `n` network namespaces, each joined to the bridge by a veth pair: `eth0` with
//!   `10.A.B.(i+2)/24` inside (default route via the bridge address), `lo` up.
//!
//! So every host reaches the root namespace at [`FarmNet::bridge_ip`] and every other host
//! at its [`FarmNet::ip`], and nothing else: traffic stays between the root namespace and
//! these namespaces (the bridge has no uplink and nothing is routed beyond it).
//!
//! Every name starts with the instance's prefix, `hg` and four hex digits (`hg1a2b`): the
//! bridge `hg1a2bbr`, the root-side veth ends `hg1a2bv0`, `hg1a2bv1`, …, the namespaces
//! `hg1a2bh0`, `hg1a2bh1`, … (interface names stay within Linux's 15 characters). The
//! subnet is derived from the same four hex digits, and the prefix is claimed by creating
//! the bridge (which fails when the name exists), so instances made at once, in one test
//! process or in several, never share names or addresses.
//!
//! [`FarmNet::spawn`] runs a program in a host's namespace; [`FarmNet::kill`] ends the
//! processes spawned there (`kill -9` of an agent), [`FarmNet::kill_all`] every process in
//! the namespace, children of those included (a machine dying), and
//! [`FarmNet::disconnect`] cuts a host off the bridge (a network partition).
//!
//! Clean-up: [`FarmNet::close`], or dropping the value (also while a test panics), kills
//! every process still in the namespaces (QEMU grandchildren of an agent included), waits
//! until they are gone, and deletes the veths, the namespaces and the bridge. A small shell
//! keeper started with the farm holds the read end of a pipe from this process: when the
//! process ends without dropping the farm (aborted, killed), the keeper does the same
//! clean-up.

use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most hosts one farm has (their addresses are `.2` to `.251` of the subnet).
pub const MAX_HOSTS: usize = 250;

/// How long [`FarmNet::kill_all`] and the clean-up wait for killed processes to be gone.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Prefixes tried before giving up on finding a free one.
const CLAIM_TRIES: u32 = 64;

/// Why a farm could not be made, used or removed.
#[derive(Debug, thiserror::Error)]
pub enum FarmNetError {
    /// This machine or process cannot make network namespaces.
    #[error("network namespaces are not available: {0}")]
    Unavailable(String),
    /// A farm has 1 to [`MAX_HOSTS`] hosts.
    #[error("a farm has 1 to {MAX_HOSTS} hosts, not {0}")]
    HostCount(usize),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    /// A program could not be run at all.
    #[error("cannot run {program}")]
    Run {
        program: String,
        #[source]
        source: io::Error,
    },
    /// Every prefix tried was taken or its subnet already in use.
    #[error("no free prefix and subnet after {CLAIM_TRIES} tries")]
    NoFreePrefix,
    /// Processes were still in a namespace after being killed and waited for.
    #[error("processes {pids:?} still run in namespace {netns} after SIGKILL")]
    Survivors { netns: String, pids: Vec<u32> },
    /// Something of the farm could not be removed.
    #[error("cleaning up farm {prefix}: {problems}")]
    Cleanup { prefix: String, problems: String },
}

/// One host of a farm.
#[derive(Debug, Clone)]
struct FarmHost {
    netns: String,
    /// The root-namespace end of its veth pair, a port of the bridge.
    veth: String,
    ip: Ipv4Addr,
}

/// Hosts in network namespaces on one bridge; removed when dropped (see the crate docs).
#[derive(Debug)]
pub struct FarmNet {
    prefix: String,
    bridge: String,
    bridge_ip: Ipv4Addr,
    hosts: Vec<FarmHost>,
    /// (host, pid) of every process [`FarmNet::spawn`] started.
    spawned: Mutex<Vec<(usize, u32)>>,
    /// The shell that cleans up if this process ends without dropping the farm.
    keeper: Option<Child>,
    closed: bool,
}

impl FarmNet {
    /// Whether farms can be made here: this process is root and iproute2's `ip` runs.
    /// The error says why not, to print when a test skips.
    pub fn available() -> Result<(), FarmNetError> {
        let euid = std::fs::metadata("/proc/self")
            .map_err(|err| FarmNetError::Unavailable(format!("cannot read /proc/self: {err}")))?
            .uid();
        if euid != 0 {
            return Err(FarmNetError::Unavailable(format!(
                "this process runs as uid {euid}, and network namespaces need root"
            )));
        }
        match Command::new("ip").arg("-V").stdout(Stdio::null()).status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(FarmNetError::Unavailable(format!("`ip -V` {status}"))),
            Err(err) => Err(FarmNetError::Unavailable(format!(
                "cannot run `ip` (install iproute2): {err}"
            ))),
        }
    }

    /// Makes a bridge and `hosts` namespaces on it (see the crate docs).
    ///
    /// # Errors
    /// [`FarmNetError::Unavailable`] when not root or without `ip`; `HostCount` for 0 or
    /// more than [`MAX_HOSTS`] hosts; `Ip` when a step fails (what was made is removed).
    pub fn create(hosts: usize) -> Result<FarmNet, FarmNetError> {
        FarmNet::available()?;
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(FarmNetError::HostCount(hosts));
        }
        let (id, keeper) = claim(hosts)?;
        let prefix = format!("hg{id:04x}");
        let [a, b] = id.to_be_bytes();
        let mut farm = FarmNet {
            bridge: format!("{prefix}br"),
            bridge_ip: Ipv4Addr::new(10, a, b, 1),
            hosts: (0..hosts)
                .map(|i| FarmHost {
                    netns: format!("{prefix}h{i}"),
                    veth: format!("{prefix}v{i}"),
                    ip: Ipv4Addr::new(10, a, b, u8::try_from(i + 2).expect("at most 250 hosts")),
                })
                .collect(),
            prefix,
            spawned: Mutex::new(Vec::new()),
            keeper: Some(keeper),
            closed: false,
        };
        // On an error, dropping `farm` removes what was made.
        farm.build()?;
        Ok(farm)
    }

    /// Addresses the bridge and makes and joins each host (the bridge exists: it was the
    /// claim).
    fn build(&mut self) -> Result<(), FarmNetError> {
        let bridge_cidr = format!("{}/24", self.bridge_ip);
        ip(&["addr", "add", &bridge_cidr, "dev", &self.bridge])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        let gateway = self.bridge_ip.to_string();
        for (i, host) in self.hosts.iter().enumerate() {
            let peer = format!("{}p{i}", self.prefix);
            let ns = host.netns.as_str();
            let cidr = format!("{}/24", host.ip);
            ip(&["netns", "add", ns])?;
            ip(&[
                "link", "add", &host.veth, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", ns])?;
            ip(&["-n", ns, "link", "set", &peer, "name", "eth0"])?;
            ip(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "route", "add", "default", "via", &gateway])?;
            ip(&["link", "set", &host.veth, "master", &self.bridge])?;
            ip(&["link", "set", &host.veth, "up"])?;
        }
        Ok(())
    }

    /// The instance's name prefix (`hg` and four hex digits).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// How many hosts the farm has.
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }

    /// The bridge's name, in the root namespace.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The bridge's address, in the root namespace: where a server the hosts must reach
    /// listens (`10.A.B.1`).
    pub fn bridge_ip(&self) -> Ipv4Addr {
        self.bridge_ip
    }

    /// The name of host `host`'s network namespace (for `ip netns exec`, `ip -n`).
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn netns(&self, host: usize) -> &str {
        &self.host(host).netns
    }

    /// Host `host`'s address (`10.A.B.(host+2)`), reachable from the root namespace and
    /// from the other hosts.
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn ip(&self, host: usize) -> Ipv4Addr {
        self.host(host).ip
    }

    fn host(&self, host: usize) -> &FarmHost {
        match self.hosts.get(host) {
            Some(h) => h,
            None => panic!(
                "farm {} has {} hosts, there is no host {host}",
                self.prefix,
                self.hosts.len()
            ),
        }
    }

    /// Starts `command` inside host `host`'s network namespace, as the command says
    /// otherwise (program, arguments, environment, directory, stdio). The process joins
    /// the namespace between fork and exec (`setns`), so its children are in it too; unlike
    /// `ip netns exec` it keeps the root namespace's mounts (`/sys/class/net` lists the
    /// root's interfaces).
    ///
    /// The caller owns the returned [`Child`]: the farm remembers its pid (for
    /// [`FarmNet::kill`]) and kills it at clean-up, but never waits for it, so a caller that
    /// wants its exit status waits for it.
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn spawn(&self, host: usize, mut command: Command) -> io::Result<Child> {
        let path = format!("/run/netns/{}", self.host(host).netns);
        let netns = File::open(&path)?;
        let fd = netns.as_raw_fd();
        let enter = move || {
            // SAFETY: setns(2) takes a descriptor and a flag and touches no memory of
            // ours; it is async-signal-safe, so it may run between fork and exec. `fd` is
            // open: `netns` lives until `spawn` returns, after the fork.
            let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: the hook only calls setns(2) (see `enter`): no allocation, no locks, so
        // it is sound in the forked child of a multi-threaded process.
        unsafe {
            command.pre_exec(enter);
        }
        let child = command.spawn()?;
        drop(netns);
        self.spawned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((host, child.id()));
        Ok(child)
    }

    /// SIGKILLs the processes [`FarmNet::spawn`] started on host `host` that are still
    /// in its namespace, and nothing else (their children live on: `kill -9` of an
    /// agent). Returns how many were killed. Their owners reap them (`Child::wait`).
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn kill(&self, host: usize) -> Result<usize, FarmNetError> {
        let present = netns_pids(&self.host(host).netns)?;
        let spawned = self.spawned.lock().unwrap_or_else(|p| p.into_inner());
        let mut killed = 0;
        for &(_, pid) in spawned.iter().filter(|(h, _)| *h == host) {
            // Only pids still in our namespace: a pid that exited may have been reused.
            if present.contains(&pid) {
                sigkill(pid);
                killed += 1;
            }
        }
        Ok(killed)
    }

    /// SIGKILLs every process in host `host`'s namespace, again until none is left (the
    /// host's machine dies), waiting up to 10 s for them to be gone.
    ///
    /// # Errors
    /// [`FarmNetError::Survivors`] when some are still there after that.
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn kill_all(&self, host: usize) -> Result<(), FarmNetError> {
        kill_netns(&self.host(host).netns)
    }

    /// The pids of every process in host `host`'s namespace (not zombies).
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn pids(&self, host: usize) -> Result<Vec<u32>, FarmNetError> {
        netns_pids(&self.host(host).netns)
    }

    /// Cuts host `host` off the bridge (its veth end there goes down): it no longer
    /// reaches nor is reached by anyone, and what runs in it keeps running.
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn disconnect(&self, host: usize) -> Result<(), FarmNetError> {
        ip(&["link", "set", &self.host(host).veth, "down"])
    }

    /// Joins a host cut off by [`FarmNet::disconnect`] to the bridge again.
    ///
    /// # Panics
    /// When `host` is not below [`FarmNet::host_count`].
    pub fn reconnect(&self, host: usize) -> Result<(), FarmNetError> {
        ip(&["link", "set", &self.host(host).veth, "up"])
    }

    /// Removes the farm now (what dropping it does), saying what could not be removed.
    pub fn close(mut self) -> Result<(), FarmNetError> {
        self.shutdown()
    }

    /// Namespaces and interfaces of the root namespace whose names start with `prefix`:
    /// what is left of a farm (empty once it is removed).
    pub fn leftovers(prefix: &str) -> Result<Vec<String>, FarmNetError> {
        let namespaces = ip_output(&["netns", "list"])?;
        let links = ip_output(&["-o", "link", "show"])?;
        let mut names: Vec<String> = namespaces
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .chain(links.lines().filter_map(link_name))
            .filter(|name| name.starts_with(prefix))
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Kills what runs in the namespaces, deletes veths, namespaces and bridge, and lets
    /// the keeper go. Runs once; each step is tried even when an earlier one failed.
    fn shutdown(&mut self) -> Result<(), FarmNetError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let mut problems = Vec::new();
        for host in &self.hosts {
            if let Err(err) = kill_netns(&host.netns) {
                problems.push(err.to_string());
            }
        }
        // A veth is deleted with its peer, at once; a namespace's own devices go away
        // in the background after `ip netns del`, so the veths go first.
        for host in &self.hosts {
            remove(&["link", "del", &host.veth], &mut problems);
            remove(&["netns", "del", &host.netns], &mut problems);
        }
        remove(&["link", "del", &self.bridge], &mut problems);
        if let Some(mut keeper) = self.keeper.take() {
            // "closed" tells it everything is removed: it must not touch names that a
            // new farm may already have claimed again.
            if let Some(mut stdin) = keeper.stdin.take() {
                let _ = stdin.write_all(b"closed\n");
            }
            let _ = keeper.wait();
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FarmNetError::Cleanup {
                prefix: self.prefix.clone(),
                problems: problems.join("; "),
            })
        }
    }
}

impl Drop for FarmNet {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            eprintln!("warning: {err}");
        }
    }
}

/// Runs one `ip` removal; a thing already gone is not a problem.
fn remove(args: &[&str], problems: &mut Vec<String>) {
    match ip(args) {
        Ok(()) => {}
        Err(FarmNetError::Ip { stderr, .. }) if is_absent(&stderr) => {}
        Err(err) => problems.push(err.to_string()),
    }
}

/// Whether `ip`'s complaint means the thing does not exist.
fn is_absent(stderr: &str) -> bool {
    stderr.contains("Cannot find device")
        || stderr.contains("No such file or directory")
        || stderr.contains("does not exist")
}

/// Picks a free prefix and subnet and claims it by creating the bridge, then starts the
/// keeper for it. Returns the prefix's number and the keeper.
fn claim(hosts: usize) -> Result<(u16, Child), FarmNetError> {
    let in_use = networks_in_use()?;
    for _ in 0..CLAIM_TRIES {
        let id: u16 = rand::random();
        let [a, b] = id.to_be_bytes();
        let subnet = (Ipv4Addr::new(10, a, b, 0), 24);
        if in_use.iter().any(|&net| overlaps(net, subnet)) {
            continue;
        }
        let prefix = format!("hg{id:04x}");
        // Leftovers of a farm whose process died before its keeper could run.
        if !FarmNet::leftovers(&prefix)?.is_empty() {
            continue;
        }
        let bridge = format!("{prefix}br");
        match ip(&["link", "add", &bridge, "type", "bridge"]) {
            Ok(()) => {}
            Err(FarmNetError::Ip { stderr, .. }) if stderr.contains("File exists") => continue,
            Err(err) => return Err(err),
        }
        return match start_keeper(&prefix, hosts) {
            Ok(keeper) => Ok((id, keeper)),
            Err(err) => {
                let _ = ip(&["link", "del", &bridge]);
                Err(err)
            }
        };
    }
    Err(FarmNetError::NoFreePrefix)
}

/// The keeper: waits for a line on its stdin. "closed" means the farm removed itself;
/// anything else, or end of file (this process ended, however it ended), makes it remove
/// the farm. It ignores the terminal's signals, so an interrupted test run is cleaned too.
const KEEPER_SCRIPT: &str = r#"
trap '' INT HUP TERM QUIT
read -r word
[ "$word" = closed ] && exit 0
bridge=$1
shift
while [ $# -ge 2 ]; do
    ns=$1
    veth=$2
    shift 2
    tries=0
    while [ $tries -lt 100 ]; do
        pids=$(ip netns pids "$ns" 2>/dev/null)
        [ -n "$pids" ] || break
        kill -9 $pids 2>/dev/null
        sleep 0.1
        tries=$((tries + 1))
    done
    ip link del "$veth" 2>/dev/null
    ip netns del "$ns" 2>/dev/null
done
ip link del "$bridge" 2>/dev/null
exit 0
"#;

fn start_keeper(prefix: &str, hosts: usize) -> Result<Child, FarmNetError> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(KEEPER_SCRIPT)
        .arg("hangar-test-farm-keeper")
        .arg(format!("{prefix}br"));
    for i in 0..hosts {
        command
            .arg(format!("{prefix}h{i}"))
            .arg(format!("{prefix}v{i}"));
    }
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| FarmNetError::Run {
            program: "sh (the farm's keeper)".into(),
            source,
        })
}

/// SIGKILLs every process in namespace `netns` until none is left, or says which
/// survived [`KILL_WAIT`].
fn kill_netns(netns: &str) -> Result<(), FarmNetError> {
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let pids = match netns_pids(netns) {
            Ok(pids) => pids,
            // No namespace, no processes (e.g. a failed `create` stopped before it).
            Err(FarmNetError::Ip { stderr, .. }) if is_absent(&stderr) => return Ok(()),
            Err(err) => return Err(err),
        };
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(FarmNetError::Survivors {
                netns: netns.to_owned(),
                pids,
            });
        }
        for &pid in &pids {
            sigkill(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pids of the processes in namespace `netns` (zombies are not: they have left it).
fn netns_pids(netns: &str) -> Result<Vec<u32>, FarmNetError> {
    let out = ip_output(&["netns", "pids", netns])?;
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn sigkill(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes two integers and touches no memory; a pid that is gone makes
    // it fail with ESRCH, which is what was wanted.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Runs `ip ARGS`; its stderr is the error when it fails.
fn ip(args: &[&str]) -> Result<(), FarmNetError> {
    ip_output(args).map(drop)
}

/// Runs `ip ARGS` and returns its stdout.
fn ip_output(args: &[&str]) -> Result<String, FarmNetError> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FarmNetError::Run {
            program: "ip (install iproute2)".into(),
            source,
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(FarmNetError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The interface name in a line of `ip -o link show` (`5: name@peer: <…>`).
fn link_name(line: &str) -> Option<&str> {
    let name = line.split_whitespace().nth(1)?.trim_end_matches(':');
    Some(name.split('@').next().unwrap_or(name))
}

/// Every IPv4 network the root namespace has an address or a route in (gateways and
/// sources count as single addresses; the default route does not count).
fn networks_in_use() -> Result<Vec<(Ipv4Addr, u8)>, FarmNetError> {
    let addrs = ip_output(&["-4", "-o", "addr", "show"])?;
    let routes = ip_output(&["-4", "route", "show", "table", "all"])?;
    Ok(addrs
        .split_whitespace()
        .chain(routes.split_whitespace())
        .filter_map(parse_network)
        .filter(|&(_, len)| len > 0)
        .collect())
}

/// `a.b.c.d/len` or `a.b.c.d` (a /32) as a network.
fn parse_network(token: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = match token.split_once('/') {
        Some((addr, len)) => (addr, len.parse().ok().filter(|&l| l <= 32)?),
        None => (token, 32),
    };
    Some((addr.parse().ok()?, len))
}

/// Whether two networks share an address.
fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_overlap_when_one_contains_the_other() {
        let net = |s: &str| parse_network(s).unwrap();
        assert!(overlaps(net("10.1.2.0/24"), net("10.0.0.0/8")));
        assert!(overlaps(net("10.1.2.0/24"), net("10.1.2.7")));
        assert!(!overlaps(net("10.1.2.0/24"), net("10.1.3.0/24")));
        assert!(!overlaps(net("10.1.2.0/24"), net("192.0.2.0/24")));
        assert_eq!(parse_network("default"), None);
        assert_eq!(parse_network("10.0.0.0/33"), None);
    }

    #[test]
    fn link_names_drop_the_peer() {
        assert_eq!(
            link_name("7: hg1a2bv0@if6: <BROADCAST> mtu 1500"),
            Some("hg1a2bv0")
        );
        assert_eq!(link_name("1: lo: <LOOPBACK,UP>"), Some("lo"));
    }
}
