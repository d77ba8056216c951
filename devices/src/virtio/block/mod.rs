//! virtio-blk backed by a raw or qcow2 image file.
//!
//! - [`disk`]: opening, locking and checking the image; `pread`/`pwrite` against guest memory.
//! - [`qcow2`]: the qcow2 format (backing files, allocation, zero and compressed clusters).
//! - [`request`]: turning a descriptor chain into a request, refusing malformed ones, and
//!   carrying it out.
//! - [`worker`]: the per-disk I/O thread and the event loop handler that wakes it.
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) the transport drives.
//!
//! Supported requests: read, write, flush (`fdatasync`) and get-id; discard and write-zeroes
//! on disks whose format does them in its metadata (qcow2 version 3).

pub mod device;
pub mod disk;
pub mod qcow2;
pub mod request;
pub mod worker;

pub use device::Block;
pub use disk::{DiskError, DiskFormat, DiskImage, DiskStats, DiskTotals};

use virtio_bindings::virtio_blk as uapi;

/// virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Sector size of the virtio-blk protocol, independent of the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = uapi::VIRTIO_BLK_ID_BYTES as usize;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (`seg_max`): with the header and the status
/// descriptor a request then fits in half the queue even without indirect descriptors.
pub const SEG_MAX: u32 = 126;

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod features {
    use super::uapi;

    /// `seg_max` in the configuration space is valid.
    pub const SEG_MAX: u32 = uapi::VIRTIO_BLK_F_SEG_MAX;
    /// The disk is read-only.
    pub const RO: u32 = uapi::VIRTIO_BLK_F_RO;
    /// Flush requests are supported (the guest uses a write-back cache).
    pub const FLUSH: u32 = uapi::VIRTIO_BLK_F_FLUSH;
    /// Discard requests are supported.
    pub const DISCARD: u32 = uapi::VIRTIO_BLK_F_DISCARD;
    /// Write-zeroes requests are supported.
    pub const WRITE_ZEROES: u32 = uapi::VIRTIO_BLK_F_WRITE_ZEROES;
}

/// Request types (`type` in the request header).
pub mod request_type {
    use super::uapi;

    /// Read.
    pub const IN: u32 = uapi::VIRTIO_BLK_T_IN;
    /// Write.
    pub const OUT: u32 = uapi::VIRTIO_BLK_T_OUT;
    /// Flush.
    pub const FLUSH: u32 = uapi::VIRTIO_BLK_T_FLUSH;
    /// Get the serial number.
    pub const GET_ID: u32 = uapi::VIRTIO_BLK_T_GET_ID;
    /// Discard sectors.
    pub const DISCARD: u32 = uapi::VIRTIO_BLK_T_DISCARD;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = uapi::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Status byte values. The UAPI states them as `u32`; each fits the byte the spec gives them.
pub mod request_status {
    use super::uapi;

    /// Success.
    pub const OK: u8 = uapi::VIRTIO_BLK_S_OK as u8;
    /// The request failed.
    pub const IOERR: u8 = uapi::VIRTIO_BLK_S_IOERR as u8;
    /// The request type is not supported.
    pub const UNSUPP: u8 = uapi::VIRTIO_BLK_S_UNSUPP as u8;
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod discard_tests;
#[cfg(test)]
mod qcow2_bench;
#[cfg(test)]
mod stress_tests;

#[cfg(test)]
pub(crate) mod test_utils {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Bytes, GuestAddress};

    use kiln_arch::GuestMemoryMmap;

    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    /// Descriptor flags, as the `u16` a descriptor holds.
    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    /// The buffer is device-writable.
    pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    /// The buffer is a table of descriptors.
    pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    /// Where tests put request headers, data and status bytes (the mock queue sits at 0).
    pub const HEADER: u64 = 0x1_0000;
    /// Data buffers.
    pub const DATA: u64 = 0x2_0000;
    /// Status bytes.
    pub const STATUS: u64 = 0x3_0000;

    /// Writes a request header at `addr`.
    pub fn write_header(memory: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        memory.write_slice(&header, GuestAddress(addr)).unwrap();
    }

    /// Descriptors `(addr, len, flags)` linked into one chain that starts at table index
    /// `first` (NEXT is set on all but the last).
    pub fn linked(first: u16, specs: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        specs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == specs.len();
                let flags = if last { flags & !NEXT } else { flags | NEXT };
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    /// A descriptor with exactly these fields.
    pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Guest memory size for tests: two adjacent regions, split at [`REGION_SPLIT`].
    pub const MEMORY_SIZE: u64 = 0x100_0000;
    /// Where the second test memory region starts, so buffers can straddle regions.
    pub const REGION_SPLIT: u64 = 0x80_0000;

    /// 16 MiB of guest memory in two regions.
    pub fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION_SPLIT as usize),
            (
                GuestAddress(REGION_SPLIT),
                (MEMORY_SIZE - REGION_SPLIT) as usize,
            ),
        ])
        .expect("test guest memory")
    }

    /// A zero-filled temporary image file, removed on drop.
    pub struct TempImage {
        path: PathBuf,
    }

    impl TempImage {
        pub fn new(name: &str, size: u64) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "kiln-blk-{}-{}-{name}.img",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let file = std::fs::File::create(&path).expect("create test image");
            file.set_len(size).expect("size test image");
            Self { path }
        }

        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempImage {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
