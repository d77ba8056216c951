//! What a VM is made of, as users and embedders describe it.
//!
//! A [`VmConfig`] comes from a JSON file, from CLI flags, or from Rust code. It is checked by
//! [`VmConfig::validate`] before anything touches KVM, so a typo ends in a message that names the
//! field, not in a half-built VM.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod channels;
mod disk;
mod memory;
mod net;
pub use channels::{RngConfig, VsockConfig};
pub use disk::{disk_name, DiskConfig, MAX_DISKS};
pub use kiln_devices::virtio::net::MacAddress;
pub use memory::{HugePages, HUGE_PAGE_MIB, THP_SKIP_BYTES};
pub use net::{default_mac, HostForward, NetConfig};

/// Smallest guest memory Kiln accepts: below this a Linux guest cannot boot usefully.
pub const MIN_MEMORY_MIB: u32 = 32;
/// Guest memory when none is asked for.
pub const DEFAULT_MEMORY_MIB: u32 = 512;
/// vCPUs when none are asked for.
pub const DEFAULT_CPUS: u8 = 1;
/// Highest vCPU count: the MP table and xAPIC ids stop at 254 CPUs (255 is the IOAPIC id).
pub const MAX_CPUS: u8 = 254;
/// Kiln's own kernel arguments, placed before the user's.
///
/// `reboot=k` makes `reboot` use the i8042 reset Kiln turns into a clean exit; `panic=-1` reboots
/// at once after a panic (the pvpanic port tells Kiln it was a panic); `pci=off` skips probing a
/// bus the microVM does not have; one 8250 port is all there is.
pub const DEFAULT_KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// Guest output to Kiln's stdout, Kiln's stdin to the guest.
    #[default]
    Stdio,
    /// Guest output to a file (created or truncated); no input.
    File(PathBuf),
    /// Guest output discarded; no input.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = ConfigError;

    /// Parses the CLI form: `stdio`, `file=PATH` or `none`.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match value.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::InvalidConsole(value.to_string())),
            },
        }
    }
}

/// A whole microVM description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: an ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// Optional initramfs, loaded high in low memory.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended after [`DEFAULT_KERNEL_CMDLINE`].
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Serial console routing.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Disks, in the order the guest sees them (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The page size behind guest RAM.
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Whether [`DEFAULT_KERNEL_CMDLINE`] comes before `cmdline`. The Firecracker API turns it
    /// off: there the boot arguments replace the defaults.
    #[serde(default = "yes")]
    pub default_cmdline: bool,
    /// Track the pages the guest and devices write, so that diff snapshots can save only
    /// those (costs a little speed on guest writes while on).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A vsock device whose host side is a Unix socket (none when absent).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The entropy device (on by default).
    #[serde(default)]
    pub rng: RngConfig,
    /// NICs, in the order the guest sees them (`eth0`, `eth1`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<NetConfig>,
}

fn yes() -> bool {
    true
}

fn default_cpus() -> u8 {
    DEFAULT_CPUS
}

fn default_memory_mib() -> u32 {
    DEFAULT_MEMORY_MIB
}

/// A configuration Kiln refuses, with the reason in words a user can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The JSON file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The JSON did not parse or had unknown fields or wrong types.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message: names the field and the line.
        reason: String,
    },
    /// No kernel was given.
    #[error("no kernel given: pass --kernel PATH (an ELF vmlinux or a bzImage)")]
    MissingKernel,
    /// A file named in the config does not exist or is not a regular file.
    #[error("{what} '{path}' {problem}")]
    BadFile {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// "does not exist", "is not a regular file", ...
        problem: String,
    },
    /// cpus is 0 or too large.
    #[error("invalid vCPU count {0}: must be between 1 and {max}", max = MAX_CPUS)]
    InvalidCpus(u32),
    /// Memory size did not parse.
    #[error("invalid memory size '{0}': use a number with an optional K, M or G suffix, e.g. 512M or 2G (a bare number means MiB)")]
    InvalidMemorySize(String),
    /// Memory below the minimum.
    #[error("guest memory of {0} MiB is too small: Kiln needs at least {min} MiB", min = MIN_MEMORY_MIB)]
    MemoryTooSmall(u64),
    /// Memory that is not a whole number of MiB.
    #[error("guest memory '{0}' is not a whole number of MiB")]
    MemoryNotWholeMib(String),
    /// Memory larger than the host can give.
    #[error("guest memory of {asked} MiB is more than this host has ({host} MiB in total)")]
    MemoryTooLarge {
        /// What was asked for.
        asked: u64,
        /// The host's MemTotal.
        host: u64,
    },
    /// Console option did not parse.
    #[error("invalid console '{0}': use stdio, none or file=PATH")]
    InvalidConsole(String),
    /// The command line does not fit the boot protocol.
    #[error("kernel command line is {len} bytes with Kiln's defaults; the x86 boot protocol allows at most {max}")]
    CmdlineTooLong {
        /// Full length including Kiln's defaults.
        len: usize,
        /// Longest allowed (without the NUL terminator).
        max: usize,
    },
    /// The command line holds a byte the kernel cannot take.
    #[error("kernel command line contains a NUL byte or non-ASCII character")]
    CmdlineInvalid,
    /// A `--disk` argument did not parse.
    #[error("invalid --disk '{spec}': {reason}")]
    InvalidDiskSpec {
        /// The argument.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A disk was refused.
    #[error("disk {index} ('{path}') {problem}", path = path.display())]
    BadDisk {
        /// Its position among the disks, from 1.
        index: usize,
        /// Its image.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// More disks than virtio-mmio slots.
    #[error("{0} disks asked for; Kiln has room for at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// A huge page setting did not parse.
    #[error("invalid huge pages '{0}': use None, Transparent or 2M")]
    InvalidHugePages(String),
    /// hugetlbfs pages need memory in whole huge pages.
    #[error(
        "guest memory of {0} MiB is not a multiple of the 2 MiB huge page size (huge_pages 2M)"
    )]
    MemoryNotHugePageMultiple(u32),
    /// More virtio devices than virtio-mmio slots.
    #[error("{disks} disks plus {others} other virtio devices (vsock, rng, NICs) asked for; Kiln has room for at most {MAX_DISKS} virtio devices (turn the rng off with --rng off)")]
    TooManyDevices {
        /// Disks asked for.
        disks: usize,
        /// vsock, rng and net devices.
        others: usize,
    },
    /// A `--vsock` argument did not parse.
    #[error("invalid --vsock '{spec}': {reason}")]
    InvalidVsockSpec {
        /// The argument.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The vsock device was refused.
    #[error("vsock socket '{path}' {problem}", path = path.display())]
    BadVsock {
        /// Its Unix socket path.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A `--net` argument did not parse.
    #[error("invalid --net '{spec}': {reason}")]
    InvalidNetSpec {
        /// The argument.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A NIC was refused.
    #[error("NIC {index}: {problem}")]
    BadNet {
        /// Its position among the NICs, from 0 (the guest's `eth<index>`).
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// An `--rng` argument did not parse.
    #[error("invalid --rng '{spec}': {reason}")]
    InvalidRngSpec {
        /// The argument.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: ConsoleConfig::default(),
            disks: Vec::new(),
            huge_pages: HugePages::default(),
            default_cmdline: true,
            track_dirty_pages: false,
            vsock: None,
            rng: RngConfig::default(),
            nets: Vec::new(),
        }
    }

    /// Reads a JSON config file; unknown fields and wrong types are errors that name the field.
    pub fn from_json_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::ReadFile {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        Self::from_json_str(&text).map_err(|reason| ConfigError::Parse {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses JSON text; the error is serde's message (field name, line and column).
    pub fn from_json_str(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|err| err.to_string())
    }

    /// The full kernel command line: Kiln's defaults, the root disk, then the user's arguments.
    pub fn full_cmdline(&self) -> String {
        self.kernel_cmdline(&[])
    }

    /// Whether the kernel is told to ignore ACPI (`acpi=off` among the kernel's arguments, i.e.
    /// before a `--`). Virtio devices are then announced on the command line instead of in the
    /// DSDT: the guest must find each device exactly once (a second announcement of the same
    /// window fails to probe with `-EBUSY`).
    pub fn acpi_off(&self) -> bool {
        let kernel_args = self
            .cmdline
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .take_while(|arg| *arg != "--");
        let mut off = false;
        for arg in kernel_args {
            // The last `acpi=` wins, as in the kernel.
            if let Some(value) = arg.strip_prefix("acpi=") {
                off = value == "off";
            }
        }
        off
    }

    /// The kernel command line with `device_args` (the device manager's `virtio_mmio.device=`
    /// entries) after Kiln's defaults and the root disk, and before the user's arguments, which
    /// may end in `-- ARGS FOR INIT`.
    pub fn kernel_cmdline(&self, device_args: &[String]) -> String {
        let mut args = Vec::new();
        if self.default_cmdline {
            args.push(DEFAULT_KERNEL_CMDLINE.to_string());
        }
        if let Some(index) = self.disks.iter().position(|disk| disk.root) {
            let disk = &self.disks[index];
            let mode = if disk.readonly { "ro" } else { "rw" };
            match &disk.partuuid {
                Some(partuuid) => args.push(format!("root=PARTUUID={partuuid} {mode}")),
                None => args.push(format!("root=/dev/{} {mode}", disk_name(index))),
            }
        }
        args.extend(device_args.iter().cloned());
        match self.cmdline.as_deref().map(str::trim) {
            Some(extra) if !extra.is_empty() => args.push(extra.to_string()),
            _ => {}
        }
        args.join(" ")
    }

    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Checks everything that can be checked without KVM. `host_memory_mib` is the host's total
    /// memory (None when unknown: the check is skipped).
    pub fn validate(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        self.validate_boot_source()?;
        self.validate_machine(host_memory_mib)?;
        self.validate_disks()?;
        self.validate_cmdline()
    }

    /// The kernel (and initrd) exist and are regular files.
    pub fn validate_boot_source(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::MissingKernel);
        }
        check_regular_file("kernel image", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_regular_file("initrd", initrd)?;
        }
        Ok(())
    }

    /// vCPU count, memory size and huge pages fit together and fit the host.
    pub fn validate_machine(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::InvalidCpus(u32::from(self.cpus)));
        }
        let memory = u64::from(self.memory_mib);
        if memory < u64::from(MIN_MEMORY_MIB) {
            return Err(ConfigError::MemoryTooSmall(memory));
        }
        if let Some(host) = host_memory_mib {
            if memory > host {
                return Err(ConfigError::MemoryTooLarge {
                    asked: memory,
                    host,
                });
            }
        }
        self.huge_pages.check_memory(self.memory_mib)
    }

    /// The virtio devices: disks (files there, at most one root, no image twice, serials that
    /// fit), the vsock and rng settings, and all of them fit the virtio-mmio slots.
    pub fn validate_disks(&self) -> Result<(), ConfigError> {
        disk::validate_disks(&self.disks)?;
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        self.rng.validate()?;
        net::validate_nets(&self.nets, &self.net_macs())?;
        let others =
            usize::from(self.vsock.is_some()) + usize::from(self.rng.enabled) + self.nets.len();
        if self.disks.len() + others > MAX_DISKS {
            return Err(ConfigError::TooManyDevices {
                disks: self.disks.len(),
                others,
            });
        }
        Ok(())
    }

    /// Each NIC's MAC address: the configured one, or a stable one derived from the config.
    pub fn net_macs(&self) -> Vec<kiln_devices::virtio::net::MacAddress> {
        let kernel = self.kernel.as_os_str().as_encoded_bytes();
        let mut identity: Vec<&[u8]> = vec![kernel];
        identity.extend(
            self.disks
                .iter()
                .map(|disk| disk.path.as_os_str().as_encoded_bytes()),
        );
        if let Some(vsock) = &self.vsock {
            identity.push(vsock.uds.as_os_str().as_encoded_bytes());
        }
        self.nets
            .iter()
            .enumerate()
            .map(|(index, net)| {
                net.mac
                    .unwrap_or_else(|| default_mac(&identity, index, net))
            })
            .collect()
    }

    /// The full command line is ASCII and fits the boot protocol.
    pub fn validate_cmdline(&self) -> Result<(), ConfigError> {
        let cmdline = self.full_cmdline();
        if !cmdline.is_ascii() || cmdline.contains('\0') {
            return Err(ConfigError::CmdlineInvalid);
        }
        let max = kiln_arch::layout::CMDLINE_MAX_SIZE - 1;
        if cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len(),
                max,
            });
        }
        Ok(())
    }
}

fn check_regular_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let problem = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => return Ok(()),
        Ok(meta) if meta.is_dir() => "is a directory, not a file".to_string(),
        Ok(_) => "is not a regular file".to_string(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(err) => format!("cannot be read: {err}"),
    };
    Err(ConfigError::BadFile {
        what,
        path: path.to_path_buf(),
        problem,
    })
}

/// Parses a memory size for the CLI: `512`, `512M`, `2G`, `2GiB`, `524288K` (a bare number is
/// MiB).
/// Returns MiB; sizes that are not whole MiB are refused rather than rounded.
pub fn parse_memory_mib(text: &str) -> Result<u32, ConfigError> {
    let invalid = || ConfigError::InvalidMemorySize(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let unit_kib: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mi" | "mib" => 1024,
        "k" | "kb" | "ki" | "kib" => 1,
        "g" | "gb" | "gi" | "gib" => 1024 * 1024,
        _ => return Err(invalid()),
    };
    if digits.is_empty() {
        return Err(invalid());
    }
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    let kib = value.checked_mul(unit_kib).ok_or_else(invalid)?;
    if kib % 1024 != 0 {
        return Err(ConfigError::MemoryNotWholeMib(text.to_string()));
    }
    u32::try_from(kib / 1024).map_err(|_| invalid())
}

/// The host's total memory in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests;
