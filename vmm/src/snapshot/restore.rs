//! What is checked before a snapshot is restored: this host's CPU features, the disks.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use kiln_devices::virtio::block::{DiskFormat, DiskImage};
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::net_override::{NetOverride, NetReplacement};
use super::{SavedDisk, SnapshotError};
use crate::config::{ConsoleConfig, DiskConfig};

/// How to restore a snapshot.
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub memory: PathBuf,
    /// Where the guest's console goes in this process.
    pub console: ConsoleConfig,
    /// Disk images to use instead of the snapshot's. The caller vouches that such an image
    /// holds what the snapshot's did (a copy or an overlay for a clone): only the capacity the
    /// guest sees is checked.
    pub disk_overrides: Vec<DiskOverride>,
    /// Run the guest at once (false: restored paused, resumed through the handle).
    pub resume: bool,
    /// Track dirty pages (for diff snapshots of the restored VM); None: as the snapshot's VM.
    pub track_dirty_pages: Option<bool>,
    /// The Unix socket the restored vsock device listens on instead of the snapshot's (clones
    /// of one snapshot each need their own; Firecracker's `vsock_override`).
    pub vsock_uds: Option<PathBuf>,
    /// TAP devices for NICs instead of the snapshot's (Firecracker's `network_overrides`).
    pub net_overrides: Vec<NetOverride>,
    /// Other backends for NICs, by number (the CLI's `kiln restore --net N=...`): e.g. each
    /// clone's passt NIC with its own forwarded host ports.
    pub net_replacements: Vec<NetReplacement>,
}

/// An image used instead of one of the snapshot's disks, e.g. a clone's own copy or overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOverride {
    /// Which of the snapshot's disks, from 0.
    pub index: usize,
    /// The image.
    pub path: PathBuf,
    /// Its format; None: the snapshot's disk's (detected if that was not given either, and
    /// then a qcow2 image with a backing file is refused: give `Some(Qcow2)` for an overlay).
    pub format: Option<DiskFormat>,
}

impl DiskOverride {
    /// `path` for disk `index` (from 0), in the snapshot's disk's format.
    pub fn new(index: usize, path: impl Into<PathBuf>) -> Self {
        Self {
            index,
            path: path.into(),
            format: None,
        }
    }
}

impl RestoreConfig {
    /// Restores `state` + `memory`, console on stdio, disks as saved, running.
    pub fn new(state: impl Into<PathBuf>, memory: impl Into<PathBuf>) -> Self {
        Self {
            state: state.into(),
            memory: memory.into(),
            console: ConsoleConfig::Stdio,
            disk_overrides: Vec::new(),
            resume: true,
            track_dirty_pages: None,
            vsock_uds: None,
            net_overrides: Vec::new(),
            net_replacements: Vec::new(),
        }
    }
}

/// Feature leaves whose bits must all be offered by this host: (leaf, subleaf, registers).
const FEATURE_LEAVES: &[(u32, u32, &[Register])] = &[
    (0x1, 0, &[Register::Ecx, Register::Edx]),
    (0x7, 0, &[Register::Ebx, Register::Ecx, Register::Edx]),
    (0xd, 1, &[Register::Eax]),
    (0x8000_0001, 0, &[Register::Ecx, Register::Edx]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    fn of(self, entry: &kvm_cpuid_entry2) -> u32 {
        match self {
            Register::Eax => entry.eax,
            Register::Ebx => entry.ebx,
            Register::Ecx => entry.ecx,
            Register::Edx => entry.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Register::Eax => "EAX",
            Register::Ebx => "EBX",
            Register::Ecx => "ECX",
            Register::Edx => "EDX",
        }
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|entry| entry.function == leaf && entry.index == subleaf)
        .or_else(|| entries.iter().find(|entry| entry.function == leaf))
}

/// Checks that this host offers every CPU feature the snapshot's vCPU had, and the same vendor:
/// a guest that saw a feature would fault on it here. `host` is the CPUID a new vCPU gets on
/// this host (KVM's supported set after Kiln's own adjustments).
pub fn check_cpuid(saved: &[kvm_cpuid_entry2], host: &CpuId) -> Result<(), SnapshotError> {
    let host = host.as_slice();
    if let (Some(old), Some(new)) = (find(saved, 0, 0), find(host, 0, 0)) {
        if (old.ebx, old.ecx, old.edx) != (new.ebx, new.ecx, new.edx) {
            return Err(SnapshotError::Cpuid(
                "the CPU vendor differs from the one the snapshot was taken on".into(),
            ));
        }
    }
    let mut missing = Vec::new();
    for &(leaf, subleaf, registers) in FEATURE_LEAVES {
        let Some(old) = find(saved, leaf, subleaf) else {
            continue;
        };
        let new = find(host, leaf, subleaf);
        for &register in registers {
            let had = register.of(old);
            let offered = new.map_or(0, |entry| register.of(entry));
            let lacking = had & !offered;
            if lacking != 0 {
                missing.push(format!(
                    "leaf {leaf:#x}.{subleaf} {} bits {lacking:#010x}",
                    register.name()
                ));
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SnapshotError::Cpuid(format!(
            "this host lacks CPUID features the guest saw: {}",
            missing.join(", ")
        )))
    }
}

/// The disks to open for a restore, after checking each is there and unchanged (or explicitly
/// replaced by an image of the same capacity).
pub fn check_disks(
    saved: &[SavedDisk],
    overrides: &[DiskOverride],
) -> Result<Vec<DiskConfig>, SnapshotError> {
    if let Some(extra) = overrides.iter().find(|o| o.index >= saved.len()) {
        return Err(SnapshotError::Disk {
            index: extra.index + 1,
            path: extra.path.clone(),
            reason: format!("the snapshot has only {} disks", saved.len()),
        });
    }
    saved
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let replacement = overrides.iter().rev().find(|o| o.index == index);
            let mut config = disk.config.clone();
            let Some(replacement) = replacement else {
                check_unchanged(index, disk)?;
                return Ok(config);
            };
            config.path = replacement.path.clone();
            config.format = replacement.format.or(disk.config.format);
            let problem = |reason: String| SnapshotError::Disk {
                index: index + 1,
                path: config.path.clone(),
                reason,
            };
            // Opened as it will be for the guest (read-only here: only its capacity is read).
            let capacity = DiskImage::open_as(&config.path, true, None, config.format)
                .map_err(|err| problem(format!("cannot use it: {err}")))?
                .size();
            if capacity != disk.capacity {
                return Err(problem(format!(
                    "the guest would see {capacity} bytes, the snapshot's disk had {}",
                    disk.capacity
                )));
            }
            Ok(config)
        })
        .collect()
}

/// Checks that disk `index` of a snapshot is still there, the same size and unmodified.
fn check_unchanged(index: usize, disk: &SavedDisk) -> Result<(), SnapshotError> {
    let problem = |reason: String| SnapshotError::Disk {
        index: index + 1,
        path: disk.config.path.clone(),
        reason,
    };
    let (size, modified) = disk_identity(&disk.config.path).map_err(|err| {
        problem(format!(
            "cannot use it: {err} (it was there when the snapshot was taken)"
        ))
    })?;
    if size != disk.size {
        return Err(problem(format!(
            "its size is {size} bytes, the snapshot's disk had {}",
            disk.size
        )));
    }
    if modified != disk.modified_ns {
        return Err(problem(
            "it was modified after the snapshot was taken, so it no longer matches the \
             guest's memory; restore with a copy taken at snapshot time (a disk override)"
                .into(),
        ));
    }
    Ok(())
}

/// Size and modification time (ns since the epoch) of a disk image; block devices report
/// their size by seeking to the end.
pub(crate) fn disk_identity(path: &Path) -> std::io::Result<(u64, u128)> {
    use std::io::{Seek, SeekFrom};
    let metadata = std::fs::metadata(path)?;
    let modified = metadata
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let size = if metadata.is_file() {
        metadata.len()
    } else {
        std::fs::File::open(path)?.seek(SeekFrom::End(0))?
    };
    Ok((size, modified))
}
