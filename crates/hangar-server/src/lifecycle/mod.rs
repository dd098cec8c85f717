//! A VM's life after it is made (seed 000's lifecycle).
//!
//! - [`ops`]: the operations on one VM: sleep (paused in memory), archive (memory snapshot
//!   on disk, no process), wake, delete; one at a time per VM.
//! - [`policy`]: lifecycle policies at run time (per-service idle timers, memory and disk
//!   budgets) and the loop that applies `hangar_core::lifecycle`'s pure decisions with
//!   [`ops`].

pub mod ops;
pub mod policy;

#[cfg(test)]
mod tests;
