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
//!
//! [`daemons`] installs libvirt and starts its daemons; this module drives domains.

mod daemons;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hangar_core::Service;
use hangar_vmm::{Accel, Agent};

use crate::server::{rss_pss_kib, wait_answering};
pub use daemons::{Daemons, install_if_missing};

const CONNECT: &str = "qemu:///system";

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
        )
        .map_err(|err| err.to_string())?;
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
      <serial>{root_serial}</serial>
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
        root_serial = hangar_vmm::ROOT_SERIAL,
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
            // hangar-init finds its root disk by serial, as on hangar's own command line.
            "<serial>hangar-root</serial>",
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
