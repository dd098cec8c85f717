//! The VM state machine (DESIGN.md): every state change goes through [`valid_transition`].
//!
//! ```text
//! creating → booting → ready (paused, warm pool) → active → sleeping → archived → deleted
//!                   ╰──────────────→ active          ↑ ╰───────╯  │        │
//!                                                    ╰────────────┴────────╯ (wake)
//! any live state → failed → deleted
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Files and reservations are being made; no process yet.
    Creating,
    /// The QEMU process runs; the guest has not met its ready criterion.
    Booting,
    /// Met its ready criterion and paused in a warm pool.
    Ready,
    /// Running and handed to a client.
    Active,
    /// Paused in memory after being idle.
    Sleeping,
    /// Memory snapshot on disk; no process.
    Archived,
    /// Gone: no process, no files. Terminal.
    Deleted,
    /// Something broke; kept for inspection until deleted.
    Failed,
    /// Its host stopped answering long enough to be declared lost. The VM may still run
    /// there: the control plane keeps its record (never deletes data on a host it cannot
    /// reach) and, when the host returns, has the host destroy it (fencing). Then deleted.
    Lost,
}

impl VmState {
    pub const ALL: [VmState; 9] = [
        VmState::Creating,
        VmState::Booting,
        VmState::Ready,
        VmState::Active,
        VmState::Sleeping,
        VmState::Archived,
        VmState::Deleted,
        VmState::Failed,
        VmState::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Creating => "creating",
            VmState::Booting => "booting",
            VmState::Ready => "ready",
            VmState::Active => "active",
            VmState::Sleeping => "sleeping",
            VmState::Archived => "archived",
            VmState::Deleted => "deleted",
            VmState::Failed => "failed",
            VmState::Lost => "lost",
        }
    }

    /// Whether a QEMU process is expected to exist in this state.
    pub fn has_process(self) -> bool {
        match self {
            VmState::Booting | VmState::Ready | VmState::Active | VmState::Sleeping => true,
            VmState::Creating
            | VmState::Archived
            | VmState::Deleted
            | VmState::Failed
            | VmState::Lost => false,
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VmState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        VmState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown VM state {0:?}")]
pub struct UnknownState(pub String);

/// Whether a VM may go from `from` to `to`. Staying in the same state is not a transition.
pub fn valid_transition(from: VmState, to: VmState) -> bool {
    use VmState::*;
    match (from, to) {
        (Creating, Booting) => true,
        (Booting, Ready | Active) => true,
        (Ready, Active) => true,
        (Active, Sleeping | Archived) => true,
        (Sleeping, Active | Archived) => true,
        (Archived, Active) => true,
        // Anything not yet gone may fail or be deleted; a failed VM may only be deleted.
        (Creating | Booting | Ready | Active | Sleeping | Archived, Failed | Deleted) => true,
        (Failed, Deleted) => true,
        // Its host was lost: only deletion (once the host destroyed it, or an operator
        // gave it up) follows.
        (Creating | Booting | Ready | Active | Sleeping | Archived, Lost) => true,
        (Lost, Deleted) => true,
        (Creating, Creating | Ready | Active | Sleeping | Archived) => false,
        (Booting, Creating | Booting | Sleeping | Archived) => false,
        (Ready, Creating | Booting | Ready | Sleeping | Archived) => false,
        (Active, Creating | Booting | Ready | Active) => false,
        (Sleeping, Creating | Booting | Ready | Sleeping) => false,
        (Archived, Creating | Booting | Ready | Sleeping | Archived) => false,
        (Deleted, _) => false,
        (Failed, Creating | Booting | Ready | Active | Sleeping | Archived | Failed | Lost) => {
            false
        }
        (Lost, Creating | Booting | Ready | Active | Sleeping | Archived | Failed | Lost) => false,
    }
}

/// A refused state change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a VM cannot go from {from} to {to}")]
pub struct InvalidTransition {
    pub from: VmState,
    pub to: VmState,
}

/// [`valid_transition`] as a `Result`, for `?`.
pub fn check_transition(from: VmState, to: VmState) -> Result<(), InvalidTransition> {
    if valid_transition(from, to) {
        Ok(())
    } else {
        Err(InvalidTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VmState::*;

    /// The whole table, written out: (from, to) pairs that are allowed.
    const ALLOWED: &[(VmState, VmState)] = &[
        (Creating, Booting),
        (Creating, Failed),
        (Creating, Deleted),
        (Booting, Ready),
        (Booting, Active),
        (Booting, Failed),
        (Booting, Deleted),
        (Ready, Active),
        (Ready, Failed),
        (Ready, Deleted),
        (Active, Sleeping),
        (Active, Archived),
        (Active, Failed),
        (Active, Deleted),
        (Sleeping, Active),
        (Sleeping, Archived),
        (Sleeping, Failed),
        (Sleeping, Deleted),
        (Archived, Active),
        (Archived, Failed),
        (Archived, Deleted),
        (Failed, Deleted),
        (Creating, Lost),
        (Booting, Lost),
        (Ready, Lost),
        (Active, Lost),
        (Sleeping, Lost),
        (Archived, Lost),
        (Lost, Deleted),
    ];

    #[test]
    fn every_pair_matches_the_table() {
        for from in VmState::ALL {
            for to in VmState::ALL {
                let expected = ALLOWED.contains(&(from, to));
                assert_eq!(
                    valid_transition(from, to),
                    expected,
                    "{from} -> {to} should be {}",
                    if expected { "allowed" } else { "refused" }
                );
            }
        }
    }

    #[test]
    fn deleted_is_terminal_and_self_loops_are_refused() {
        for state in VmState::ALL {
            assert!(!valid_transition(Deleted, state));
            assert!(!valid_transition(state, state));
        }
    }

    #[test]
    fn every_state_but_deleted_can_reach_deleted() {
        for state in VmState::ALL {
            if state != Deleted {
                assert!(valid_transition(state, Deleted), "{state}");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for state in VmState::ALL {
            assert_eq!(state.as_str().parse::<VmState>().unwrap(), state);
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        assert!("paused".parse::<VmState>().is_err());
    }

    #[test]
    fn check_transition_reports_both_ends() {
        let err = check_transition(Archived, Ready).unwrap_err();
        assert_eq!(err.to_string(), "a VM cannot go from archived to ready");
    }
}
