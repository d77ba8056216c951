//! A minimal split-ring driver for device tests: it lays out queues in guest memory, posts
//! descriptor chains and reads back what the device used, the way a guest driver does.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use kiln_arch::GuestMemoryMmap;

/// `VRING_DESC_F_NEXT`.
const NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const WRITE: u16 = 2;

/// One driver-side queue.
#[derive(Debug)]
pub struct TestQueue {
    base: u64,
    size: u16,
    avail_idx: u16,
    used_seen: u16,
    next_desc: u16,
}

impl TestQueue {
    /// A queue of `size` entries whose rings start at `base` (needs `size * 24 + 16` bytes).
    pub fn new(base: u64, size: u16) -> Self {
        Self {
            base,
            size,
            avail_idx: 0,
            used_seen: 0,
            next_desc: 0,
        }
    }

    fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    fn used_addr(&self) -> u64 {
        (self.avail_addr() + 6 + 2 * u64::from(self.size) + 3) & !3
    }

    /// The device's view of the queue, ready.
    pub fn queue(&self, memory: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let mut queue = Queue::new(self.size).expect("queue size");
        queue.set_size(self.size);
        queue.set_event_idx(event_idx);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = split(self.base);
        queue.set_desc_table_address(low, high);
        let (low, high) = split(self.avail_addr());
        queue.set_avail_ring_address(low, high);
        let (low, high) = split(self.used_addr());
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        assert!(queue.is_valid(memory), "test queue layout");
        queue
    }

    /// Posts a chain of `(addr, len, flags)` buffers; returns its head index.
    pub fn add(&mut self, memory: &GuestMemoryMmap, buffers: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == buffers.len();
            let next = (index + 1) % self.size;
            let flags = if last { flags } else { flags | NEXT };
            let entry = self.base + 16 * u64::from(index);
            memory.write_obj(addr, GuestAddress(entry)).unwrap();
            memory.write_obj(len, GuestAddress(entry + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(entry + 12)).unwrap();
            memory
                .write_obj(if last { 0 } else { next }, GuestAddress(entry + 14))
                .unwrap();
        }
        self.next_desc = (head + buffers.len() as u16) % self.size;
        let slot = self.avail_addr() + 4 + 2 * u64::from(self.avail_idx % self.size);
        memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        memory
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
        head
    }

    /// Used entries `(head, len)` the device added since the last call.
    pub fn take_used(&mut self, memory: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let used_idx: u16 = memory.read_obj(GuestAddress(self.used_addr() + 2)).unwrap();
        let mut entries = Vec::new();
        while self.used_seen != used_idx {
            let slot = self.used_addr() + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = memory.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = memory.read_obj(GuestAddress(slot + 4)).unwrap();
            entries.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        entries
    }
}
