//! The engine's cost model: estimated request → ready times, in milliseconds, from the
//! measurements in PLATFORM.md and the benchmarks (TCG on a 2-core host). They rank
//! candidates against each other; they promise nothing about a request's latency.

/// A paused pool VM resumed and given its identity.
pub const RESUME_MS: u64 = 50;
/// A resumed VM sliced down (balloon target set, vCPUs taken offline by the agent).
pub const SLICE_MS: u64 = 100;
/// A new VM cloned from its service's template, to its service answering.
pub const CLONE_MS: u64 = 300;
/// A pre-OS shell (QEMU already started) given a disk and booted to ready.
pub const SHELL_BOOT_MS: u64 = 1_600;
/// Each application layer attached to a shell at deploy (partial + install).
pub const ATTACH_LAYER_MS: u64 = 150;
/// A new busybox VM started and booted to ready.
pub const BOOT_BUSYBOX_MS: u64 = 1_900;
/// A new Debian VM started and booted to ready.
pub const BOOT_DEBIAN_MS: u64 = 3_000;
/// A busybox image made (one small ext4 disk).
pub const BUILD_BUSYBOX_MS: u64 = 1_000;
/// A Debian image built: debootstrap and package layers.
pub const BUILD_DEBIAN_MS: u64 = 60_000;
