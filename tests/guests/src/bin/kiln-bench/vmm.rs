//! The two VMMs compared and how each is asked to run a test guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_test_guests::GuestKind;

use crate::measure::{run_once, Scratch};

/// One VM to start.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// Which test guest.
    pub guest: GuestKind,
    /// Its kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
}

/// Which VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmKind {
    /// Kiln, `kiln run`.
    Kiln,
    /// QEMU `-M microvm` on KVM.
    Qemu,
    /// `kvm-floor` (resources/bench/floor.c): the least a VMM must do to run the `exit` guest.
    Floor,
}

/// A VMM binary.
#[derive(Clone, Debug)]
pub struct Vmm {
    /// Which VMM.
    pub kind: VmmKind,
    /// Its executable.
    pub binary: PathBuf,
}

impl Vmm {
    /// Display name.
    pub fn name(&self) -> &'static str {
        match self.kind {
            VmmKind::Kiln => "Kiln",
            VmmKind::Qemu => "QEMU microvm",
            VmmKind::Floor => "Floor (kvm-floor)",
        }
    }

    /// The command that boots `vm` with its console on stdout.
    pub fn command(&self, vm: &VmSpec) -> Command {
        let mut command = Command::new(&self.binary);
        let guest = vm.guest.path();
        match self.kind {
            VmmKind::Kiln => {
                command
                    .arg("run")
                    .arg("--kernel")
                    .arg(guest)
                    .arg("--cmdline")
                    .arg(&vm.cmdline)
                    .arg("--cpus")
                    .arg(vm.cpus.to_string())
                    .arg("--memory")
                    .arg(format!("{}M", vm.memory_mib))
                    .args(["--console", "stdio"]);
            }
            VmmKind::Qemu => {
                // `-cpu host` is not used: QEMU 7.2 aborts on PVM setting MSR 0x10a with it.
                command
                    .args(["-M", "microvm", "-accel", "kvm", "-smp"])
                    .arg(vm.cpus.to_string())
                    .arg("-m")
                    .arg(format!("{}M", vm.memory_mib))
                    .args(["-nodefaults", "-no-user-config", "-no-reboot"])
                    .args(["-display", "none", "-serial", "stdio", "-kernel"])
                    .arg(guest)
                    .arg("-append")
                    .arg(&vm.cmdline);
            }
            // One vCPU, no command line, no console: only the `exit` guest runs on it.
            VmmKind::Floor => {
                command.arg(guest).arg(vm.memory_mib.to_string());
            }
        }
        command
    }

    /// First line of `--version`, for the report.
    pub fn version(&self) -> String {
        if self.kind == VmmKind::Floor {
            return "resources/bench/floor.c".to_string();
        }
        Command::new(&self.binary)
            .arg("--version")
            .output()
            .ok()
            .and_then(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown version".to_string())
    }

    /// Boots the `exit` guest once; `Err` says why this VMM cannot take part.
    pub fn probe(&self, scratch: &mut Scratch, timeout: Duration) -> Result<(), String> {
        if !self.binary.is_file() && !is_on_path(&self.binary) {
            return Err(format!("{} not found", self.binary.display()));
        }
        let vm = VmSpec {
            guest: GuestKind::Exit,
            cmdline: String::new(),
            memory_mib: 128,
            cpus: 1,
        };
        match run_once(&mut self.command(&vm), scratch, timeout) {
            Ok(sample) if sample.code == 0 => Ok(()),
            Ok(sample) => Err(format!(
                "the `exit` guest did not end cleanly: {}",
                sample.describe()
            )),
            Err(err) => Err(err.to_string()),
        }
    }
}

fn is_on_path(binary: &Path) -> bool {
    if binary.components().count() != 1 {
        return false;
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}
