//! Measurements behind the choice of one I/O thread per disk (see docs/architecture.md).
//!
//! Not run by default; in release mode:
//! `cargo test -p kiln-devices --release -- --ignored --nocapture blk_bench`
//!
//! Two ways to serve a disk's queue from the event loop are compared with the same request
//! stream: *inline* (the ioeventfd handler runs the requests on the event loop thread) and
//! *worker* (the handler kicks the disk's thread, which Kiln does). Reported: throughput, the
//! longest time one handler call kept the event loop busy, and the round trip of a small read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::DiskImage;
use super::request::HEADER_SIZE;
use super::test_utils::{write_header, TempImage, NEXT, WRITE};
use super::worker::{QueueWorker, WorkerThread};
use super::{request_type, SECTOR_SIZE};
use crate::virtio::{Interrupt, SharedSubscriber};
use kiln_arch::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 256;
const MEMORY: usize = 96 << 20;
const DISK: u64 = 64 << 20;
/// Where request headers, status bytes and data buffers go.
const HEADERS: u64 = 0x10_0000;
const STATUSES: u64 = 0x20_0000;
const BUFFERS: u64 = 0x40_0000;

/// The driver side of a split queue, kept minimal: one batch in flight at a time.
struct Driver {
    memory: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    const DESC: u64 = 0;
    const AVAIL: u64 = 16 * QUEUE_SIZE as u64;
    const USED: u64 = 0x8000;

    fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue
            .try_set_desc_table_address(GuestAddress(Self::DESC))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(Self::AVAIL))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(Self::USED))
            .unwrap();
        queue.set_ready(true);
        assert!(queue.is_valid(&self.memory));
        queue
    }

    /// Queues `count` requests of `len` bytes each, from sector `first` on.
    fn submit(&mut self, kind: u32, first: u64, len: u32, count: u16) {
        for i in 0..count {
            let slot = u64::from(i);
            let header = HEADERS + slot * HEADER_SIZE as u64;
            let sector = first + slot * u64::from(len) / SECTOR_SIZE;
            write_header(&self.memory, header, kind, sector);
            let data_flags = if kind == request_type::IN { WRITE } else { 0 };
            let descriptors = [
                (header, HEADER_SIZE as u32, NEXT),
                (BUFFERS + slot * u64::from(len), len, data_flags | NEXT),
                (STATUSES + slot, 1, WRITE),
            ];
            let head = i * 3;
            for (j, (addr, len, flags)) in descriptors.iter().enumerate() {
                let index = u64::from(head) + j as u64;
                let mut raw = [0u8; 16];
                raw[..8].copy_from_slice(&addr.to_le_bytes());
                raw[8..12].copy_from_slice(&len.to_le_bytes());
                raw[12..14].copy_from_slice(&flags.to_le_bytes());
                raw[14..].copy_from_slice(&(index as u16 + 1).to_le_bytes());
                self.memory
                    .write_slice(&raw, GuestAddress(Self::DESC + 16 * index))
                    .unwrap();
            }
            let entry = Self::AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.memory.write_obj(head, GuestAddress(entry)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.memory
            .write_obj(self.avail_idx, GuestAddress(Self::AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.memory.read_obj(GuestAddress(Self::USED + 2)).unwrap()
    }
}

/// Wraps a handler and records the longest single call.
struct Timed<S> {
    inner: S,
    longest: Arc<AtomicU64>,
}

impl<S: MutEventSubscriber> MutEventSubscriber for Timed<S> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let start = Instant::now();
        self.inner.process(events, ops);
        let took = start.elapsed().as_nanos() as u64;
        self.longest.fetch_max(took, Ordering::Relaxed);
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.inner.init(ops);
    }
}

/// The alternative to the worker thread: requests served on the event loop thread.
struct Inline {
    event: EventFd,
    worker: QueueWorker,
}

impl MutEventSubscriber for Inline {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.worker.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, event_manager::EventSet::IN))
            .unwrap();
    }
}

struct Setup {
    driver: Driver,
    event_loop: EventManager<SharedSubscriber>,
    event: EventFd,
    interrupt: Arc<Interrupt>,
    longest: Arc<AtomicU64>,
    _thread: Option<WorkerThread>,
    _image: TempImage,
}

fn setup(worker_thread: bool) -> Setup {
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let image = TempImage::new("bench", DISK);
    let disk = Arc::new(DiskImage::open(image.path(), false, None).unwrap());
    let driver = Driver {
        memory: memory.clone(),
        avail_idx: 0,
    };
    // Blocking: the bench thread waits on it like a vCPU waits for the interrupt.
    let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let worker = QueueWorker::new(driver.queue(), memory, disk, interrupt.clone());
    let event = EventFd::new(EFD_NONBLOCK).unwrap();
    let longest = Arc::new(AtomicU64::new(0));
    let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();
    let thread = if worker_thread {
        let thread = WorkerThread::spawn(worker).unwrap();
        event_loop.add_subscriber(Arc::new(Mutex::new(Timed {
            inner: thread.notifier(event.try_clone().unwrap()),
            longest: longest.clone(),
        })));
        Some(thread)
    } else {
        event_loop.add_subscriber(Arc::new(Mutex::new(Timed {
            inner: Inline {
                event: event.try_clone().unwrap(),
                worker,
            },
            longest: longest.clone(),
        })));
        None
    };
    Setup {
        driver,
        event_loop,
        event,
        interrupt,
        longest,
        _thread: thread,
        _image: image,
    }
}

impl Setup {
    /// Submits a batch, notifies, lets the loop dispatch the notification, and waits for the
    /// interrupt(s) until the batch is done.
    fn batch(&mut self, kind: u32, first: u64, len: u32, count: u16) {
        let target = self.driver.avail_idx.wrapping_add(count);
        self.driver.submit(kind, first, len, count);
        self.event.write(1).unwrap();
        assert_eq!(self.event_loop.run_with_timeout(1000).unwrap(), 1);
        while self.driver.used_idx() != target {
            self.interrupt.eventfd().read().unwrap();
        }
    }
}

fn mib_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p) as usize]
}

#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn blk_bench() {
    const REQUEST: u32 = 128 << 10;
    const BATCH: u16 = 32;
    let per_pass = DISK / u64::from(REQUEST) / u64::from(BATCH);
    for worker_thread in [false, true] {
        let name = if worker_thread {
            "worker thread"
        } else {
            "inline"
        };
        let mut s = setup(worker_thread);
        for (label, kind) in [("write", request_type::OUT), ("read", request_type::IN)] {
            s.longest.store(0, Ordering::Relaxed);
            let start = Instant::now();
            for pass in 0..2 {
                for b in 0..per_pass {
                    let first = (b * u64::from(BATCH) * u64::from(REQUEST)) / SECTOR_SIZE;
                    s.batch(kind, first, REQUEST, BATCH);
                    let _ = pass;
                }
            }
            let took = start.elapsed();
            println!(
                "{name:>13}: {label:<5} {:>7.0} MiB/s; longest event loop stall {:>8.1} us",
                mib_per_s(2 * DISK, took),
                s.longest.load(Ordering::Relaxed) as f64 / 1000.0
            );
        }
        // Flush after dirtying 8 MiB: fdatasync goes to the host disk.
        let mut flushes = Vec::new();
        s.longest.store(0, Ordering::Relaxed);
        for round in 0..10u64 {
            s.batch(
                request_type::OUT,
                round * 16384 % (DISK / SECTOR_SIZE),
                256 << 10,
                32,
            );
            let start = Instant::now();
            s.batch(request_type::FLUSH, 0, 0, 1);
            flushes.push(start.elapsed());
        }
        println!(
            "{name:>13}: flush after 8 MiB written: median {:?}; longest event loop stall {:.1} us",
            percentile(&mut flushes, 0.5),
            s.longest.load(Ordering::Relaxed) as f64 / 1000.0
        );
        // Round trip of one 4 KiB read (page cache hot).
        let mut trips = Vec::new();
        for i in 0..2000u64 {
            let start = Instant::now();
            s.batch(request_type::IN, (i * 8) % (DISK / SECTOR_SIZE), 4096, 1);
            trips.push(start.elapsed());
        }
        println!(
            "{name:>13}: 4 KiB read round trip: median {:?}, p99 {:?}",
            percentile(&mut trips, 0.5),
            percentile(&mut trips, 0.99)
        );
    }
}
