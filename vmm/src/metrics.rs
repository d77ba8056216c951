//! Counters a VM keeps while it runs: vCPU exits and disk requests.
//!
//! They are plain atomics updated where the work happens (a vCPU thread, a disk's I/O thread)
//! and read from any thread through [`VmHandle::metrics`](crate::VmHandle::metrics), also after
//! the VM has ended, so that a final report can be written. Totals only: whoever reports them
//! (the `kiln` CLI writes Firecracker-style JSON lines) computes differences.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_devices::virtio::block::DiskStats;

/// vCPU exit counters shared by every vCPU of a VM.
#[derive(Debug, Default)]
pub struct VcpuExitCounters {
    io_in: AtomicU64,
    io_out: AtomicU64,
    mmio_read: AtomicU64,
    mmio_write: AtomicU64,
    failures: AtomicU64,
}

impl VcpuExitCounters {
    /// A port read exit.
    pub fn io_in(&self) {
        self.io_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A port write exit.
    pub fn io_out(&self) {
        self.io_out.fetch_add(1, Ordering::Relaxed);
    }

    /// An MMIO read exit.
    pub fn mmio_read(&self) {
        self.mmio_read.fetch_add(1, Ordering::Relaxed);
    }

    /// An MMIO write exit.
    pub fn mmio_write(&self) {
        self.mmio_write.fetch_add(1, Ordering::Relaxed);
    }

    /// A vCPU that failed (KVM_RUN error, entry failure, unexpected exit).
    pub fn failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The totals so far.
    pub fn snapshot(&self) -> VcpuExits {
        VcpuExits {
            io_in: self.io_in.load(Ordering::Relaxed),
            io_out: self.io_out.load(Ordering::Relaxed),
            mmio_read: self.mmio_read.load(Ordering::Relaxed),
            mmio_write: self.mmio_write.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

/// vCPU exits since the VM was built, all vCPUs together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuExits {
    /// Port reads.
    pub io_in: u64,
    /// Port writes (a `rep outs` counts once).
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// vCPU failures.
    pub failures: u64,
}

/// One disk's requests since the VM was built (a disk whose image was replaced keeps counting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskMetrics {
    /// The guest's name for it: `vda`, `vdb`, ...
    pub name: String,
    /// Read requests completed.
    pub read_count: u64,
    /// Bytes read into the guest.
    pub read_bytes: u64,
    /// Write requests completed.
    pub write_count: u64,
    /// Bytes written from the guest.
    pub write_bytes: u64,
    /// `fdatasync`s of the image (guest flushes and write-through writes).
    pub flush_count: u64,
}

/// Everything a VM counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmMetrics {
    /// vCPU exits.
    pub vcpu: VcpuExits,
    /// Disks, in guest order.
    pub disks: Vec<DiskMetrics>,
}

/// Where a VM's counters live; the handle keeps it so that they outlive the VM.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) vcpu: Arc<VcpuExitCounters>,
    pub(crate) disks: Vec<(String, Arc<DiskStats>)>,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> VmMetrics {
        VmMetrics {
            vcpu: self.vcpu.snapshot(),
            disks: self
                .disks
                .iter()
                .map(|(name, stats)| {
                    let totals = stats.snapshot();
                    DiskMetrics {
                        name: name.clone(),
                        read_count: totals.read_count,
                        read_bytes: totals.read_bytes,
                        write_count: totals.write_count,
                        write_bytes: totals.write_bytes,
                        flush_count: totals.flush_count,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_add_up() {
        let counters = VcpuExitCounters::default();
        counters.io_in();
        counters.io_out();
        counters.io_out();
        counters.mmio_read();
        counters.mmio_write();
        counters.failure();
        assert_eq!(
            counters.snapshot(),
            VcpuExits {
                io_in: 1,
                io_out: 2,
                mmio_read: 1,
                mmio_write: 1,
                failures: 1
            }
        );
    }
}
