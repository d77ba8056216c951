//! Fuzzing harness for Kiln's virtio-vsock device: one input is a script of guest and host
//! actions against a live device with real Unix sockets.
//!
//! Input: byte 0 selects event idx (bit 0); then actions, each a kind byte and its operands:
//! - `0` a TX packet: 44 header bytes as the guest wrote them, a shape byte (header and data
//!   in two buffers, in one, header only, a device-writable header, a data buffer shorter than
//!   `len`, a buffer outside guest memory) and the payload bytes;
//! - `1` receive buffers: a count and a shape byte (normal, one buffer, read-only, too short,
//!   outside guest memory);
//! - `2` a host client: a length and that many bytes written to Kiln's socket (a `CONNECT`
//!   line, or not);
//! - `3` host data: a stream index, a length and the bytes, written to a host stream;
//! - `4` closes a host stream; `5` runs a pass (and accepts connections on `PATH_80`);
//! - `6` pauses or resumes; `7` a transport reset with an event buffer.
//!
//! What must hold whatever the input: no panic; every used entry names a chain the driver made
//! available, TX entries have length 0, RX entries fit their buffers; after a device reset no
//! connection is left.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kiln_arch::GuestMemoryMmap;
use kiln_devices::virtio::vsock::packet::PKT_HEADER_SIZE;
use kiln_devices::virtio::vsock::{Timeouts, Vsock};
use kiln_devices::virtio::{Activation, Interrupt, VirtioDevice};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory: `[0, MEMORY_SIZE)`.
const MEMORY_SIZE: u64 = 0x4_0000;
const QUEUE_SIZE: u16 = 16;
/// Where packet buffers start (the queues sit below).
const BUFFERS: u64 = 0x1_0000;
const RX_DATA: u32 = 4096;
const CID: u64 = 3;

/// One driver-side split queue.
pub(crate) struct DriverQueue {
    base: u64,
    avail: u16,
    used_seen: u16,
    /// Head index -> (total buffer length, its descriptors), for chains not used yet.
    outstanding: HashMap<u16, (u32, Vec<u16>)>,
    /// Descriptor indices no outstanding chain uses.
    free: Vec<u16>,
}

impl DriverQueue {
    pub(crate) fn new(base: u64) -> Self {
        Self {
            base,
            avail: 0,
            used_seen: 0,
            outstanding: HashMap::new(),
            free: (0..QUEUE_SIZE).rev().collect(),
        }
    }

    fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(QUEUE_SIZE)
    }

    fn used_addr(&self) -> u64 {
        self.base + 0x200
    }

    pub(crate) fn queue(&self, memory: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).expect("queue size");
        queue.set_size(QUEUE_SIZE);
        queue.set_event_idx(event_idx);
        let halves = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (low, high) = halves(self.base);
        queue.set_desc_table_address(low, high);
        let (low, high) = halves(self.avail_addr());
        queue.set_avail_ring_address(low, high);
        let (low, high) = halves(self.used_addr());
        queue.set_used_ring_address(low, high);
        queue.set_ready(true);
        assert!(queue.is_valid(memory));
        queue
    }

    /// Posts a chain unless the driver has no free descriptors for it.
    pub(crate) fn add(&mut self, memory: &GuestMemoryMmap, buffers: &[(u64, u32, u16)]) {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return;
        }
        let indices: Vec<u16> = (0..buffers.len()).filter_map(|_| self.free.pop()).collect();
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let entry = self.base + 16 * u64::from(indices[i]);
            let flags = if last { flags } else { flags | 1 };
            let next = if last { 0 } else { indices[i + 1] };
            memory.write_obj(addr, GuestAddress(entry)).unwrap();
            memory.write_obj(len, GuestAddress(entry + 8)).unwrap();
            memory.write_obj(flags, GuestAddress(entry + 12)).unwrap();
            memory.write_obj(next, GuestAddress(entry + 14)).unwrap();
        }
        let head = indices[0];
        let slot = self.avail_addr() + 4 + 2 * u64::from(self.avail % QUEUE_SIZE);
        memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail = self.avail.wrapping_add(1);
        memory
            .write_obj(self.avail, GuestAddress(self.avail_addr() + 2))
            .unwrap();
        let total = buffers.iter().map(|b| b.1).fold(0u32, u32::saturating_add);
        self.outstanding.insert(head, (total, indices));
    }

    /// Checks the used entries the device added since the last call.
    pub(crate) fn check_used(&mut self, memory: &GuestMemoryMmap, tx: bool) -> usize {
        let used: u16 = memory.read_obj(GuestAddress(self.used_addr() + 2)).unwrap();
        let mut count = 0;
        while self.used_seen != used {
            let slot = self.used_addr() + 4 + 8 * u64::from(self.used_seen % QUEUE_SIZE);
            let id: u32 = memory.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = memory.read_obj(GuestAddress(slot + 4)).unwrap();
            let head = u16::try_from(id).expect("used id is a descriptor index");
            let (size, descriptors) = self
                .outstanding
                .remove(&head)
                .unwrap_or_else(|| panic!("used entry {head} was not available"));
            self.free.extend(descriptors);
            if tx {
                assert_eq!(len, 0, "a TX chain came back with a length");
            } else {
                assert!(len <= size, "RX used length {len} > buffer {size}");
            }
            self.used_seen = self.used_seen.wrapping_add(1);
            count += 1;
        }
        count
    }
}

pub(crate) struct Bytes2<'a>(pub(crate) &'a [u8]);

impl Bytes2<'_> {
    pub(crate) fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    pub(crate) fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn scratch_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "kiln-fuzz-vsock-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("fuzz scratch directory");
    dir
}

/// What one input did, for tests of the harness itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockStats {
    /// TX chains the device used.
    pub tx_used: usize,
    /// RX chains the device used.
    pub rx_used: usize,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Runs one input; panics if an invariant breaks.
pub fn run_vsock_packets(data: &[u8]) -> VsockStats {
    let mut input = Bytes2(data);
    let Some(config) = input.byte() else {
        return VsockStats::default();
    };
    let dir = scratch_dir();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_in(&dir, config & 1 != 0, &mut input)
    }));
    let _ = std::fs::remove_dir_all(&dir);
    match result {
        Ok(stats) => stats,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn run_in(dir: &std::path::Path, event_idx: bool, input: &mut Bytes2<'_>) -> VsockStats {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
        .expect("fuzz guest memory");
    let path = dir.join("v.sock");
    let timeouts = Timeouts {
        handshake: std::time::Duration::from_millis(50),
        connect: std::time::Duration::from_millis(50),
        close: std::time::Duration::from_millis(50),
    };
    let mut device = Vsock::with_timeouts(CID, &path, timeouts).expect("vsock device");
    let host_listener =
        UnixListener::bind(format!("{}_80", path.display())).expect("host listener");
    host_listener.set_nonblocking(true).unwrap();
    let mut rx = DriverQueue::new(0x0);
    let mut tx = DriverQueue::new(0x1000);
    let mut event = DriverQueue::new(0x2000);
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    device
        .activate(Activation {
            memory: memory.clone(),
            queues: vec![
                rx.queue(&memory, event_idx),
                tx.queue(&memory, event_idx),
                event.queue(&memory, event_idx),
            ],
            queue_events: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt,
            features: 0,
        })
        .expect("activation");

    let mut streams: Vec<UnixStream> = Vec::new();
    let mut stats = VsockStats::default();
    let mut next_buffer = BUFFERS;
    let mut alloc = |len: u64| {
        let len = (len + 0xf) & !0xf;
        if next_buffer + len > MEMORY_SIZE {
            next_buffer = BUFFERS;
        }
        let addr = next_buffer;
        next_buffer += len;
        addr
    };
    let mut paused = false;
    let mut actions = 0;
    while let Some(kind) = input.byte() {
        actions += 1;
        if actions > 64 {
            break;
        }
        match kind % 8 {
            0 => {
                let header = input.take(PKT_HEADER_SIZE).to_vec();
                let shape = input.byte().unwrap_or(0);
                let payload = input.take(usize::from(shape >> 3) * 16).to_vec();
                let header_addr = alloc(PKT_HEADER_SIZE as u64 + payload.len() as u64 + 16);
                memory
                    .write_slice(&header, GuestAddress(header_addr))
                    .unwrap();
                let data_addr = alloc(payload.len() as u64 + 16);
                memory
                    .write_slice(&payload, GuestAddress(data_addr))
                    .unwrap();
                let len = payload.len() as u32;
                let chain: Vec<(u64, u32, u16)> = match shape % 6 {
                    0 => vec![(header_addr, 44, 0), (data_addr, len, 0)],
                    1 => {
                        memory
                            .write_slice(&payload, GuestAddress(header_addr + 44))
                            .unwrap();
                        vec![(header_addr, 44 + len, 0)]
                    }
                    2 => vec![(header_addr, 44, 0)],
                    3 => vec![(header_addr, 44, 2), (data_addr, len, 0)],
                    4 => vec![(header_addr, 44, 0), (data_addr, len / 2, 0)],
                    _ => vec![(header_addr, 44, 0), (MEMORY_SIZE - 8, len.max(64), 0)],
                };
                tx.add(&memory, &chain);
            }
            1 => {
                let count = input.byte().unwrap_or(1) % 8;
                let shape = input.byte().unwrap_or(0);
                for _ in 0..count {
                    let header = alloc(PKT_HEADER_SIZE as u64);
                    let data = alloc(u64::from(RX_DATA));
                    let chain: Vec<(u64, u32, u16)> = match shape % 5 {
                        0 => vec![(header, 44, 2), (data, RX_DATA, 2)],
                        1 => vec![(header, 44 + 512, 2)],
                        2 => vec![(header, 44, 0), (data, RX_DATA, 0)],
                        3 => vec![(header, 20, 2)],
                        _ => vec![(header, 44, 2), (MEMORY_SIZE - 16, RX_DATA, 2)],
                    };
                    rx.add(&memory, &chain);
                }
            }
            2 => {
                let n = usize::from(input.byte().unwrap_or(0) % 48);
                let bytes = input.take(n).to_vec();
                if streams.len() < 16 {
                    if let Ok(mut client) = UnixStream::connect(&path) {
                        client.set_nonblocking(true).unwrap();
                        let _ = client.write(&bytes);
                        streams.push(client);
                    }
                }
            }
            3 => {
                let index = usize::from(input.byte().unwrap_or(0));
                let n = usize::from(input.byte().unwrap_or(0)) * 8;
                let bytes = input.take(n).to_vec();
                if !streams.is_empty() {
                    let chosen = index % streams.len();
                    let _ = streams[chosen].write(&bytes);
                }
            }
            4 => {
                let index = usize::from(input.byte().unwrap_or(0));
                if !streams.is_empty() {
                    streams.swap_remove(index % streams.len());
                }
            }
            5 => {
                while let Ok((stream, _)) = host_listener.accept() {
                    stream.set_nonblocking(true).unwrap();
                    if streams.len() < 32 {
                        streams.push(stream);
                    }
                }
            }
            6 => {
                if paused {
                    device.resume();
                } else {
                    device.pause().expect("pause");
                }
                paused = !paused;
            }
            _ => {
                let buffer = alloc(8);
                event.add(&memory, &[(buffer, 4, 2)]);
                device.reset_transport();
            }
        }
        device.run_pass();
        stats.tx_used += tx.check_used(&memory, true);
        stats.rx_used += rx.check_used(&memory, false);
        event.check_used(&memory, false);
        stats.max_connections = stats.max_connections.max(device.connection_count());
        if paused {
            assert_eq!(
                (tx.check_used(&memory, true), rx.check_used(&memory, false)),
                (0, 0),
                "packets moved while paused"
            );
        }
    }
    if paused {
        device.resume();
    }
    device.run_pass();
    stats.tx_used += tx.check_used(&memory, true);
    stats.rx_used += rx.check_used(&memory, false);
    device.reset();
    assert_eq!(
        device.connection_count(),
        0,
        "connections left after a reset"
    );
    stats
}

/// Starting inputs: a guest connecting to `PATH_80` and sending data, a host `CONNECT` that
/// the guest accepts, garbage headers.
pub fn vsock_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let header = |op: u16, src_port: u32, dst_port: u32, len: u32| {
        let mut bytes = Vec::with_capacity(44);
        bytes.extend_from_slice(&CID.to_le_bytes());
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&src_port.to_le_bytes());
        bytes.extend_from_slice(&dst_port.to_le_bytes());
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&op.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(256u32 * 1024).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes
    };
    let mut guest_connects = vec![1u8, 1, 4, 0];
    guest_connects.push(0);
    guest_connects.extend(header(1, 1025, 80, 0));
    guest_connects.push(0);
    guest_connects.push(5);
    guest_connects.push(0);
    guest_connects.extend(header(5, 1025, 80, 32));
    guest_connects.push(4 << 3);
    guest_connects.extend([0x61; 64]);
    guest_connects.extend([3, 0, 4]);
    guest_connects.extend([0x62; 32]);
    guest_connects.push(0);
    guest_connects.extend(header(4, 1025, 80, 0));
    guest_connects.push(0);

    let mut host_connects = vec![0u8, 1, 4, 0, 2, 11];
    host_connects.extend(b"CONNECT 52\n");
    host_connects.extend([1, 2, 0]);
    host_connects.push(0);
    host_connects.extend(header(2, 52, 1 << 30, 0));
    host_connects.push(0);
    host_connects.extend([3, 0, 2]);
    host_connects.extend([0x63; 16]);
    host_connects.extend([1, 2, 0, 6, 6, 7, 4, 0]);

    let mut garbage = vec![1u8, 0];
    garbage.extend((0..44).map(|i| (i * 37 + 11) as u8));
    garbage.extend([3 << 3 | 4, 1, 4, 3, 0]);
    garbage.extend((0..44).map(|i| (i * 13 + 5) as u8));
    garbage.push(5);
    vec![
        ("guest-connects", guest_connects),
        ("host-connects", host_connects),
        ("garbage", garbage),
    ]
}
