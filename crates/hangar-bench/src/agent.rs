//! A `hangar agent` the benchmarks start on 127.0.0.1 (a free port, a temporary data dir of
//! its own whose `cache` links to the shared cache), registered with a [`BenchServer`];
//! stopped, with every VM it made, when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::BenchError;
use crate::server::{BenchServer, free_port, temp_data_dir};

/// `hangar agent` started by a benchmark.
pub struct BenchAgent {
    /// Its host name in the farm.
    pub name: String,
    child: Child,
    data_dir: tempfile::TempDir,
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Agents leave VMs and their segment namespace by design; the benchmark's are
        // stopped and deleted here.
        for (_, pid) in hangar_vmm::procs::qemu_processes_under(&self.data_dir.path().join("vms")) {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid belongs to a QEMU
            // whose pid file lies in this agent's own data dir.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        crate::server::remove_segment_netns(self.data_dir.path());
    }
}

impl BenchAgent {
    /// Starts `hangar agent --name NAME --priority PRIORITY --no-templates` for `server`.
    pub fn start(
        server: &BenchServer,
        cache: &Path,
        accel: &str,
        name: &str,
        priority: u32,
    ) -> Result<BenchAgent, String> {
        let data_dir = temp_data_dir("hgagent", cache)?;
        let port = free_port()?;
        let log = std::fs::File::create(data_dir.path().join("agent.log"))
            .map_err(|err| err.to_string())?;
        let child = Command::new(crate::hangar::hangar_exe()?)
            .args(["agent", "--server", &server.url, "--name", name])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--priority", &priority.to_string()])
            .args(["--no-templates", "--accel", accel])
            .arg("--token-file")
            .arg(server.data_dir().join("farm.token"))
            .arg("--data-dir")
            .arg(data_dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|err| err.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|err| format!("cannot start the agent: {err}"))?;
        Ok(BenchAgent {
            name: name.to_owned(),
            child,
            data_dir,
        })
    }

    /// The last lines of the agent's log, for error reports.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.data_dir.path().join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The ids of the VMs whose QEMU runs on this agent's host.
    pub fn qemus(&self) -> Vec<String> {
        hangar_vmm::procs::qemu_processes_under(&self.data_dir.path().join("vms"))
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// Waits (at most 2 minutes) until the server lists this agent's host as `up`.
    pub async fn wait_up(&self, server: &BenchServer) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let hosts: Vec<hangar_api::HostView> = server.client.get("/v1/hosts").await?;
            if hosts
                .iter()
                .any(|host| host.name == self.name && host.state == "up")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!(
                    "agent {} did not register within 2 minutes:\n{}",
                    self.name,
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Whether the `hangar` executable has the `agent` command.
pub fn agent_available() -> bool {
    crate::hangar::hangar_exe().is_ok_and(|exe| {
        Command::new(exe)
            .args(["agent", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    })
}
