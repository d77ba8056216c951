//! Where guest tests run: directly on this machine's KVM, or inside the virtual KVM host.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;

use crate::HarnessError;

/// Environment variable that forces a mode: `direct` or `vhost`.
pub const MODE_VARIABLE: &str = "KILN_TEST_MODE";

/// How the harness runs Kiln.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run `kiln` on this machine's `/dev/kvm`.
    Direct,
    /// Boot the virtual KVM host (QEMU TCG with emulated AMD SVM) once per suite and run every
    /// test's `kiln` inside it.
    VirtualHost,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::VirtualHost => "vhost",
        })
    }
}

/// The mode and why it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeChoice {
    /// The chosen mode.
    pub mode: Mode,
    /// Why, in words.
    pub reason: String,
}

/// What the choice depends on, gathered from the machine (separate so the rule can be tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// The value of `KILN_TEST_MODE`, if set.
    pub forced: Option<String>,
    /// `/sys/module/kvm_pvm` exists: `/dev/kvm` is PVM, where unmodified Linux guests do not boot.
    pub kvm_is_pvm: bool,
    /// The error opening `/dev/kvm` read-write, or `None` when it opened.
    pub kvm_open_error: Option<String>,
}

impl HostFacts {
    /// Looks at this machine.
    pub fn probe() -> Self {
        let kvm_open_error = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .err()
            .map(|error| error.to_string());
        Self {
            forced: std::env::var(MODE_VARIABLE).ok(),
            kvm_is_pvm: Path::new("/sys/module/kvm_pvm").exists(),
            kvm_open_error,
        }
    }
}

/// Decides the mode: the override if given, else direct when `/dev/kvm` opens and is not PVM,
/// else the virtual KVM host.
pub fn choose(facts: &HostFacts) -> Result<ModeChoice, HarnessError> {
    match facts.forced.as_deref() {
        Some("direct") => {
            return Ok(ModeChoice {
                mode: Mode::Direct,
                reason: format!("{MODE_VARIABLE}=direct"),
            })
        }
        Some("vhost") => {
            return Ok(ModeChoice {
                mode: Mode::VirtualHost,
                reason: format!("{MODE_VARIABLE}=vhost"),
            })
        }
        Some("") | None => {}
        Some(other) => {
            return Err(HarnessError::Setup(format!(
                "{MODE_VARIABLE}={other:?} is not a mode; use direct or vhost"
            )))
        }
    }
    let (mode, reason) = if facts.kvm_is_pvm {
        (
            Mode::VirtualHost,
            "/dev/kvm is PVM (/sys/module/kvm_pvm exists), where an unmodified Linux guest does \
             not boot"
                .to_string(),
        )
    } else if let Some(error) = &facts.kvm_open_error {
        (
            Mode::VirtualHost,
            format!("/dev/kvm cannot be opened read-write ({error})"),
        )
    } else {
        (Mode::Direct, "/dev/kvm opens and is not PVM".to_string())
    };
    Ok(ModeChoice { mode, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(forced: Option<&str>, pvm: bool, open_error: Option<&str>) -> HostFacts {
        HostFacts {
            forced: forced.map(str::to_string),
            kvm_is_pvm: pvm,
            kvm_open_error: open_error.map(str::to_string),
        }
    }

    #[test]
    fn real_kvm_runs_directly() {
        assert_eq!(
            choose(&facts(None, false, None)).unwrap().mode,
            Mode::Direct
        );
    }

    #[test]
    fn pvm_or_missing_kvm_uses_the_virtual_host() {
        assert_eq!(
            choose(&facts(None, true, None)).unwrap().mode,
            Mode::VirtualHost
        );
        let choice = choose(&facts(None, false, Some("No such file or directory"))).unwrap();
        assert_eq!(choice.mode, Mode::VirtualHost);
        assert!(choice.reason.contains("No such file"));
    }

    #[test]
    fn override_wins_and_is_validated() {
        assert_eq!(
            choose(&facts(Some("direct"), true, None)).unwrap().mode,
            Mode::Direct
        );
        assert_eq!(
            choose(&facts(Some("vhost"), false, None)).unwrap().mode,
            Mode::VirtualHost
        );
        assert!(choose(&facts(Some("fast"), false, None)).is_err());
    }
}
