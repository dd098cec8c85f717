//! The same guest under libvirt, for comparison: Debian's libvirt (installed and its
//! daemons started by [`Daemons::ensure`] when missing, stopped afterwards), driven with
//! `virsh`, booting the kernel, initramfs and root image hangar boots for the service, on the
//! same QEMU, machine type (`microvm`, ACPI on) and accelerator, configured through the same
//! virtio-serial channel to hangar-init that hangar uses.
//!
//! What differs from hangar's own QEMU command line (`hangar_vmm::qemu::qemu_args`):
//! libvirt starts QEMU paused (`-S`) and continues it once set up, runs it as its own child
//! (not `-daemonize`d) with `-sandbox on`, a `memory-backend-ram` object and file
//! descriptors it passes in (QMP, agent socket, console); the user-mode network with its
//! host port forward is passed through with `<qemu:commandline>`, because libvirt 9.0 only
//! forwards ports for its `passt` back end, a different network stack.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::Service;
use hangar_vmm::{Accel, Agent};

use crate::server::{rss_pss_kib, socket_answers, wait_answering};

const LIBVIRTD_SOCKET: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCKET: &str = "/run/libvirt/virtlogd-sock";
const CONNECT: &str = "qemu:///system";

/// Installs Debian's libvirt when `virsh` or `libvirtd` is missing. Returns what it did.
pub fn install_if_missing() -> Result<Option<String>, String> {
    let have = |program: &str| {
        std::process::Command::new("sh")
            .args([
                "-c",
                &format!("command -v {program} || test -x /usr/sbin/{program}"),
            ])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("virsh") && have("libvirtd") && have("virtlogd") {
        return Ok(None);
    }
    let packages = ["libvirt-daemon-system", "libvirt-clients"];
    eprintln!("installing {} ...", packages.join(" "));
    let root = is_root();
    let apt = |args: &[&str]| {
        let mut command = if root {
            std::process::Command::new("apt-get")
        } else {
            let mut sudo = std::process::Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|err| format!("apt-get: {err}"))
            .and_then(|out| {
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "apt-get {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            })
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(packages);
    apt(&install)?;
    Ok(Some(format!("installed {}", packages.join(" "))))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// The libvirt daemons this benchmark started; stopped when dropped. Daemons that were
/// already running are left alone. Also what the set-up changed of `/dev/kvm`, put back
/// when dropped.
pub struct Daemons {
    started: Vec<(&'static str, PathBuf)>,
    kvm: Option<KvmAccess>,
}

/// `/dev/kvm` as it was before the set-up gave it to the `kvm` group.
struct KvmAccess {
    gid: u32,
    mode: u32,
}

const KVM: &str = "/dev/kvm";

/// Gives `/dev/kvm` to the `kvm` group, read-write (Debian's udev rule, which machines
/// without udev lack), when it exists and that group cannot use it. libvirt runs QEMU as
/// `libvirt-qemu` (group `kvm`); when that user cannot open `/dev/kvm`, libvirt judges the
/// QEMU capabilities it probed (with KVM) stale at every look-up and probes QEMU again,
/// several times per domain start: tens of seconds that are no part of what libvirt costs
/// on a machine set up as Debian sets it up. Returns how it was, to put back.
fn give_kvm_to_group() -> Result<Option<KvmAccess>, String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(KVM) else {
        return Ok(None);
    };
    let Some(kvm_gid) = std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|groups| {
            groups
                .lines()
                .find_map(|l| l.strip_prefix("kvm:"))
                .and_then(|rest| rest.split(':').nth(1)?.parse::<u32>().ok())
        })
    else {
        return Ok(None);
    };
    let mode = meta.mode() & 0o7777;
    if meta.gid() == kvm_gid && mode & 0o060 == 0o060 {
        return Ok(None);
    }
    std::os::unix::fs::chown(KVM, None, Some(kvm_gid)).map_err(|err| format!("{KVM}: {err}"))?;
    std::fs::set_permissions(KVM, std::fs::Permissions::from_mode(mode | 0o060))
        .map_err(|err| format!("{KVM}: {err}"))?;
    Ok(Some(KvmAccess {
        gid: meta.gid(),
        mode,
    }))
}

impl Daemons {
    /// Starts `virtlogd` and `libvirtd` as daemons (pid files in `dir`) unless they answer
    /// on their sockets already, and waits until they do.
    pub fn ensure(dir: &Path) -> Result<Daemons, String> {
        let mut daemons = Daemons {
            started: Vec::new(),
            kvm: give_kvm_to_group()?,
        };
        for (name, socket) in [("virtlogd", VIRTLOGD_SOCKET), ("libvirtd", LIBVIRTD_SOCKET)] {
            if socket_answers(Path::new(socket)) {
                continue;
            }
            let pidfile = dir.join(format!("{name}.pid"));
            let program = if Path::new("/usr/sbin").join(name).exists() {
                Path::new("/usr/sbin").join(name)
            } else {
                PathBuf::from(name)
            };
            let status = std::process::Command::new(&program)
                .arg("-d")
                .arg("-p")
                .arg(&pidfile)
                .stdin(std::process::Stdio::null())
                .status()
                .map_err(|err| format!("cannot start {name}: {err}"))?;
            if !status.success() {
                return Err(format!("{name} -d exited with {status}"));
            }
            daemons.started.push((name, pidfile));
            let deadline = Instant::now() + Duration::from_secs(30);
            while !socket_answers(Path::new(socket)) {
                if Instant::now() > deadline {
                    return Err(format!("{name} did not listen on {socket} within 30 s"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("started {name}");
        }
        Ok(daemons)
    }

    pub fn started(&self) -> Vec<&'static str> {
        self.started.iter().map(|(name, _)| *name).collect()
    }

    /// Whether the set-up gave `/dev/kvm` to the `kvm` group for the run.
    pub fn changed_kvm(&self) -> bool {
        self.kvm.is_some()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        // libvirtd first: it holds virtlogd's connections.
        for (name, pidfile) in self.started.iter().rev() {
            let Some(pid) = std::fs::read_to_string(pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let ours = hangar_vmm::procs::cmdline(pid)
                .and_then(|args| args.first().cloned())
                .is_some_and(|program| program.ends_with(name));
            if !ours {
                continue;
            }
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is a daemon this
            // benchmark started (read from its own pid file and checked by name).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while hangar_vmm::procs::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if hangar_vmm::procs::alive(pid) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            eprintln!("stopped {name}");
        }
        if let Some(kvm) = &self.kvm {
            let _ = std::os::unix::fs::chown(KVM, None, Some(kvm.gid));
            let _ = std::fs::set_permissions(KVM, std::fs::Permissions::from_mode(kvm.mode));
        }
    }
}

/// What the libvirt guest boots: the service's VM as hangar would make it.
#[derive(Debug, Clone)]
pub struct Guest {
    pub service: Service,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub base_image: PathBuf,
    pub accel: Accel,
}

/// One domain this benchmark made.
pub struct Domain {
    pub name: String,
    dir: PathBuf,
    pub endpoint: SocketAddr,
    agent: Option<Arc<Agent>>,
}

impl Domain {
    fn save_file(&self) -> PathBuf {
        self.dir.join("saved.img")
    }
}

/// One interactive `virsh` kept open: commands over one connection to libvirtd, as a
/// program using the libvirt API would send them, without a process per call.
struct Session {
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    calls: u64,
    _child: tokio::process::Child,
}

impl Session {
    async fn open() -> Result<Session, String> {
        let mut child = tokio::process::Command::new("virsh")
            .args(["-q", "-c", CONNECT])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("virsh: {err}"))?;
        let stdin = child.stdin.take().ok_or("virsh has no stdin")?;
        let stdout = child.stdout.take().ok_or("virsh has no stdout")?;
        let mut session = Session {
            stdin,
            stdout,
            calls: 0,
            _child: child,
        };
        session.call("version").await?;
        Ok(session)
    }

    /// Runs `command` and waits until virsh has finished it (virsh runs commands in order;
    /// a marker echoed after it comes back once it is done). Failures show as their
    /// effects (the endpoint never answers), since virsh reports them on stderr.
    async fn call(&mut self, command: &str) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.calls += 1;
        // virsh echoes the command lines: the quotes keep the marker out of the echo.
        let marker = format!("hgbench mark-{}", self.calls);
        let lines = format!("{command}\necho \"hgbench\" \"mark-{}\"\n", self.calls);
        let exchange = async {
            self.stdin.write_all(lines.as_bytes()).await?;
            self.stdin.flush().await?;
            let mut seen = Vec::new();
            let mut chunk = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(&marker) {
                let n = self.stdout.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other("virsh exited"));
                }
                seen.extend_from_slice(&chunk[..n]);
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .map_err(|_| format!("virsh {command}: no answer within 120 s"))?
            .map_err(|err| format!("virsh {command}: {err}"))
    }
}

/// Domains under libvirt; every one still defined is destroyed, and its files removed,
/// when this is dropped.
pub struct Libvirt {
    guest: Guest,
    session: tokio::sync::Mutex<Session>,
    work: tempfile::TempDir,
    prefix: String,
    made: usize,
    live: Vec<String>,
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.live) {
            let _ = std::process::Command::new("virsh")
                .args(["-q", "-c", CONNECT, "destroy", &name])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

async fn virsh(args: &[&str]) -> Result<(), String> {
    let output = tokio::process::Command::new("virsh")
        .args(["-q", "-c", CONNECT])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|err| format!("virsh: {err}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Libvirt {
    /// Checks that libvirt answers and can run QEMU's `microvm` machine.
    pub async fn new(guest: Guest) -> Result<Libvirt, String> {
        virsh(&["version"]).await?;
        // Short paths: unix socket addresses hold at most 107 bytes. Readable by the
        // daemons whatever user they run QEMU as.
        let work = tempfile::Builder::new()
            .prefix("hglv")
            .tempdir_in("/tmp")
            .map_err(|err| format!("temporary dir: {err}"))?;
        std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|err| err.to_string())?;
        Ok(Libvirt {
            guest,
            session: tokio::sync::Mutex::new(Session::open().await?),
            prefix: format!("hgbench-{}", std::process::id()),
            work,
            made: 0,
            live: Vec::new(),
        })
    }

    /// `virsh create` of a new domain → its endpoint answering: the VM's copy-on-write
    /// layer, the domain started, hangar-init configured over the agent channel (as hangar
    /// does), the service answering HTTP 200.
    pub async fn create(&mut self) -> Result<(Domain, Duration), String> {
        let started = Instant::now();
        self.made += 1;
        let name = format!("{}-{}", self.prefix, self.made);
        let dir = self.work.path().join(self.made.to_string());
        std::fs::create_dir(&dir).map_err(|err| format!("{}: {err}", dir.display()))?;
        let disk = dir.join("disk.qcow2");
        let output = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.guest.base_image)
            .arg(&disk)
            .output()
            .await
            .map_err(|err| format!("qemu-img: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        let endpoint = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|err| err.to_string())?;
        let port = self
            .guest
            .service
            .ports
            .first()
            .ok_or("the service has no port")?
            .guest;
        let xml = domain_xml(&name, &self.guest, &dir, endpoint, port);
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, xml).map_err(|err| err.to_string())?;
        self.live.push(name.clone());
        virsh(&["create", &xml_path.to_string_lossy()]).await?;

        let socket = dir.join("agent.sock");
        let stream = loop {
            match tokio::net::UnixStream::connect(&socket).await {
                Ok(stream) => break stream,
                Err(err) if started.elapsed() > Duration::from_secs(30) => {
                    return Err(format!("agent socket {}: {err}", socket.display()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let agent = Agent::spawn(stream);
        let config = hangar_server::guest_config(
            &name,
            &name,
            Some(&self.guest.service),
            &Default::default(),
            0,
        )?;
        agent
            .configure(config, Duration::from_secs(120))
            .await
            .map_err(|err| format!("configuring {name}: {err}"))?;
        wait_answering(endpoint, started, Duration::from_secs(120)).await?;
        Ok((
            Domain {
                name,
                dir,
                endpoint,
                agent: Some(agent),
            },
            started.elapsed(),
        ))
    }

    /// `virsh domstate`: what one virsh call costs by itself (a process, a connection to
    /// libvirtd, one call), which every libvirt figure includes.
    pub async fn domstate(&self, domain: &Domain) -> Result<Duration, String> {
        let started = Instant::now();
        virsh(&["domstate", &domain.name]).await?;
        Ok(started.elapsed())
    }

    /// `domstate` over the open connection.
    pub async fn domstate_connected(&self, domain: &Domain) -> Result<Duration, String> {
        let started = Instant::now();
        self.session
            .lock()
            .await
            .call(&format!("domstate {}", domain.name))
            .await?;
        Ok(started.elapsed())
    }

    /// `virsh suspend`.
    pub async fn suspend(&self, domain: &Domain) -> Result<(), String> {
        virsh(&["suspend", &domain.name]).await
    }

    /// `virsh resume` → endpoint answering.
    pub async fn resume(&self, domain: &Domain) -> Result<Duration, String> {
        let started = Instant::now();
        virsh(&["resume", &domain.name]).await?;
        wait_answering(domain.endpoint, started, Duration::from_secs(60)).await?;
        Ok(started.elapsed())
    }

    /// `resume` over the open connection → endpoint answering.
    pub async fn resume_connected(&self, domain: &Domain) -> Result<Duration, String> {
        let started = Instant::now();
        self.session
            .lock()
            .await
            .call(&format!("resume {}", domain.name))
            .await?;
        wait_answering(domain.endpoint, started, Duration::from_secs(60)).await?;
        Ok(started.elapsed())
    }

    /// `virsh save` of a running domain (its memory to a file; the process ends).
    pub async fn save(&self, domain: &mut Domain) -> Result<Duration, String> {
        let started = Instant::now();
        virsh(&["save", &domain.name, &domain.save_file().to_string_lossy()]).await?;
        let took = started.elapsed();
        // The channel ended with the process.
        domain.agent = None;
        Ok(took)
    }

    /// `virsh restore` → endpoint answering; the save file is removed afterwards.
    pub async fn restore(&self, domain: &Domain) -> Result<Duration, String> {
        let started = Instant::now();
        let file = domain.save_file();
        virsh(&["restore", &file.to_string_lossy()]).await?;
        wait_answering(domain.endpoint, started, Duration::from_secs(120)).await?;
        let took = started.elapsed();
        let _ = std::fs::remove_file(file);
        Ok(took)
    }

    /// What the names of this run's domains start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The directory holding the domains' files.
    pub fn dir(&self) -> &Path {
        self.work.path()
    }

    /// Size of the domain's save file, while it has one.
    pub fn saved_bytes(&self, domain: &Domain) -> Option<u64> {
        std::fs::metadata(domain.save_file()).ok().map(|m| m.len())
    }

    /// RSS and PSS (KiB) of the domain's QEMU process.
    pub fn memory(&self, domain: &Domain) -> Option<(u64, u64)> {
        let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", domain.name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        rss_pss_kib(pid)
    }

    /// `virsh destroy`; the domain's files are removed.
    pub async fn destroy(&mut self, mut domain: Domain) -> Result<(), String> {
        domain.agent = None;
        virsh(&["destroy", &domain.name]).await?;
        self.live.retain(|name| *name != domain.name);
        let _ = std::fs::remove_dir_all(&domain.dir);
        Ok(())
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML of one guest: hangar's `microvm` VM as libvirt describes it.
pub fn domain_xml(
    name: &str,
    guest: &Guest,
    dir: &Path,
    endpoint: SocketAddr,
    guest_port: u16,
) -> String {
    let path = |p: &Path| escape(&p.display().to_string());
    let (domain_type, cpu) = match guest.accel {
        Accel::Kvm => ("kvm", "\n  <cpu mode='host-passthrough'/>"),
        // TCG: libvirt's default CPU (qemu64) is QEMU's, which hangar uses.
        _ => ("qemu", ""),
    };
    let service = &guest.service;
    format!(
        "<domain type='{domain_type}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>{cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <controller type='virtio-serial' index='0'><address type='virtio-mmio'/></controller>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
      <address type='virtio-mmio'/>
    </disk>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{agent}'/>
      <target type='virtio' name='{port_name}'/>
    </channel>
    <rng model='virtio'><backend model='builtin'/><address type='virtio-mmio'/></rng>
    <memballoon model='virtio'><address type='virtio-mmio'/></memballoon>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value='user,id=n0,hostfwd=tcp:{host}:{host_port}-:{guest_port}'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-device,netdev=n0'/>
  </qemu:commandline>
</domain>
",
        name = escape(name),
        memory = service.memory_mib,
        vcpus = service.vcpus,
        kernel = path(&guest.kernel),
        initrd = path(&guest.initramfs),
        cmdline = escape(&guest.cmdline),
        disk = path(&dir.join("disk.qcow2")),
        console = path(&dir.join("console.log")),
        agent = path(&dir.join("agent.sock")),
        port_name = hangar_proto::AGENT_PORT_NAME,
        host = endpoint.ip(),
        host_port = endpoint.port(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_mirrors_hangars_vm() {
        let service = hangar_core::Catalog::demo()
            .get("http-static")
            .cloned()
            .unwrap();
        let guest = Guest {
            service,
            kernel: "/c/vmlinux".into(),
            initramfs: "/c/initramfs.cpio".into(),
            cmdline: "console=ttyS0 quiet".into(),
            base_image: "/c/base.qcow2".into(),
            accel: Accel::Tcg,
        };
        let xml = domain_xml(
            "hgbench-1-1",
            &guest,
            Path::new("/tmp/hglv/1"),
            "127.0.0.1:4242".parse().unwrap(),
            80,
        );
        for expected in [
            "<domain type='qemu'",
            "machine='microvm'",
            "<memory unit='MiB'>128</memory>",
            "<vcpu>1</vcpu>",
            "<kernel>/c/vmlinux</kernel>",
            "<features><acpi/></features>",
            "<source file='/tmp/hglv/1/disk.qcow2'/>",
            "<source mode='bind' path='/tmp/hglv/1/agent.sock'/>",
            "name='org.hangar.agent'",
            "user,id=n0,hostfwd=tcp:127.0.0.1:4242-:80",
            "virtio-net-device,netdev=n0",
        ] {
            assert!(xml.contains(expected), "missing {expected:?} in\n{xml}");
        }
        assert!(!xml.contains("host-passthrough"));
        let kvm = domain_xml(
            "x",
            &Guest {
                accel: Accel::Kvm,
                cmdline: "a=<b>".into(),
                ..guest
            },
            Path::new("/d"),
            "127.0.0.1:1".parse().unwrap(),
            80,
        );
        assert!(kvm.contains("<domain type='kvm'") && kvm.contains("host-passthrough"));
        assert!(kvm.contains("<cmdline>a=&lt;b&gt;</cmdline>"));
    }
}
