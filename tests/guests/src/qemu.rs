//! QEMU command lines that run the test guests, for the TCG tests and the benchmark peer.

use std::path::Path;
use std::process::Command;

use crate::direct_entry_shim_path;

/// The QEMU binary used (from `PATH`).
pub const QEMU: &str = "qemu-system-x86_64";

/// Where the direct-entry shim finds a raw copy of the guest ELF (needs >= 64 MiB of RAM).
pub const GUEST_RAW_COPY_ADDR: u64 = 0x300_0000;

/// How QEMU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// QEMU's own PVH boot of the guest ELF (32-bit entry from the ELF note).
    Pvh,
    /// Through the direct-entry shim: Kiln's boot state, then the guest's 64-bit `e_entry`.
    Direct,
}

/// What to run and how.
#[derive(Clone, Debug)]
pub struct QemuRun<'a> {
    /// Machine type, e.g. `microvm` or `q35`.
    pub machine: &'a str,
    /// Accelerator, e.g. `tcg` or `kvm`.
    pub accel: &'a str,
    /// The guest ELF.
    pub guest: &'a Path,
    /// How it is entered.
    pub entry: Entry,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
}

impl QemuRun<'_> {
    /// The QEMU command: no default devices, COM1 on stdout, exit instead of rebooting.
    pub fn command(&self) -> Command {
        let mut command = Command::new(QEMU);
        command
            .args(["-M", self.machine, "-accel", self.accel])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio", "-m"])
            .arg(format!("{}M", self.memory_mib));
        match self.entry {
            Entry::Pvh => {
                command.arg("-kernel").arg(self.guest);
            }
            Entry::Direct => {
                let guest = self.guest.display();
                command
                    .arg("-kernel")
                    .arg(direct_entry_shim_path())
                    .arg("-device")
                    .arg(format!("loader,file={guest}"))
                    .arg("-device")
                    .arg(format!(
                        "loader,file={guest},addr={GUEST_RAW_COPY_ADDR:#x},force-raw=on"
                    ));
            }
        }
        command.arg("-append").arg(self.cmdline);
        command
    }
}
