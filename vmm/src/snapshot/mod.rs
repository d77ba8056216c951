//! Snapshots: a paused VM saved to two files, and restored from them in a new process.
//!
//! - The **state file** holds everything the guest can observe apart from its RAM: each vCPU
//!   ([`VcpuState`]), the in-kernel irqchip (both PICs, the IOAPIC), the PIT, kvmclock, the
//!   serial port, the i8042 controller and keyboard, and every virtio transport with its queues' positions; plus the VM's config
//!   and the disks' size and modification time. Layout: an 8-byte magic, a format version
//!   (u32 LE), the payload length (u64 LE), the payload (JSON, self-describing), and a CRC-32
//!   of everything before it. Any change of magic, version, length or checksum is refused by
//!   name before anything is built.
//! - The **memory file** holds guest RAM, the regions one after another (sparse: pages of
//!   zeros are holes), then a 32-byte footer naming the snapshot it belongs to, so that a
//!   memory file from another snapshot is refused. On restore it is mapped privately (pages
//!   load on first touch; the file is never written), so restoring does not grow with the
//!   guest's memory size.
//!
//! Both files are written under temporary names, synced and renamed into place: a crash while
//! writing leaves an earlier snapshot at those paths intact.

mod files;
mod memory;
mod net_override;
pub(crate) mod restore;

use std::path::PathBuf;

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use kiln_devices::legacy::i8042::I8042Snapshot;
use kiln_devices::legacy::serial::SerialSnapshot;
use kiln_devices::virtio::mmio::MmioState;

use crate::config::{DiskConfig, VmConfig};
use crate::vcpu::VcpuState;

pub use files::{read_state_file, write_state_file};
pub use memory::{map_memory_file, map_memory_layers, write_diff_memory_file, write_memory_file};
pub use net_override::{apply_net_overrides, apply_net_replacements, NetOverride, NetReplacement};
pub use restore::{check_cpuid, check_disks, DiskOverride, RestoreConfig};

/// "KILNSNAP": the first bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"KILNSNAP";
/// The state file format this Kiln writes and reads (2: the i8042's state added).
pub const STATE_VERSION: u32 = 2;

/// Why a snapshot could not be written or used. Every message names the file or part.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{what} '{path}': {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a Kiln state file at all.
    #[error("'{0}' is not a Kiln snapshot state file (no KILNSNAP header)")]
    NotAState(PathBuf),
    /// Written by a Kiln with another format.
    #[error("'{path}' is a version {found} snapshot; this Kiln reads version {STATE_VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Shorter or longer than its header says, or its checksum does not match.
    #[error("'{path}' is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The memory file does not belong to this state file or has the wrong size.
    #[error("memory file '{path}': {reason}")]
    MemoryFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// This host cannot give the vCPUs what they had.
    #[error("the snapshot's vCPUs cannot run on this host: {0}")]
    Cpuid(String),
    /// A disk is missing or changed since the snapshot.
    #[error("disk {index} ('{path}'): {reason}")]
    Disk {
        /// Position among the disks, from 1.
        index: usize,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The request needs a paused VM.
    #[error("the VM must be paused before a snapshot is taken")]
    NotPaused,
    /// A diff snapshot cannot be taken.
    #[error("cannot take a diff snapshot: {0}")]
    Diff(String),
    /// A KVM call failed while saving or restoring.
    #[error("KVM could not {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// A device's state could not be restored.
    #[error("{0}: {1}")]
    Device(String, String),
}

/// A disk as it was when the snapshot was taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedDisk {
    /// How it was configured.
    pub config: DiskConfig,
    /// Its size in bytes (of the file or block device).
    pub size: u64,
    /// What the guest sees: the disk's capacity in bytes (a qcow2 image's virtual size).
    pub capacity: u64,
    /// Its modification time (ns since the epoch): a disk written since is refused.
    pub modified_ns: u128,
}

/// One region of guest RAM, in the order the memory file holds them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedRegion {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Full: all of RAM. Diff: only the pages written since the VM's previous snapshot (or since
/// the snapshot it was restored from), layered over that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotKind {
    /// All of guest RAM.
    #[default]
    Full,
    /// Pages written since the last snapshot; needs `track_dirty_pages`.
    Diff,
}

/// One memory file of a snapshot's chain: a full one first, then diffs in the order taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryLayer {
    /// The file (absolute, as written; the last layer's path can be given anew on restore).
    pub path: PathBuf,
    /// The snapshot that wrote it (its footer carries the same id).
    pub snapshot_id: u64,
    /// For a diff: the byte ranges `(offset, len)` of the file that hold pages; None for a
    /// full memory file.
    pub pages: Option<Vec<(u64, u64)>>,
}

/// The in-kernel interrupt controllers and timer.
#[derive(Serialize, Deserialize)]
pub struct SavedIrqchip {
    /// PIC 0.
    pub pic_master: kvm_irqchip,
    /// PIC 1.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// Everything in a state file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The Kiln that wrote it (informational).
    pub kiln_version: String,
    /// Names this snapshot; its memory file carries the same id.
    pub snapshot_id: u64,
    /// When it was taken (ms since the epoch).
    pub created_unix_ms: u64,
    /// The VM's configuration.
    pub config: VmConfig,
    /// The disks, in order, as they were.
    pub disks: Vec<SavedDisk>,
    /// Guest RAM layout.
    pub memory: Vec<SavedRegion>,
    /// The memory files this snapshot's RAM is made of, base first (the last is this
    /// snapshot's own).
    pub memory_layers: Vec<MemoryLayer>,
    /// Each vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT and clock.
    pub irqchip: SavedIrqchip,
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042 controller and its keyboard.
    pub i8042: I8042Snapshot,
    /// Each virtio transport, in slot order.
    pub virtio: Vec<MmioState>,
}

#[cfg(test)]
mod tests;
