//! Choosing the accelerator. KVM is the right choice on bare metal; inside a VM (nested
//! virtualisation) KVM can be far slower than QEMU's TCG software emulation, so `auto` only
//! picks KVM when `/dev/kvm` is usable and the CPU does not report running under a
//! hypervisor.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?} (auto, kvm or tcg)")),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// Resolves `auto` on this machine; `kvm` and `tcg` stay as they are.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                let kvm_usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                choose(kvm_usable, nested(&cpuinfo))
            }
            fixed => fixed,
        }
    }

    /// QEMU arguments selecting this accelerator (call on a resolved value).
    pub fn qemu_args(self) -> &'static [&'static str] {
        match self {
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg | Accel::Auto => &["-accel", "tcg"],
        }
    }
}

/// Whether `/proc/cpuinfo` says this machine is itself a VM.
fn nested(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|flag| flag == "hypervisor"))
}

fn choose(kvm_usable: bool, nested: bool) -> Accel {
    if kvm_usable && !nested {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_kvm_only_on_bare_metal() {
        assert_eq!(choose(true, false), Accel::Kvm);
        assert_eq!(choose(true, true), Accel::Tcg);
        assert_eq!(choose(false, false), Accel::Tcg);
        assert!(nested(
            "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n"
        ));
        assert!(!nested("flags\t\t: fpu vme lahf_lm\n"));
        assert_eq!(Accel::Kvm.resolve(), Accel::Kvm);
        assert_ne!(Accel::Auto.resolve(), Accel::Auto);
    }

    #[test]
    fn parses_and_prints() {
        for accel in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(accel.to_string().parse::<Accel>().unwrap(), accel);
        }
        assert!(
            "xen"
                .parse::<Accel>()
                .unwrap_err()
                .contains("auto, kvm or tcg")
        );
    }
}
