//! The local host's side of private segments (see [`crate::segment`]): joining and
//! leaving, and re-binding a VM's port when a host process adopts or restores it.

use std::path::Path;
use std::time::Duration;

use hangar_vmm::SegmentNic;

use super::LocalHost;
use crate::segment::SegmentError;
use crate::{HostError, SegmentJoin};

/// How long the guest may take to apply a join (restarting services included).
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

impl LocalHost {
    /// [`crate::Host::join_segment`] here.
    pub(super) async fn join(&self, id: &str, join: &SegmentJoin) -> Result<(), HostError> {
        join.validate()?;
        let agent = self.agent(id)?;
        let nic = self.segment_nic(id).await?;
        self.segments
            .attach(&join.segment, id, &nic, &self.give_socket(id))?;
        let reply = agent
            .private_network(join.guest_network(), JOIN_TIMEOUT)
            .await?;
        if !reply.ok {
            return Err(HostError::Guest(format!(
                "VM {id} could not join segment {}: {}",
                join.segment,
                reply.error.unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// [`crate::Host::leave_segment`] here.
    pub(super) fn leave(&self, id: &str) {
        self.segments.detach(id);
    }

    /// Binds VM `id`'s port again if it had joined a segment (a host process started
    /// again and adopted it, or it was restored after one did). Logged, never fatal: the
    /// VM runs either way, without its segment until it joins again.
    pub(super) async fn rejoin(&self, id: &str) {
        let Some(nic) = self.hv.segment_nic(id).await else {
            return;
        };
        match self.segments.rejoin(id, &nic, &self.give_socket(id)) {
            Ok(Some(segment)) => tracing::debug!(vm = %id, segment, "segment port bound again"),
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(vm = %id, error = %crate::local::error_chain(&err), "cannot rejoin segment")
            }
        }
    }

    async fn segment_nic(&self, id: &str) -> Result<SegmentNic, SegmentError> {
        self.hv
            .segment_nic(id)
            .await
            .ok_or_else(|| SegmentError::NoNic(id.to_owned()))
    }

    fn give_socket(&self, id: &str) -> impl Fn(&Path) -> std::io::Result<()> + '_ {
        let id = id.to_owned();
        move |path: &Path| {
            self.hv
                .give_socket(&id, path)
                .map_err(|err| std::io::Error::other(err.to_string()))
        }
    }

    /// The segments with a switch here and what each forwarded and dropped.
    pub fn segment_stats(&self) -> Vec<(String, crate::segment::SegmentStats)> {
        self.segments.stats()
    }

    /// Runs `argv` in VM `id`'s guest (its root) through the agent channel: for tests and
    /// benchmarks that look from inside a guest.
    pub async fn guest_exec(
        &self,
        id: &str,
        argv: &[&str],
        timeout: Duration,
    ) -> Result<hangar_vmm::agent::Reply, HostError> {
        let agent = self.agent(id)?;
        Ok(agent
            .exec(argv.iter().map(|a| a.to_string()).collect(), timeout)
            .await?)
    }
}
