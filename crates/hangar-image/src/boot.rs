//! How hangar guests are booted: the kernel command line and the host facts it needs.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kernel command line for a hangar guest on QEMU `microvm`.
///
/// `tsc_khz` is the guest's TSC frequency. Under TCG the guest reads the host's TSC, but
/// `microvm` has no PIT, HPET or ACPI PM timer to calibrate it against, and the kernel
/// hangs right after "tsc: Marking TSC unstable". Passing `tsc_early_khz` (the host's TSC
/// frequency, see [`host_tsc_khz`]) and `tsc=reliable` lets it boot and keep the TSC as
/// its clocksource. Under KVM the same values are correct (kvm-clock is used anyway).
pub fn kernel_cmdline(tsc_khz: Option<u64>) -> String {
    let mut line = String::from("console=ttyS0 quiet panic=-1 reboot=t");
    if let Some(khz) = tsc_khz {
        line.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    line
}

/// The host's TSC frequency in kHz, measured once per process (about 50 ms) against the
/// monotonic clock. `None` when the host TSC is not constant-rate (then no frequency
/// describes it) or the measurement is implausible.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        let constant = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|flags| flags.split_whitespace().any(|f| f == "constant_tsc"));
        if !constant {
            tracing::warn!("host TSC is not constant-rate; guests get no tsc_early_khz");
            return None;
        }
        let khz = measure_tsc_khz(Duration::from_millis(50));
        tracing::debug!(khz = ?khz, "measured the host TSC");
        khz
    })
}

fn measure_tsc_khz(window: Duration) -> Option<u64> {
    let start = Instant::now();
    let start_ticks = rdtsc();
    std::thread::sleep(window);
    let ticks = rdtsc().checked_sub(start_ticks)?;
    let elapsed_us = start.elapsed().as_micros() as u64;
    let khz = (ticks as u128 * 1000 / u128::from(elapsed_us.max(1))) as u64;
    // Sanity: between 100 MHz and 20 GHz.
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

fn rdtsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC is available on every x86_64 CPU and only reads a counter.
        unsafe { std::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_carries_the_tsc_frequency() {
        assert_eq!(
            kernel_cmdline(None),
            "console=ttyS0 quiet panic=-1 reboot=t"
        );
        assert_eq!(
            kernel_cmdline(Some(2_499_998)),
            "console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2499998 tsc=reliable"
        );
    }

    #[test]
    fn measures_a_plausible_tsc() {
        if let Some(khz) = host_tsc_khz() {
            assert!((100_000..20_000_000).contains(&khz), "{khz}");
        }
    }
}
