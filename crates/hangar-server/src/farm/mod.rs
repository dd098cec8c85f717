//! The farm: hosts beyond the server's own, each run by a `hangar agent`.
//!
//! - [`token`]: the farm token hosts prove themselves with.

pub mod token;
