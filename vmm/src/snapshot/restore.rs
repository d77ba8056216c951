//! What is checked before a snapshot is restored: this host's CPU features, the disks.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

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
    /// Disk images to use instead of the snapshot's (index from 0 → image). The caller vouches
    /// that such an image holds what the snapshot's did (a copy for a clone): only its size is
    /// checked.
    pub disk_overrides: Vec<(usize, PathBuf)>,
    /// Run the guest at once (false: restored paused, resumed through the handle).
    pub resume: bool,
    /// Track dirty pages (for diff snapshots of the restored VM); None: as the snapshot's VM.
    pub track_dirty_pages: Option<bool>,
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
/// replaced and of the same size).
pub fn check_disks(
    saved: &[SavedDisk],
    overrides: &[(usize, PathBuf)],
) -> Result<Vec<DiskConfig>, SnapshotError> {
    if let Some((index, path)) = overrides.iter().find(|(index, _)| *index >= saved.len()) {
        return Err(SnapshotError::Disk {
            index: index + 1,
            path: path.clone(),
            reason: format!("the snapshot has only {} disks", saved.len()),
        });
    }
    saved
        .iter()
        .enumerate()
        .map(|(index, disk)| {
            let replacement = overrides
                .iter()
                .rev()
                .find(|(at, _)| *at == index)
                .map(|(_, path)| path);
            let path = replacement.unwrap_or(&disk.config.path);
            let problem = |reason: String| SnapshotError::Disk {
                index: index + 1,
                path: path.clone(),
                reason,
            };
            let (size, modified) = disk_identity(path).map_err(|err| {
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
            if replacement.is_none() && modified != disk.modified_ns {
                return Err(problem(
                    "it was modified after the snapshot was taken, so it no longer matches \
                     the guest's memory; restore with a copy taken at snapshot time (a disk \
                     override)"
                        .into(),
                ));
            }
            let mut config = disk.config.clone();
            config.path = path.clone();
            Ok(config)
        })
        .collect()
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
