//! hangar's domain model. Pure: no IO, no clocks, no processes.
//!
//! - [`alerts`]: alert rules, and when an alert fires and resolves (no flapping).
//! - [`ids`]: identifiers of VMs and tasks.
//! - [`evacuation`]: where the VMs of a host being evacuated go (placement's rules, counting
//!   those already sent).
//! - [`exposure`]: which addresses APIs may listen on and endpoints be advertised at.
//! - [`state`]: the VM state machine and its one `valid_transition`.
//! - [`catalog`]: services, their ports, processes, files and ready criteria.
//! - [`compose`]: several applications on one VM, their union checked for clashes.
//! - [`egress`]: what a VM's guest may reach out of its user-mode NIC.
//! - [`heuristics`]: validating a configuration request and ranking what can serve it.
//! - [`lifecycle`]: lifecycle policies (idle timers, keep-active, budgets) as pure decisions.
//! - [`placement`]: which host runs a new VM (capacity, isolation, priority, load, cost).
//! - [`rebalance`]: which running VMs to move so that the farm's hosts are evenly loaded.
//! - [`request`]: what a client asks for and what it gets back.
//! - [`role`]: the roles of users and API tokens.
//! - [`stack`]: stacks of several services on a private segment: the file, validation, the
//!   address plan and the order members are made and woken in.
//! - [`suggest`]: closest names, for errors that offer alternatives.

pub mod alerts;
pub mod catalog;
pub mod components;
pub mod compose;
pub mod egress;
pub mod evacuation;
pub mod eviction;
pub mod exposure;
pub mod heuristics;
pub mod ids;
pub mod lifecycle;
pub mod matching;
pub mod placement;
pub mod pool;
pub mod quota;
pub mod rebalance;
pub mod request;
pub mod role;
pub mod stack;
pub mod state;
pub mod suggest;
pub mod usage;

pub use catalog::{Catalog, CatalogError, ReadyCheck, ReadySpec, Service, WakeOn};
pub use egress::EgressPolicy;
pub use ids::{TaskId, VmId};
pub use lifecycle::{Policy, TierChoice};
pub use request::{Mode, ServiceRequest};
pub use role::Role;
pub use state::{VmState, valid_transition};
