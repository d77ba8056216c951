//! Fuzzing harnesses: Kiln's virtio-blk request path (here), the virtio-vsock and virtio-net
//! devices ([`vsock`], [`net`]) and qcow2 image parsing ([`qcow2`]).
//!
//! One input is one guest state: a small guest memory image (descriptor table, available ring,
//! request headers and buffers, all taken from the input) and a queue set-up. The harness runs
//! the disk's queue worker over it exactly as the I/O thread does and checks what must hold
//! whatever the guest wrote:
//! - no panic, and no access outside guest memory (that would crash the process);
//! - the used ring index in guest memory is the one the queue says it wrote, and it moved by at
//!   most the number of entries the driver made available;
//! - a read-only disk's image never changes, and no image changes size.
//!
//! Input layout: byte 0 selects the disk (bit 0: read-only), `VIRTIO_RING_F_EVENT_IDX` (bit 1)
//! and the queue size (`1 << (bits 2..5 % 5)`, 1 to 16); byte 1 is the available ring index
//! (0 to 2 × size: past the size is a corrupt ring); the rest is copied into guest memory from
//! address 0 (low region), continuing in the high region after the hole.

pub mod net;
pub mod vsock;

pub use net::{net_seeds, run_net_frames, NetStats};
pub use vsock::{run_vsock_packets, vsock_seeds, VsockStats};
pub mod qcow2;
pub mod replay;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use kiln_arch::GuestMemoryMmap;
use kiln_devices::virtio::block::request_type::{FLUSH, GET_ID, IN, OUT};
use kiln_devices::virtio::block::worker::QueueWorker;
use kiln_devices::virtio::block::DiskImage;
use kiln_devices::virtio::Interrupt;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Low guest memory region: `[0, LOW_END)`.
pub const LOW_END: u64 = 0x8000;
/// A hole, then the high region `[HIGH_START, HIGH_END)`.
pub const HIGH_START: u64 = 0xa000;
/// End of guest memory.
pub const HIGH_END: u64 = 0x1_0000;
/// Descriptor table (up to 16 entries).
pub const DESC_TABLE: u64 = 0x0;
/// Available ring.
pub const AVAIL_RING: u64 = 0x100;
/// Used ring (written by the device).
pub const USED_RING: u64 = 0x140;
/// Size of each disk image.
pub const DISK_SIZE: u64 = 64 * 1024;

struct Disk {
    /// A second handle on the image, for resetting and checking it (the file itself is
    /// unlinked as soon as it is open, so no run leaves files behind).
    file: File,
    image: Arc<DiskImage>,
}

fn pattern() -> Vec<u8> {
    (0..DISK_SIZE).map(|i| (i * 7 + 3) as u8).collect()
}

/// The read-write and read-only disks, created once per process (each holds its lock).
fn disks() -> &'static [Disk; 2] {
    static DISKS: OnceLock<[Disk; 2]> = OnceLock::new();
    DISKS.get_or_init(|| {
        let make = |readonly: bool| {
            let path = std::env::temp_dir().join(format!(
                "kiln-fuzz-{}-{}.img",
                std::process::id(),
                if readonly { "ro" } else { "rw" }
            ));
            std::fs::write(&path, pattern()).expect("create fuzz disk image");
            let image = DiskImage::open(&path, readonly, Some("kiln-fuzz")).expect("open image");
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .expect("open fuzz disk image");
            let _ = std::fs::remove_file(&path);
            Disk {
                file,
                image: Arc::new(image),
            }
        };
        [make(false), make(true)]
    })
}

fn file_contents(file: &File) -> Vec<u8> {
    let len = file.metadata().expect("fuzz disk image size").len();
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0)
        .expect("read fuzz disk image");
    data
}

fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_END as usize),
        (GuestAddress(HIGH_START), (HIGH_END - HIGH_START) as usize),
    ])
    .expect("fuzz guest memory");
    let (low, high) = image.split_at(image.len().min(LOW_END as usize));
    memory.write_slice(low, GuestAddress(0)).expect("low image");
    let high = &high[..high.len().min((HIGH_END - HIGH_START) as usize)];
    memory
        .write_slice(high, GuestAddress(HIGH_START))
        .expect("high image");
    memory
}

/// Runs one input and returns how many chains went back to the driver; panics if an
/// invariant breaks.
pub fn run_blk_request(data: &[u8]) -> u32 {
    let Some((&config, rest)) = data.split_first() else {
        return 0;
    };
    let Some((&avail_index, image)) = rest.split_first() else {
        return 0;
    };
    let readonly = config & 1 != 0;
    let event_idx = config & 2 != 0;
    let size: u16 = 1 << ((config >> 2) % 5);
    let avail_index = u16::from(avail_index) % (2 * size + 1);

    // The disks are shared: one input at a time (tests run on several threads).
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _running = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let disk = &disks()[usize::from(readonly)];
    if !readonly {
        // Rewrite in place: the image keeps its size and its lock.
        disk.file
            .write_all_at(&pattern(), 0)
            .expect("reset fuzz disk image");
    }
    let memory = guest_memory(image);
    memory
        .write_obj(avail_index, GuestAddress(AVAIL_RING + 2))
        .expect("avail idx");
    memory
        .write_obj(0u16, GuestAddress(USED_RING + 2))
        .expect("used idx");

    let mut queue = Queue::new(size).expect("queue size is a power of two");
    queue.set_size(size);
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    assert!(queue.is_valid(&memory));

    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let mut worker = QueueWorker::new(queue, memory.clone(), disk.image.clone(), interrupt);
    let first = worker.process_queue();
    let second = worker.process_queue();

    let used: u16 = memory
        .read_obj(GuestAddress(USED_RING + 2))
        .expect("used idx");
    assert_eq!(used, worker.queue().next_used(), "used index in memory");
    let completed = first.completed + second.completed;
    assert!(
        completed <= u32::from(avail_index),
        "{completed} chains completed, {avail_index} made available"
    );
    assert_eq!(second.completed, 0, "a second pass found nothing new");
    let contents = file_contents(&disk.file);
    assert_eq!(contents.len() as u64, DISK_SIZE, "image size");
    if readonly {
        assert!(contents == pattern(), "read-only image changed");
    }
    completed
}

/// Builds an input from a queue configuration and guest memory writes.
pub struct InputBuilder {
    config: u8,
    avail_index: u8,
    image: Vec<u8>,
}

impl InputBuilder {
    /// `size` must be a power of two up to 16.
    pub fn new(size: u16, readonly: bool, event_idx: bool) -> Self {
        let log2 = size.trailing_zeros() as u8;
        Self {
            config: u8::from(readonly) | (u8::from(event_idx) << 1) | (log2 << 2),
            avail_index: 0,
            image: vec![0; 0x400],
        }
    }

    fn put(&mut self, addr: u64, bytes: &[u8]) {
        let addr = addr as usize;
        if self.image.len() < addr + bytes.len() {
            self.image.resize(addr + bytes.len(), 0);
        }
        self.image[addr..addr + bytes.len()].copy_from_slice(bytes);
    }

    /// Descriptor `index` of the queue's table.
    pub fn descriptor(
        &mut self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        self.descriptor_at(DESC_TABLE + 16 * u64::from(index), addr, len, flags, next)
    }

    /// A descriptor at guest address `at` (an indirect table's entry).
    pub fn descriptor_at(
        &mut self,
        at: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> &mut Self {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.put(at, &raw);
        self
    }

    /// Makes the chain starting at `head` available.
    pub fn available(&mut self, head: u16) -> &mut Self {
        let slot = u64::from(self.avail_index);
        self.put(AVAIL_RING + 4 + 2 * slot, &head.to_le_bytes());
        self.avail_index += 1;
        self
    }

    /// A request header at `addr`.
    pub fn header(&mut self, addr: u64, request_type: u32, sector: u64) -> &mut Self {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(addr, &header);
        self
    }

    /// The input bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut input = vec![self.config, self.avail_index];
        input.extend_from_slice(&self.image);
        input
    }
}

// Descriptor flags as the `u16` a descriptor holds (the UAPI states them as `u32`).
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Valid and interesting inputs to start from: each kind of request, an indirect chain, a loop.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut b = InputBuilder::new(16, false, false);
    b.header(0x400, IN, 2)
        .descriptor(0, 0x400, 16, NEXT, 1)
        .descriptor(1, 0x1000, 1024, WRITE | NEXT, 2)
        .descriptor(2, 0x410, 1, WRITE, 0)
        .available(0);
    b.header(0x420, OUT, 5)
        .descriptor(3, 0x420, 16, NEXT, 4)
        .descriptor(4, HIGH_START, 512, NEXT, 5)
        .descriptor(5, 0x430, 1, WRITE, 0)
        .available(3);
    b.header(0x440, FLUSH, 0)
        .descriptor(6, 0x440, 16, NEXT, 7)
        .descriptor(7, 0x450, 1, WRITE, 0)
        .available(6);
    b.header(0x460, GET_ID, 0)
        .descriptor(8, 0x460, 16, NEXT, 9)
        .descriptor(9, 0x2000, 20, WRITE | NEXT, 10)
        .descriptor(10, 0x470, 1, WRITE, 0)
        .available(8);
    seeds.push(("read-write-flush-getid", b.build()));

    let mut b = InputBuilder::new(8, true, true);
    b.header(0x400, OUT, 0)
        .descriptor(0, 0x400, 16, NEXT, 1)
        .descriptor(1, 0x1000, 512, NEXT, 2)
        .descriptor(2, 0x410, 1, WRITE, 0)
        .available(0);
    seeds.push(("write-to-read-only-event-idx", b.build()));

    // One descriptor pointing at a three-entry indirect table at 0x600.
    let mut b = InputBuilder::new(4, false, false);
    b.header(0x400, IN, 1)
        .descriptor(0, 0x600, 48, INDIRECT, 0)
        .descriptor_at(0x600, 0x400, 16, NEXT, 1)
        .descriptor_at(0x610, 0x1000, 512, WRITE | NEXT, 2)
        .descriptor_at(0x620, 0x410, 1, WRITE, 0)
        .available(0);
    seeds.push(("indirect-read", b.build()));

    let mut b = InputBuilder::new(4, false, false);
    b.header(0x400, IN, 0)
        .descriptor(0, 0x400, 16, NEXT, 1)
        .descriptor(1, 0x1000, 512, WRITE | NEXT, 0)
        .available(0)
        .available(1);
    seeds.push(("loop", b.build()));
    seeds
}

/// A small deterministic PRNG (xorshift64*), so random runs repeat from their seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `bound` (which must not be 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_u64() % bound as u64) as usize
    }
}

/// A mutated copy of `input`: byte flips, random small integers where fields live, splices.
pub fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    if out.len() < 2 {
        out.resize(2, 0);
    }
    for _ in 0..=rng.below(8) {
        let at = rng.below(out.len());
        match rng.below(6) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next_u64() as u8,
            2 => {
                // An interesting 16/32/64-bit value somewhere.
                let values: [u64; 8] = [
                    0,
                    1,
                    0x1ff,
                    0x200,
                    0xffff,
                    u32::MAX as u64,
                    LOW_END - 1,
                    u64::MAX,
                ];
                let value = values[rng.below(values.len())].to_le_bytes();
                let width = [2, 4, 8][rng.below(3)];
                let end = (at + width).min(out.len());
                out[at..end].copy_from_slice(&value[..end - at]);
            }
            3 => out.truncate(at.max(2)),
            4 => out.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8)),
            _ => out[0] = rng.next_u64() as u8,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_run_and_serve_requests() {
        let served: Vec<(&str, u32)> = seeds()
            .iter()
            .map(|(name, input)| (*name, run_blk_request(input)))
            .collect();
        assert_eq!(
            served,
            vec![
                ("read-write-flush-getid", 4),
                ("write-to-read-only-event-idx", 1),
                ("indirect-read", 1),
                ("loop", 2),
            ]
        );
    }

    #[test]
    fn vsock_seeds_move_packets_both_ways() {
        let stats: Vec<(&str, VsockStats)> = vsock_seeds()
            .iter()
            .map(|(name, input)| (*name, run_vsock_packets(input)))
            .collect();
        let guest = stats[0].1;
        assert!(guest.tx_used >= 3 && guest.rx_used >= 1, "{stats:?}");
        assert_eq!(guest.max_connections, 1, "{stats:?}");
        let host = stats[1].1;
        assert!(host.rx_used >= 2 && host.max_connections == 1, "{stats:?}");
    }

    #[test]
    fn short_random_vsock_run_keeps_the_invariants() {
        let seeds = vsock_seeds();
        let mut rng = Rng::new(0x7673_6f63);
        for _ in 0..1500 {
            let (_, base) = &seeds[rng.below(seeds.len())];
            run_vsock_packets(&mutate(base, &mut rng));
        }
    }

    #[test]
    fn net_seeds_move_frames_both_ways() {
        let stats: Vec<(&str, NetStats)> = net_seeds()
            .iter()
            .map(|(name, input)| (*name, run_net_frames(input)))
            .collect();
        let both = stats[0].1;
        assert!(both.frames_out == 1 && both.frames_in == 1, "{stats:?}");
        let offloads = stats[1].1;
        assert!(
            offloads.frames_out == 1 && offloads.frames_in == 1,
            "{stats:?}"
        );
        // Only the frame that waited out the full backend gets through.
        let junk = stats[2].1;
        assert!(junk.frames_out == 1 && junk.frames_in == 0, "{stats:?}");
    }

    #[test]
    fn short_random_net_run_keeps_the_invariants() {
        let seeds = net_seeds();
        let mut rng = Rng::new(0x6e65_7430);
        for _ in 0..1500 {
            let (_, base) = &seeds[rng.below(seeds.len())];
            run_net_frames(&mutate(base, &mut rng));
        }
    }

    #[test]
    fn short_random_run_keeps_the_invariants() {
        let seeds = seeds();
        let mut rng = Rng::new(0x6b69_6c6e);
        for _ in 0..3000 {
            let (_, base) = &seeds[rng.below(seeds.len())];
            run_blk_request(&mutate(base, &mut rng));
        }
    }
}
