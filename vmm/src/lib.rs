//! Kiln's VMM library: a validated [`VmConfig`] becomes a running microVM.
//!
//! ```no_run
//! use kiln_vmm::{Vm, VmConfig, VmOutcome};
//! let mut config = VmConfig::new("/path/to/vmlinux");
//! config.cpus = 2;
//! let outcome = Vm::new(config, std::time::Instant::now())?.run()?;
//! assert_eq!(outcome, VmOutcome::PowerOff);
//! # Ok::<(), kiln_vmm::Error>(())
//! ```
#![deny(missing_docs)]

pub mod config;
pub mod console_output;
mod control;
pub mod device_manager;
pub mod event_loop;
pub mod handle;
pub mod host_fd;
pub mod kvm;
pub mod loader;
pub mod memory;
pub mod metrics;
mod pvclock;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vm;

pub use config::{ConfigError, ConsoleConfig, VmConfig};

/// Disk image tools: new qcow2 images and overlays (`kiln image create`).
pub mod image {
    pub use kiln_devices::virtio::block::qcow2::{create_overlay, CreateError, OverlayOptions};
    pub use kiln_devices::virtio::block::DiskFormat;
}
pub use handle::{ControlError, StopHandle, VmHandle, VmState};
pub use metrics::VmMetrics;
pub use vm::{RunningVm, Vm, VmOutcome};
/// The guest-memory crate Kiln is built on, so embedders use the same version.
pub use vm_memory;

/// Everything that can stop Kiln from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM is missing or unusable.
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    /// A KVM ioctl failed.
    #[error("KVM could not {0}: {1}")]
    KvmIoctl(&'static str, kvm_ioctls::Error),
    /// More vCPUs than this host's KVM allows.
    #[error("{asked} vCPUs asked for, but this host's KVM allows at most {max}")]
    TooManyCpus {
        /// Asked for.
        asked: u8,
        /// KVM's maximum.
        max: usize,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// The x86 boot state could not be written.
    #[error("cannot {0}: {1}")]
    Arch(&'static str, String),
    /// A virtio device (a disk...) could not be set up.
    #[error(transparent)]
    Devices(#[from] device_manager::DeviceError),
    /// A device could not be placed on its bus.
    #[error("cannot place the {0} on its bus: {1}")]
    Bus(&'static str, kiln_devices::bus::BusError),
    /// The console output file could not be created.
    #[error("cannot create console file '{path}': {source}")]
    ConsoleFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A host resource (eventfd, signal handler) could not be set up.
    #[error("cannot {0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The event loop failed.
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    /// A vCPU failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A snapshot could not be restored.
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    /// A Kiln bug: should never be seen.
    #[error("internal error: {0}")]
    Internal(&'static str),
}
