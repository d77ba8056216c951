//! A busy guest driver against the whole disk path (transport, event loop thread, I/O thread),
//! looking for lost notifications and lost interrupts.
//!
//! The driver follows the rules Linux's virtio-ring and virtio-mmio code follow, and nothing
//! more: it notifies only when `avail_event` (or `VRING_USED_F_NO_NOTIFY`) says the device wants
//! to hear about the new entries, and it only looks at the used ring again after re-enabling
//! interrupts (the `used_event` re-check) or after an interrupt whose `InterruptStatus` has the
//! used-ring bit. A notification or interrupt the device loses therefore shows up as a request
//! that never completes, which the driver reports after [`STALL`].
//!
//! How sensitive this is was checked by breaking the device on purpose (debug build, 2 cores):
//! raising the irqfd before setting `InterruptStatus`, or dropping kicks that arrive while the
//! I/O thread is busy, failed every run; dropping the re-check after notifications are
//! re-enabled (a window of about a microsecond) failed 2 runs of 3.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::EventManager;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_arch::GuestMemoryMmap;

use super::request::HEADER_SIZE;
use super::test_utils::{guest_memory, write_header, TempImage, NEXT, WRITE};
use super::{request_status, request_type, Block, DiskImage, SECTOR_SIZE};
use crate::bus::BusDevice;
use crate::virtio::mmio::{regs, MmioTransport};
use crate::virtio::{features, status, EventLoopHandle, SharedSubscriber, INTERRUPT_USED_RING};

/// Queue size the driver picks (smaller than the device's maximum, so ring slots wrap often).
const QUEUE: u16 = 64;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x1_0000;
const STATUSES: u64 = 0x1_8000;
const BUFFERS: u64 = 0x2_0000;
/// One request moves one 4 KiB block.
const BLOCK: u64 = 4096;
const DISK_BLOCKS: u64 = 256;
/// How long the driver waits for an interrupt before calling the device stuck. Generous: the
/// test shares two cores with whatever else runs.
const STALL: Duration = Duration::from_secs(3);
/// The used ring flag that asks the driver not to notify, as the ring's `u16`.
const USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;
/// How long the driver spins on the used ring, every other time, before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

/// The image content: every 8-byte word holds its own byte offset, so any block read from
/// anywhere can be checked, and writing a block's own content back leaves the image unchanged.
fn block_content(block: u64) -> Vec<u8> {
    (0..BLOCK / 8)
        .flat_map(|word| (block * BLOCK + word * 8).to_le_bytes())
        .collect()
}

/// `vring_need_event` (virtio 1.2, 2.7.10): whether moving an index from `old` to `new` passes
/// `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One request: which block, and whether it writes it (else reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    block: u64,
    is_write: bool,
}

/// What a descriptor slot (three descriptors from `3 * slot`) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Free,
    /// Descriptors written, not yet in the available ring.
    Staged(Request),
    InFlight(Request),
    /// Back in the used ring with this length; its data is not checked yet.
    Done(Request, u32),
}

/// The driver side: ring layout, submission and completion, one thread (a "vCPU").
///
/// The next requests are staged before the driver waits, and completed ones are checked only
/// after their successors went out, so that the driver answers a completion within a fraction
/// of a microsecond (when it catches it spinning): that is what hits the device's short
/// windows, like the one between "the ring is empty" and "notifications are back on".
struct Driver {
    transport: MmioTransport<Block>,
    memory: GuestMemoryMmap,
    irq: EventFd,
    event_idx: bool,
    avail_idx: u16,
    last_used: u16,
    /// Requests the driver keeps in flight.
    depth: usize,
    /// `2 * depth` slots: up to `depth` in flight and `depth` staged.
    slots: Vec<Slot>,
    staged: VecDeque<usize>,
    in_flight: usize,
    /// Spin on the used ring before sleeping, every other wait.
    spin: bool,
    seed: u64,
    submitted: u64,
    completed: u64,
    notifications: u64,
    interrupts: u64,
}

impl Driver {
    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// What Linux's virtio-mmio driver does at probe time, accepting everything offered
    /// except (unless `event_idx`) `RING_EVENT_IDX`.
    fn bring_up(&mut self) {
        self.write(regs::STATUS, 0);
        self.write(regs::STATUS, status::ACKNOWLEDGE);
        self.write(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let mut offered = 0u64;
        for word in 0..2 {
            self.write(regs::DEVICE_FEATURES_SEL, word);
            offered |= u64::from(self.read(regs::DEVICE_FEATURES)) << (32 * word);
        }
        assert_ne!(offered & (1 << features::RING_EVENT_IDX), 0);
        if !self.event_idx {
            offered &= !(1 << features::RING_EVENT_IDX);
        }
        for word in 0..2 {
            self.write(regs::DRIVER_FEATURES_SEL, word);
            self.write(regs::DRIVER_FEATURES, (offered >> (32 * word)) as u32);
        }
        let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(regs::STATUS, negotiated);
        assert_eq!(self.read(regs::STATUS), negotiated);
        self.write(regs::QUEUE_SEL, 0);
        self.write(regs::QUEUE_NUM, u32::from(QUEUE));
        for (low, addr) in [
            (regs::QUEUE_DESC_LOW, DESC),
            (regs::QUEUE_AVAIL_LOW, AVAIL),
            (regs::QUEUE_USED_LOW, USED),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, 0);
        }
        self.write(regs::QUEUE_READY, 1);
        self.write(regs::STATUS, negotiated | status::DRIVER_OK);
        assert_eq!(self.read(regs::STATUS), negotiated | status::DRIVER_OK);
        assert!(self.transport.device().is_running());
    }

    fn load16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.memory
                .load(GuestAddress(addr), Ordering::Acquire)
                .unwrap(),
        )
    }

    fn store16(&self, addr: u64, value: u16) {
        self.memory
            .store(value.to_le(), GuestAddress(addr), Ordering::Release)
            .unwrap();
    }

    fn used_event_addr() -> u64 {
        AVAIL + 4 + 2 * u64::from(QUEUE)
    }

    fn avail_event_addr() -> u64 {
        USED + 4 + 8 * u64::from(QUEUE)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Puts one request (a 4 KiB read, or every eighth time a write of the block's own content)
    /// in free slot `slot`.
    fn prepare(&mut self, slot: usize) {
        let random = self.next_random();
        let block = random % DISK_BLOCKS;
        let is_write = (random >> 32) & 7 == 0;
        let slot64 = slot as u64;
        let header = HEADERS + slot64 * HEADER_SIZE as u64;
        let buffer = BUFFERS + slot64 * BLOCK;
        let kind = if is_write {
            request_type::OUT
        } else {
            request_type::IN
        };
        write_header(&self.memory, header, kind, block * BLOCK / SECTOR_SIZE);
        if is_write {
            self.memory
                .write_slice(&block_content(block), GuestAddress(buffer))
                .unwrap();
        } else {
            // Poison the buffer so that a request that did nothing cannot pass the check.
            self.memory
                .write_slice(&[0xee; BLOCK as usize], GuestAddress(buffer))
                .unwrap();
        }
        self.memory
            .write_obj(0xffu8, GuestAddress(STATUSES + slot64))
            .unwrap();
        let head = (slot * 3) as u16;
        let data_flags = if is_write { 0 } else { WRITE };
        let chain = [
            (header, HEADER_SIZE as u32, NEXT),
            (buffer, BLOCK as u32, data_flags | NEXT),
            (STATUSES + slot64, 1, WRITE),
        ];
        for (i, (addr, len, flags)) in chain.into_iter().enumerate() {
            let index = head + i as u16;
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&(index + 1).to_le_bytes());
            self.memory
                .write_slice(&raw, GuestAddress(DESC + 16 * u64::from(index)))
                .unwrap();
        }
        self.slots[slot] = Slot::Staged(Request { block, is_write });
    }

    /// Stages requests in free slots until `depth` are staged.
    fn stage(&mut self) {
        while self.staged.len() < self.depth {
            let Some(slot) = self.slots.iter().position(|s| *s == Slot::Free) else {
                return;
            };
            self.prepare(slot);
            self.staged.push_back(slot);
        }
    }

    /// Makes staged requests available up to `limit` in flight, then notifies if the device
    /// asked for it (`virtqueue_kick_prepare`).
    fn publish(&mut self, limit: usize) {
        let old = self.avail_idx;
        while self.in_flight < limit {
            let Some(slot) = self.staged.pop_front() else {
                break;
            };
            let Slot::Staged(request) = self.slots[slot] else {
                panic!("slot {slot} was not staged");
            };
            self.slots[slot] = Slot::InFlight(request);
            self.in_flight += 1;
            let entry = AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE);
            self.store16(entry, (slot * 3) as u16);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.submitted += 1;
        }
        if self.avail_idx == old {
            return;
        }
        // The descriptors and ring entries before the index, the index before reading what
        // the device wants (virtio_wmb / virtio_mb).
        fence(Ordering::SeqCst);
        self.store16(AVAIL + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        let notify = if self.event_idx {
            need_event(self.load16(Self::avail_event_addr()), self.avail_idx, old)
        } else {
            self.load16(USED) & USED_F_NO_NOTIFY == 0
        };
        if notify {
            self.notifications += 1;
            self.write(regs::QUEUE_NOTIFY, 0);
        }
    }

    /// Takes every used entry (`virtqueue_get_buf`); the data is checked later by `verify`.
    fn reap(&mut self) -> u64 {
        let mut reaped = 0;
        while self.load16(USED + 2) != self.last_used {
            let entry = USED + 4 + 8 * u64::from(self.last_used % QUEUE);
            let [id, len]: [u32; 2] = self.memory.read_obj(GuestAddress(entry)).unwrap();
            let slot = id as usize / 3;
            let Some(&Slot::InFlight(request)) = self.slots.get(slot) else {
                panic!("used entry for descriptor {id}, which is not in flight");
            };
            self.slots[slot] = Slot::Done(request, len);
            self.in_flight -= 1;
            self.last_used = self.last_used.wrapping_add(1);
            self.completed += 1;
            reaped += 1;
        }
        reaped
    }

    /// Checks status, used length and data of every completed request, and frees its slot.
    fn verify(&mut self) {
        for slot in 0..self.slots.len() {
            let Slot::Done(Request { block, is_write }, len) = self.slots[slot] else {
                continue;
            };
            let slot64 = slot as u64;
            let status: u8 = self
                .memory
                .read_obj(GuestAddress(STATUSES + slot64))
                .unwrap();
            assert_eq!(status, request_status::OK, "request on block {block}");
            if is_write {
                assert_eq!(len, 1, "used length of a write");
            } else {
                assert_eq!(len, BLOCK as u32 + 1, "used length of a read");
                let mut data = vec![0u8; BLOCK as usize];
                self.memory
                    .read_slice(&mut data, GuestAddress(BUFFERS + slot64 * BLOCK))
                    .unwrap();
                assert!(data == block_content(block), "wrong data for block {block}");
            }
            self.slots[slot] = Slot::Free;
        }
    }

    /// Busy-waits a little for the used ring to move (as a polling driver would); true if it
    /// did.
    fn spin_for_used(&self) -> bool {
        let until = Instant::now() + SPIN;
        loop {
            if self.load16(USED + 2) != self.last_used {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Waits until at least one request completed, the way an interrupt-driven driver does
    /// (`virtblk_done`: disable callbacks, reap, re-enable and re-check; else sleep until an
    /// interrupt whose status says the used ring changed).
    fn wait_for_completions(&mut self) {
        assert!(
            self.in_flight > 0,
            "test bug: waiting with nothing in flight"
        );
        self.spin = !self.spin;
        if self.spin && self.spin_for_used() {
            // Answer the completion at once, before even reading it: the staged requests go
            // out while the device may still be finishing its pass.
            self.publish(2 * self.depth);
        }
        let mut reaped = 0;
        loop {
            if self.event_idx {
                // virtqueue_disable_cb with event index writes 0 ("a hack", says Linux).
                self.store16(Self::used_event_addr(), 0);
            }
            reaped += self.reap();
            if reaped > 0 {
                return;
            }
            // virtqueue_enable_cb: ask for an interrupt at the next entry, then re-check.
            if self.event_idx {
                self.store16(Self::used_event_addr(), self.last_used);
            }
            fence(Ordering::SeqCst);
            if self.load16(USED + 2) != self.last_used {
                continue;
            }
            self.sleep_until_used_interrupt();
        }
    }

    /// vm_interrupt: only an interrupt with the used-ring bit sends the driver to the ring.
    fn sleep_until_used_interrupt(&mut self) {
        loop {
            let mut poll = libc::pollfd {
                fd: self.irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, STALL.as_millis() as i32) };
            if ready == 0 {
                panic!("{}", self.stall_report());
            }
            assert_eq!(ready, 1, "poll: {}", std::io::Error::last_os_error());
            let _ = self.irq.read();
            self.interrupts += 1;
            let pending = self.read(regs::INTERRUPT_STATUS);
            self.write(regs::INTERRUPT_ACK, pending);
            if pending & INTERRUPT_USED_RING != 0 {
                return;
            }
        }
    }

    fn stall_report(&mut self) -> String {
        let interrupt_status = self.read(regs::INTERRUPT_STATUS);
        let device_status = self.read(regs::STATUS);
        format!(
            "no interrupt for {STALL:?}: submitted {}, completed {}, avail idx {}, used idx {}, \
             used_event {}, avail_event {}, used flags {:#x}, InterruptStatus {:#x}, device \
             status {:#x}, {} notifications, {} interrupts",
            self.submitted,
            self.completed,
            self.avail_idx,
            self.load16(USED + 2),
            self.load16(Self::used_event_addr()),
            self.load16(Self::avail_event_addr()),
            self.load16(USED),
            interrupt_status,
            device_status,
            self.notifications,
            self.interrupts,
        )
    }
}

/// The VMM thread: runs the event loop until told to stop.
struct EventLoopThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopThread {
    fn start() -> (Self, EventLoopHandle) {
        let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();
        let handle = EventLoopHandle::new(event_loop.remote_endpoint());
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Acquire) {
                event_loop.run_with_timeout(20).unwrap();
            }
        });
        let this = Self {
            stop,
            thread: Some(thread),
        };
        (this, handle)
    }
}

impl Drop for EventLoopThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let result = thread.join();
            if !std::thread::panicking() {
                result.unwrap();
            }
        }
    }
}

/// Runs a driver with `depth` requests in flight for `duration`; returns it for its counters.
fn run_guest(event_idx: bool, depth: usize, duration: Duration) -> Driver {
    let image = TempImage::new("stress", DISK_BLOCKS * BLOCK);
    let content: Vec<u8> = (0..DISK_BLOCKS).flat_map(block_content).collect();
    std::fs::write(image.path(), content).unwrap();
    let memory = guest_memory();
    let (event_loop, handle) = EventLoopThread::start();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let transport = MmioTransport::new(
        block,
        memory.clone(),
        irq.try_clone().unwrap(),
        Some(handle),
    )
    .unwrap();
    let mut driver = Driver {
        transport,
        memory,
        irq,
        event_idx,
        avail_idx: 0,
        last_used: 0,
        depth,
        slots: vec![Slot::Free; 2 * depth],
        staged: VecDeque::new(),
        in_flight: 0,
        spin: false,
        seed: 0x9e37_79b9_7f4a_7c15 ^ depth as u64,
        submitted: 0,
        completed: 0,
        notifications: 0,
        interrupts: 0,
    };
    driver.bring_up();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        driver.verify();
        driver.stage();
        driver.publish(depth);
        // The next requests wait, ready, while the driver does.
        driver.stage();
        driver.wait_for_completions();
    }
    while driver.in_flight > 0 {
        driver.wait_for_completions();
    }
    driver.verify();
    assert_eq!(driver.completed, driver.submitted);
    // The device stops cleanly with the loop still running, as on a guest reset.
    driver.write(regs::STATUS, 0);
    assert!(!driver.transport.device().is_running());
    drop(event_loop);
    // Both ways of learning about completions were taken: interrupts, and the re-check after
    // re-enabling them (or the spin).
    assert!(
        driver.interrupts > 0,
        "no interrupt in {} requests",
        driver.completed
    );
    assert!(driver.interrupts < driver.completed);
    assert!(driver.notifications > 0);
    let written = std::fs::read(image.path()).unwrap();
    assert!(
        written == (0..DISK_BLOCKS).flat_map(block_content).collect::<Vec<_>>(),
        "the image changed"
    );
    driver
}

/// At least this many requests must complete for a run to count as a stress test (a debug
/// build on a busy 2-core machine manages several thousand a second).
const MIN_REQUESTS: u64 = 200;
const RUN: Duration = Duration::from_millis(1200);

#[test]
fn queue_depth_one_with_event_idx_never_stalls() {
    let driver = run_guest(true, 1, RUN);
    assert!(driver.completed >= MIN_REQUESTS, "{}", driver.completed);
}

#[test]
fn eight_in_flight_with_event_idx_never_stall() {
    let driver = run_guest(true, 8, RUN);
    assert!(driver.completed >= MIN_REQUESTS, "{}", driver.completed);
}

#[test]
fn queue_depth_one_without_event_idx_never_stalls() {
    let driver = run_guest(false, 1, RUN);
    assert!(driver.completed >= MIN_REQUESTS, "{}", driver.completed);
}

#[test]
fn eight_in_flight_without_event_idx_never_stall() {
    let driver = run_guest(false, 8, RUN);
    assert!(driver.completed >= MIN_REQUESTS, "{}", driver.completed);
}
