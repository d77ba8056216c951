//! Fuzzing harness for Kiln's virtio-net device: one input is a script of guest and host actions
//! against a live device over an in-memory backend.
//!
//! Input: byte 0 sets up the device: bit 0 `RING_EVENT_IDX`, bit 1 a backend with virtio-net
//! headers (a TAP's kind, which brings the offload features), bit 2 the driver takes
//! `MRG_RXBUF`, bit 3 it takes every other feature offered. Then actions, each a kind byte and
//! its operands:
//! - `0` a TX chain: a shape byte (header and frame in two buffers, one buffer, a
//!   device-writable buffer, a buffer outside guest memory, a descriptor claiming more than a
//!   frame can be), a length byte (× 256) and a fill byte; the header's first two bytes come
//!   from the shape byte;
//! - `1` receive buffers: a count, a size byte (× 64 bytes) and a shape (normal, read-only,
//!   outside guest memory, two buffers per chain);
//! - `2` a frame from the host: a length byte (× 257, at most 65,550) and a fill byte;
//! - `3` the backend is full (or no longer); `4` the backend goes away;
//! - `5` runs a pass; `6` pauses or resumes; `7` resets and re-activates the device.
//!
//! What must hold whatever the input: no panic; every used entry names a chain the driver made
//! available, TX entries have length 0, RX entries fit their buffers; the backend never gets a
//! frame larger than the device allows; no frame is both delivered and dropped.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kiln_arch::GuestMemoryMmap;
use kiln_devices::virtio::net::{
    features, Backend, BackendError, MacAddress, Net, MAX_FRAME_SIZE, MAX_PACKET_SIZE,
};
use kiln_devices::virtio::{Activation, Interrupt, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vsock::{Bytes2, DriverQueue};

/// Guest memory: `[0, MEMORY_SIZE)`; buffers from `BUFFERS` up.
const MEMORY_SIZE: u64 = 0x10_0000;
const BUFFERS: u64 = 0x1_0000;

#[derive(Debug, Default)]
struct HostSide {
    inbound: VecDeque<Vec<u8>>,
    sent_to_guest: u64,
    largest_from_guest: usize,
    frames_from_guest: u64,
    full: bool,
    gone: bool,
}

#[derive(Debug)]
struct MemoryBackend {
    host: Arc<Mutex<HostSide>>,
    vnet_header: bool,
    fd: EventFd,
}

impl Backend for MemoryBackend {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn has_vnet_header(&self) -> bool {
        self.vnet_header
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError> {
        let mut host = self.host.lock().unwrap();
        if host.gone {
            return Err(BackendError::Gone("the fuzz host went away".into()));
        }
        Ok(host.inbound.pop_front().map(|frame| {
            buf[..frame.len()].copy_from_slice(&frame);
            frame.len()
        }))
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, BackendError> {
        let mut host = self.host.lock().unwrap();
        if host.gone {
            return Err(BackendError::Gone("the fuzz host went away".into()));
        }
        if host.full {
            return Ok(false);
        }
        let limit = if self.vnet_header {
            MAX_PACKET_SIZE
        } else {
            MAX_FRAME_SIZE
        };
        assert!(
            frame.len() <= limit,
            "a {}-byte frame reached the backend",
            frame.len()
        );
        host.largest_from_guest = host.largest_from_guest.max(frame.len());
        host.frames_from_guest += 1;
        Ok(true)
    }
}

/// What one input did, for tests of the harness itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// TX chains the device used.
    pub tx_used: usize,
    /// RX chains the device used.
    pub rx_used: usize,
    /// Frames the backend got from the guest.
    pub frames_out: u64,
    /// Frames the guest got.
    pub frames_in: u64,
}

fn activate(
    device: &mut Net,
    memory: &GuestMemoryMmap,
    rx: &DriverQueue,
    tx: &DriverQueue,
    config: u8,
) {
    let offered = device.features();
    let mut accepted = offered & (1 << features::MAC | 1 << features::STATUS);
    accepted |= offered & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX);
    if config & 4 != 0 {
        accepted |= offered & (1 << features::MRG_RXBUF);
    }
    if config & 8 != 0 {
        accepted = offered;
    }
    let event_idx = config & 1 != 0;
    let activation = Activation {
        memory: memory.clone(),
        queues: vec![rx.queue(memory, event_idx), tx.queue(memory, event_idx)],
        queue_events: (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect(),
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        features: accepted,
    };
    if device.check_features(accepted).is_ok() {
        device.activate(activation).expect("activation");
    }
}

/// Runs one input; panics if an invariant breaks.
pub fn run_net_frames(data: &[u8]) -> NetStats {
    let mut input = Bytes2(data);
    let Some(config) = input.byte() else {
        return NetStats::default();
    };
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
        .expect("fuzz guest memory");
    let host = Arc::new(Mutex::new(HostSide::default()));
    let backend = MemoryBackend {
        host: host.clone(),
        vnet_header: config & 2 != 0,
        fd: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let mac = MacAddress([2, 0x4b, 0, 0, 0, 1]);
    let mut device = Net::new("fuzz-net", mac, Box::new(backend)).expect("net device");
    let mut rx = DriverQueue::new(0x0);
    let mut tx = DriverQueue::new(0x1000);
    activate(&mut device, &memory, &rx, &tx, config);

    let mut stats = NetStats::default();
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
                let shape = input.byte().unwrap_or(0);
                let len = u64::from(input.byte().unwrap_or(1)) * 256;
                let fill = input.byte().unwrap_or(0);
                let header_addr = alloc(12);
                let mut header = [0u8; 12];
                header[0] = shape >> 4;
                header[1] = shape >> 3 & 0x85;
                memory
                    .write_slice(&header, GuestAddress(header_addr))
                    .unwrap();
                let data = alloc(len);
                let bytes = vec![fill; len as usize];
                memory.write_slice(&bytes, GuestAddress(data)).unwrap();
                let len = len as u32;
                let chain: Vec<(u64, u32, u16)> = match shape % 5 {
                    0 => vec![(header_addr, 12, 0), (data, len, 0)],
                    1 => vec![(header_addr, 12 + len.min(4), 0)],
                    2 => vec![(header_addr, 12, 0), (data, len, 2)],
                    3 => vec![(header_addr, 12, 0), (MEMORY_SIZE - 8, len.max(16), 0)],
                    _ => vec![(header_addr, 12, 0), (data, 70_000, 0)],
                };
                tx.add(&memory, &chain);
            }
            1 => {
                let count = input.byte().unwrap_or(1) % 5;
                let size = u32::from(input.byte().unwrap_or(1)) * 64;
                let shape = input.byte().unwrap_or(0);
                for _ in 0..count {
                    let addr = alloc(u64::from(size) * 2);
                    let chain = match shape % 4 {
                        0 => vec![(addr, size, 2)],
                        1 => vec![(addr, size, 0)],
                        2 => vec![(MEMORY_SIZE - 4, size.max(64), 2)],
                        _ => vec![(addr, size / 2, 2), (addr + u64::from(size), size / 2, 2)],
                    };
                    rx.add(&memory, &chain);
                }
            }
            2 => {
                let len = (usize::from(input.byte().unwrap_or(1)) * 257).min(MAX_FRAME_SIZE);
                let fill = input.byte().unwrap_or(0);
                let mut frame = vec![fill; len];
                if config & 2 != 0 && frame.len() >= 2 {
                    // A TAP's header in front: its flags and GSO type from the fill.
                    frame[0] = fill & 3;
                    frame[1] = fill >> 2 & 0x85;
                }
                let mut host = host.lock().unwrap();
                host.inbound.push_back(frame);
                host.sent_to_guest += 1;
            }
            3 => {
                let mut host = host.lock().unwrap();
                host.full = !host.full;
            }
            4 => host.lock().unwrap().gone = true,
            5 => device.run_pass(),
            6 => {
                if paused {
                    device.resume();
                } else {
                    device.pause().expect("pause");
                }
                paused = !paused;
            }
            _ => {
                device.reset();
                paused = false;
                // The driver starts over with fresh rings.
                rx = DriverQueue::new(0x0);
                tx = DriverQueue::new(0x1000);
                for base in [0x0u64, 0x1000] {
                    memory
                        .write_slice(&[0u8; 0x400], GuestAddress(base))
                        .unwrap();
                }
                activate(&mut device, &memory, &rx, &tx, config);
            }
        }
        if !paused {
            device.run_pass();
        }
        stats.tx_used += tx.check_used(&memory, true);
        stats.rx_used += rx.check_used(&memory, false);
    }
    let counters = device.stats();
    let host = host.lock().unwrap();
    let delivered = counters.rx_frames.load(Ordering::Relaxed);
    let dropped = counters.rx_dropped.load(Ordering::Relaxed);
    assert!(
        delivered + dropped <= host.sent_to_guest,
        "{delivered} delivered + {dropped} dropped of {} frames",
        host.sent_to_guest
    );
    assert_eq!(
        counters.tx_frames.load(Ordering::Relaxed),
        host.frames_from_guest
    );
    stats.frames_out = host.frames_from_guest;
    stats.frames_in = delivered;
    stats
}

/// Starting inputs: traffic both ways with and without merged buffers and headers, and junk.
pub fn net_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let both_ways = vec![
        0b0101, // event idx, mergeable
        0, 0, 6, 0x41, // TX: two buffers, 1536 bytes
        2, 6, 0x42, // host frame of 1542 bytes
        1, 4, 32, 0, // 4 RX buffers of 2048
        5,
    ];
    let offloads = vec![
        0b1011, // event idx, headers, all features
        0, 10, 255, 0x43, // TX with GSO TCPv4 in its header, 65280 bytes
        2, 255, 0x45, // a 65535-byte frame from the host
        1, 4, 255, 3, // two-buffer chains
        1, 4, 255, 0, 5,
    ];
    let junk = vec![
        0b0000, // no mergeable buffers
        0, 2, 3, 0x44, // device-writable TX buffer
        0, 3, 1, 0, // TX outside memory
        0, 4, 0, 0, // oversized descriptor
        2, 40, 1, // frame larger than the RX buffer
        1, 1, 8, 1, // read-only RX buffer
        1, 1, 8, 2, // RX outside memory
        3, 0, 0, 6, 0x46, 5, 3, // backend full, a frame waits, then goes
        6, 4, 2, 1, 1, 1, 40, 0, 7, 5,
    ];
    vec![
        ("both-ways", both_ways),
        ("offloads", offloads),
        ("junk", junk),
    ]
}
