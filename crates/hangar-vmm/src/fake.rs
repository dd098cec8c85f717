//! An in-process stand-in for QEMU, for fast tests of the logic above the seam (request
//! path, reconciliation, pools). Each fake VM listens on its forwarded host ports and answers
//! any HTTP request with `200 OK` and `fake <id>` (nothing while paused), and speaks the agent
//! protocol like hangar-init would. Archives are records in memory: an archived fake VM
//! has no listeners, and a restore launches it again. It proves nothing about real guests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_proto::{GuestMessage, HostMessage, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::Agent;
use crate::{
    ArchiveInfo, ArchiveTier, Hypervisor, Launched, RunState, TemplateInfo, VmSpec, VmmError,
    template,
};

struct FakeVm {
    spec: VmSpec,
    paused: watch::Sender<bool>,
    memory_mib: u32,
    root: Option<std::path::PathBuf>,
    agent: Arc<Agent>,
    tasks: Vec<JoinHandle<()>>,
    /// The task serving each host port forward, by host port.
    forwards: HashMap<u16, JoinHandle<()>>,
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(self.forwards.values()) {
            task.abort();
        }
    }
}

/// Simulated hypervisor. Cloning shares the simulated host, so a "restarted server" given a
/// clone can adopt the VMs the first one launched.
#[derive(Clone, Default)]
pub struct FakeBackend {
    vms: Arc<Mutex<HashMap<String, FakeVm>>>,
    launches: Arc<AtomicUsize>,
    fail_next_launch: Arc<AtomicBool>,
    fail_next_archive: Arc<AtomicBool>,
    clones: Arc<AtomicUsize>,
    archives: Arc<Mutex<HashMap<String, (VmSpec, ArchiveInfo)>>>,
    console_dir: Arc<Mutex<Option<std::path::PathBuf>>>,
    segment_dir: Arc<Mutex<Option<std::path::PathBuf>>>,
}

impl FakeBackend {
    pub fn new() -> FakeBackend {
        FakeBackend::default()
    }

    /// From now on VM `id`'s console is the file `dir/<id>.log` (which tests write: a
    /// fake guest prints nothing).
    pub fn keep_consoles_in(&self, dir: &std::path::Path) {
        *self.console_dir.lock().expect("fake console dir") = Some(dir.to_owned());
    }

    /// From now on a running VM with a segment NIC has its sockets in `dir/<id>/` (`nic`,
    /// the fake QEMU's end, is never bound: frames sent to it are dropped), so that a host
    /// can join it to a segment.
    pub fn keep_segment_sockets_in(&self, dir: &std::path::Path) {
        *self.segment_dir.lock().expect("fake segment dir") = Some(dir.to_owned());
    }

    /// How many VMs were launched so far.
    pub fn launches(&self) -> usize {
        self.launches.load(Ordering::SeqCst)
    }

    /// How many VMs were cloned from templates so far.
    pub fn clones(&self) -> usize {
        self.clones.load(Ordering::SeqCst)
    }

    /// Makes the next launch fail, as a QEMU that cannot start would.
    pub fn fail_next_launch(&self) {
        self.fail_next_launch.store(true, Ordering::SeqCst);
    }

    /// Makes the next archive fail, as a full disk would; the VM stays as it was.
    pub fn fail_next_archive(&self) {
        self.fail_next_archive.store(true, Ordering::SeqCst);
    }

    /// The guest memory a VM was given or ballooned to.
    pub fn memory_mib(&self, id: &str) -> Option<u32> {
        self.vms
            .lock()
            .expect("fake vms lock")
            .get(id)
            .map(|vm| vm.memory_mib)
    }

    /// The root image attached to a VM.
    pub fn root(&self, id: &str) -> Option<std::path::PathBuf> {
        self.vms
            .lock()
            .expect("fake vms lock")
            .get(id)
            .and_then(|vm| vm.root.clone())
    }

    /// The read-only layers attached to a VM, top first.
    pub fn layers(&self, id: &str) -> Vec<std::path::PathBuf> {
        self.vms
            .lock()
            .expect("fake vms lock")
            .get(id)
            .map(|vm| vm.spec.layers.clone())
            .unwrap_or_default()
    }

    /// Simulates the VM's process dying.
    pub fn crash(&self, id: &str) {
        self.vms.lock().expect("fake vms lock").remove(id);
    }
}

#[async_trait::async_trait]
impl Hypervisor for FakeBackend {
    async fn segment_nic(&self, id: &str) -> Option<crate::SegmentNic> {
        let dir = self.segment_dir.lock().expect("fake segment dir").clone()?;
        let has_nic = self.vms.lock().expect("fake vms").get(id)?.spec.segment_nic;
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir).ok()?;
        has_nic.then(|| {
            crate::SegmentNic::Datagram(crate::SegmentSockets {
                nic: dir.join("nic"),
                port: dir.join("port"),
            })
        })
    }

    fn console_log(&self, id: &str) -> Option<std::path::PathBuf> {
        let dir = self.console_dir.lock().expect("fake console dir");
        dir.as_ref().map(|dir| dir.join(format!("{id}.log")))
    }

    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn launch(&self, spec: &VmSpec) -> Result<Launched, VmmError> {
        if self.fail_next_launch.swap(false, Ordering::SeqCst) {
            return Err(VmmError::Launch("simulated launch failure".into()));
        }
        let (paused, paused_rx) = watch::channel(spec.pre_os);
        let mut tasks = Vec::new();
        let mut forwards = HashMap::new();
        for forward in &spec.forwards {
            let listener = bind(forward).await?;
            forwards.insert(
                forward.host_port,
                tokio::spawn(serve_http(listener, spec.id.clone(), paused_rx.clone())),
            );
        }
        let (host_end, guest_end) = tokio::io::duplex(64 * 1024);
        tasks.push(tokio::spawn(fake_guest(guest_end)));
        let agent = Agent::spawn(host_end);
        self.launches.fetch_add(1, Ordering::SeqCst);
        self.vms.lock().expect("fake vms lock").insert(
            spec.id.clone(),
            FakeVm {
                spec: spec.clone(),
                paused,
                memory_mib: spec.memory_mib,
                root: spec.base_image.clone(),
                agent: agent.clone(),
                tasks,
                forwards,
            },
        );
        Ok(Launched { pid: None, agent })
    }

    async fn adopt(&self, spec: &VmSpec) -> Result<Option<Launched>, VmmError> {
        Ok(self
            .vms
            .lock()
            .expect("fake vms lock")
            .get(&spec.id)
            .map(|vm| Launched {
                pid: None,
                agent: vm.agent.clone(),
            }))
    }

    async fn running(&self) -> Result<Vec<String>, VmmError> {
        Ok(self
            .vms
            .lock()
            .expect("fake vms lock")
            .keys()
            .cloned()
            .collect())
    }

    async fn pause(&self, id: &str) -> Result<(), VmmError> {
        self.set_paused(id, true)
    }

    async fn resume(&self, id: &str) -> Result<(), VmmError> {
        self.set_paused(id, false)
    }

    async fn run_state(&self, id: &str) -> Result<RunState, VmmError> {
        Ok(match self.vms.lock().expect("fake vms lock").get(id) {
            None => RunState::Gone,
            Some(vm) if *vm.paused.borrow() => RunState::Paused,
            Some(_) => RunState::Running,
        })
    }

    async fn stop(&self, id: &str) -> Result<(), VmmError> {
        self.vms.lock().expect("fake vms lock").remove(id);
        Ok(())
    }

    async fn destroy(&self, id: &str) -> Result<(), VmmError> {
        self.vms.lock().expect("fake vms lock").remove(id);
        self.archives.lock().expect("fake archives lock").remove(id);
        Ok(())
    }

    async fn archive(&self, id: &str, tier: ArchiveTier) -> Result<ArchiveInfo, VmmError> {
        let mut vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        if self.fail_next_archive.swap(false, Ordering::SeqCst) {
            return Err(VmmError::Archive {
                id: id.to_owned(),
                reason: "simulated archive failure: No space left on device".into(),
            });
        }
        let bytes = u64::from(vm.memory_mib) << 20;
        // As the QEMU backend: a delta needs a template, else zstd.
        let tier = match tier {
            ArchiveTier::Delta if vm.spec.template.is_none() => ArchiveTier::Zstd,
            tier => tier,
        };
        let info = ArchiveInfo {
            tier,
            path: format!("fake/{id}/memory.{tier}").into(),
            size_bytes: match tier {
                ArchiveTier::Raw => bytes,
                ArchiveTier::Zstd => bytes / 10,
                ArchiveTier::Delta => bytes / 500,
            },
            memory_mib: vm.memory_mib,
            took_ms: 1,
        };
        let mut spec = vm.spec.clone();
        spec.base_image = vm.root.clone();
        vms.remove(id);
        self.archives
            .lock()
            .expect("fake archives lock")
            .insert(id.to_owned(), (spec, info.clone()));
        Ok(info)
    }

    async fn restore(&self, spec: &VmSpec) -> Result<Launched, VmmError> {
        let fail = |reason: &str| VmmError::Restore {
            id: spec.id.clone(),
            reason: reason.to_owned(),
        };
        let archived = self
            .archives
            .lock()
            .expect("fake archives lock")
            .get(&spec.id)
            .map(|(archived, _)| archived.clone())
            .ok_or_else(|| fail("no archive"))?;
        if (archived.memory_mib, archived.vcpus) != (spec.memory_mib, spec.vcpus) {
            return Err(fail("the spec differs from the archived configuration"));
        }
        let launched = self
            .launch(&VmSpec {
                pre_os: false,
                base_image: spec.base_image.clone().or(archived.base_image),
                layers: Vec::new(),
                ..spec.clone()
            })
            .await
            .map_err(|err| fail(&err.to_string()))?;
        self.archives
            .lock()
            .expect("fake archives lock")
            .remove(&spec.id);
        Ok(launched)
    }

    fn archive_info(&self, id: &str) -> Option<ArchiveInfo> {
        self.archives
            .lock()
            .expect("fake archives lock")
            .get(id)
            .map(|(_, info)| info.clone())
    }

    /// Writes a small but real template directory (so that code finding templates on disk
    /// works against this backend too) and removes the VM.
    async fn make_template(
        &self,
        id: &str,
        dir: &std::path::Path,
    ) -> Result<TemplateInfo, VmmError> {
        let vm = self
            .vms
            .lock()
            .expect("fake vms lock")
            .remove(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut memory = dir.as_os_str().to_owned();
        memory.push(".snapshot");
        let memory = std::path::PathBuf::from(memory);
        std::fs::write(&memory, format!("fake snapshot of {id}"))?;
        // A VM booted with its RAM in a file leaves that file as the template's RAM.
        let ram = matches!(vm.spec.memory, crate::MemoryBacking::TemplateSource).then(|| {
            let mut ram = dir.as_os_str().to_owned();
            ram.push(".ram");
            std::path::PathBuf::from(ram)
        });
        if let Some(ram) = &ram {
            std::fs::write(ram, format!("fake ram of {id}"))?;
        }
        let info = TemplateInfo {
            dir: dir.to_owned(),
            memory: memory.clone(),
            ram: None,
            ram_xxh64: None,
            disk: None,
            size_bytes: 0,
            took_ms: 1,
            qemu_version: "fake".into(),
            created_unix_ms: 0,
            spec: VmSpec {
                base_image: vm.root.clone(),
                ..vm.spec.clone()
            },
        };
        Ok(template::assemble(
            &memory,
            None,
            ram.as_deref(),
            dir,
            info,
        )?)
    }

    async fn clone_template(
        &self,
        spec: &VmSpec,
        template: &TemplateInfo,
    ) -> Result<Launched, VmmError> {
        if (spec.memory_mib, spec.vcpus) != (template.spec.memory_mib, template.spec.vcpus) {
            return Err(VmmError::Launch(
                "the spec differs from the template's configuration".into(),
            ));
        }
        let launched = self
            .launch(&VmSpec {
                base_image: template.spec.base_image.clone(),
                ..template::clone_spec(spec, template)
            })
            .await?;
        self.pause(&spec.id).await?;
        self.clones.fetch_add(1, Ordering::SeqCst);
        Ok(launched)
    }

    async fn attach_root(
        &self,
        id: &str,
        base_image: &std::path::Path,
        layers: &[std::path::PathBuf],
    ) -> Result<(), VmmError> {
        let mut vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        if layers.len() > vm.spec.layer_slots {
            return Err(VmmError::Launch(format!(
                "{} layers do not fit the shell's {} layer slots",
                layers.len(),
                vm.spec.layer_slots
            )));
        }
        vm.root = Some(base_image.to_owned());
        vm.spec.base_image = Some(base_image.to_owned());
        vm.spec.layers = layers.to_vec();
        vm.spec.pre_os = false;
        Ok(())
    }

    async fn add_forwards(
        &self,
        id: &str,
        forwards: &[crate::PortForward],
    ) -> Result<(), VmmError> {
        let mut listeners = Vec::new();
        for forward in forwards {
            listeners.push(bind(forward).await?);
        }
        let mut vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        for (forward, listener) in forwards.iter().zip(listeners) {
            let task = tokio::spawn(serve_http(listener, id.to_owned(), vm.paused.subscribe()));
            vm.forwards.insert(forward.host_port, task);
            vm.spec.forwards.push(forward.clone());
        }
        Ok(())
    }

    async fn remove_forwards(
        &self,
        id: &str,
        forwards: &[crate::PortForward],
    ) -> Result<(), VmmError> {
        let mut vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        for forward in forwards {
            let task = vm.forwards.remove(&forward.host_port).ok_or_else(|| {
                VmmError::Launch(format!("VM {id} has no forward from {}", forward.host_port))
            })?;
            task.abort();
            vm.spec.forwards.retain(|f| f != forward);
        }
        Ok(())
    }

    async fn set_memory(&self, id: &str, memory_mib: u32) -> Result<(), VmmError> {
        let mut vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        // As QEMU: a file-backed VM has no balloon.
        if !vm.spec.memory.is_anonymous() {
            return Err(VmmError::Launch(format!(
                "VM {id}'s memory is file-backed: it has no balloon"
            )));
        }
        vm.memory_mib = memory_mib;
        Ok(())
    }
}

impl FakeBackend {
    fn set_paused(&self, id: &str, paused: bool) -> Result<(), VmmError> {
        let vms = self.vms.lock().expect("fake vms lock");
        let vm = vms
            .get(id)
            .ok_or_else(|| VmmError::NotRunning(id.to_owned()))?;
        vm.paused.send_replace(paused);
        Ok(())
    }
}

/// Binds a forwarded port. A VM just stopped (archived, destroyed) frees its ports when its
/// aborted tasks are dropped, a moment later: retry briefly, as the host would see a port
/// come free when QEMU exits.
async fn bind(forward: &crate::PortForward) -> std::io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind((forward.host, forward.host_port)).await {
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            result => return result,
        }
    }
}

async fn serve_http(listener: TcpListener, id: String, paused: watch::Receiver<bool>) {
    while let Ok((mut stream, _)) = listener.accept().await {
        let id = id.clone();
        let mut paused = paused.clone();
        tokio::spawn(async move {
            // A paused VM accepts (the host's port forward does) but does not answer.
            while *paused.borrow_and_update() {
                if paused.changed().await.is_err() {
                    return;
                }
            }
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            let body = format!("fake {id}\n");
            let response = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// Speaks the guest side of the agent protocol.
async fn fake_guest(stream: tokio::io::DuplexStream) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = BufReader::new(read).lines();
    let hello = hangar_proto::encode(&GuestMessage::Hello {
        protocol: PROTOCOL_VERSION,
        kernel: "fake".into(),
        uptime_ms: 1,
    });
    if write.write_all(hello.as_bytes()).await.is_err() {
        return;
    }
    let reply = |id, ok, stdout: String| GuestMessage::Reply {
        id,
        ok,
        code: Some(0),
        stdout,
        stderr: String::new(),
        error: None,
    };
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(message) = hangar_proto::decode::<HostMessage>(&line) else {
            continue;
        };
        let answers = match message {
            HostMessage::Configure(config) => {
                let mut answers: Vec<_> = config
                    .services
                    .iter()
                    .zip(100u32..)
                    .map(|(service, pid)| GuestMessage::ServiceStarted {
                        name: service.name.clone(),
                        pid,
                    })
                    .collect();
                answers.push(GuestMessage::Configured { uptime_ms: 2 });
                answers
            }
            HostMessage::Reidentify { id, .. }
            | HostMessage::Ping { id }
            | HostMessage::CheckListen { id, .. }
            | HostMessage::Network { id, .. } => {
                vec![reply(id, true, String::new())]
            }
            HostMessage::Exec { id, argv, .. } => vec![reply(id, true, argv.join(" "))],
        };
        for answer in answers {
            if write
                .write_all(hangar_proto::encode(&answer).as_bytes())
                .await
                .is_err()
            {
                return;
            }
        }
    }
    tokio::time::sleep(Duration::ZERO).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PortForward;

    #[tokio::test]
    async fn fake_vm_answers_until_destroyed_and_holds_while_paused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let backend = FakeBackend::new();
        let spec = VmSpec {
            id: "vm-a".into(),
            vcpus: 1,
            memory_mib: 64,
            ram_tail_kib: 0,
            segment_nic: false,
            egress: hangar_core::EgressPolicy::Open,
            kernel: "k".into(),
            initramfs: "i".into(),
            cmdline: String::new(),
            base_image: None,
            layers: Vec::new(),
            forwards: vec![PortForward {
                host: "127.0.0.1".parse().unwrap(),
                host_port: port,
                guest_port: 80,
            }],
            pre_os: false,
            layer_slots: 0,
            background: false,
            template: None,
            firmware: false,
            memory: Default::default(),
        };
        let launched = backend.launch(&spec).await.unwrap();
        assert_eq!(
            launched
                .agent
                .configure(
                    hangar_proto::GuestConfig {
                        identity: hangar_proto::Identity {
                            hostname: "a".into(),
                            unix_time_ms: 0,
                            entropy_hex: String::new()
                        },
                        network: None,
                        root: None,
                        files: vec![],
                        services: vec![],
                    },
                    Duration::from_secs(2),
                )
                .await
                .unwrap(),
            2
        );

        let get = || async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).await.unwrap();
            body
        };
        assert!(get().await.ends_with("fake vm-a\n"));

        backend.pause("vm-a").await.unwrap();
        assert_eq!(backend.run_state("vm-a").await.unwrap(), RunState::Paused);
        let held = tokio::time::timeout(Duration::from_millis(100), get()).await;
        assert!(held.is_err(), "a paused fake VM must not answer");
        backend.resume("vm-a").await.unwrap();
        assert!(get().await.ends_with("fake vm-a\n"));

        assert_eq!(backend.running().await.unwrap(), ["vm-a"]);

        backend.fail_next_archive();
        assert!(matches!(
            backend.archive("vm-a", ArchiveTier::Zstd).await,
            Err(VmmError::Archive { .. })
        ));
        assert_eq!(backend.run_state("vm-a").await.unwrap(), RunState::Running);
        let info = backend.archive("vm-a", ArchiveTier::Zstd).await.unwrap();
        assert_eq!((info.tier, info.memory_mib), (ArchiveTier::Zstd, 64));
        assert_eq!(backend.archive_info("vm-a"), Some(info));
        assert_eq!(backend.run_state("vm-a").await.unwrap(), RunState::Gone);
        // The listener tasks are aborted: their sockets close once the runtime drops them.
        let closed = async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .expect("an archived fake VM has no listener");
        backend.restore(&spec).await.unwrap();
        assert_eq!(backend.archive_info("vm-a"), None);
        assert!(get().await.ends_with("fake vm-a\n"));
        assert!(matches!(
            backend.restore(&spec).await,
            Err(VmmError::Restore { .. })
        ));

        backend.destroy("vm-a").await.unwrap();
        assert_eq!(backend.run_state("vm-a").await.unwrap(), RunState::Gone);
        assert!(backend.adopt(&spec).await.unwrap().is_none());
    }
}
