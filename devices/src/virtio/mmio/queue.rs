//! The queue registers as the driver writes them, and the checks that turn them into a queue.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use kiln_arch::GuestMemoryMmap;

/// Why the driver's queue setup was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum QueueSetupError {
    #[error("{0}")]
    Invalid(virtio_queue::Error),
    #[error("its rings are not inside guest memory")]
    OutsideMemory,
}

/// The queue registers as the driver wrote them.
#[derive(Debug, Clone, Copy)]
pub(super) struct QueueRegisters {
    pub(super) max_size: u16,
    pub(super) size: u16,
    pub(super) desc_table: u64,
    pub(super) avail_ring: u64,
    pub(super) used_ring: u64,
    pub(super) ready: bool,
}

impl QueueRegisters {
    pub(super) fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            ready: false,
        }
    }

    /// Builds the queue these registers describe, checked by virtio-queue against guest memory.
    pub(super) fn build(
        &self,
        memory: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, QueueSetupError> {
        let mut queue = Queue::new(self.max_size).map_err(QueueSetupError::Invalid)?;
        queue
            .try_set_size(self.size)
            .map_err(QueueSetupError::Invalid)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(QueueSetupError::Invalid)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(QueueSetupError::Invalid)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(QueueSetupError::Invalid)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        // virtio-queue's own check logs at error level on failure; check first so that a
        // driver cannot flood the log through it, then let it have the final word.
        if !self.rings_in_memory(memory) || !queue.is_valid(memory) {
            return Err(QueueSetupError::OutsideMemory);
        }
        Ok(queue)
    }

    fn rings_in_memory(&self, memory: &GuestMemoryMmap) -> bool {
        let size = u64::from(self.size);
        // Descriptor table, available ring (flags, idx, ring, used_event), used ring (flags,
        // idx, ring of 8-byte elements, avail_event).
        [
            (self.desc_table, 16 * size),
            (self.avail_ring, 6 + 2 * size),
            (self.used_ring, 6 + 8 * size),
        ]
        .iter()
        .all(|&(addr, len)| {
            memory.check_range(GuestAddress(addr), len as usize, Permissions::ReadWrite)
        })
    }
}

/// Replaces the low or high half of a 64-bit register.
pub(super) fn set_half(value: &mut u64, high: bool, half: u32) {
    *value = if high {
        (*value & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*value & !0xffff_ffff) | u64::from(half)
    };
}
