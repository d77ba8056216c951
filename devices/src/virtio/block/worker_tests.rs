use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::virtio::block::test_utils::*;
use crate::virtio::block::{request_status, request_type};
use crate::virtio::{SharedSubscriber, INTERRUPT_USED_RING};

const QUEUE: u16 = 16;
/// Where the tests put the used ring: virtio-queue's mock lays its used ring over the end of
/// its available ring (it sizes that ring in entries, not bytes), so it is moved out of the way.
const USED_RING: u64 = 0x8000;

struct Fixture {
    memory: GuestMemoryMmap,
    _image: TempImage,
    disk: Arc<DiskImage>,
    interrupt: Arc<Interrupt>,
}

fn fixture() -> Fixture {
    let image = TempImage::new("worker", 64 * 1024);
    let content: Vec<u8> = (0..64 * 1024u32).map(|i| (i / 512) as u8).collect();
    std::fs::write(image.path(), content).unwrap();
    let disk = Arc::new(DiskImage::open(image.path(), false, None).unwrap());
    Fixture {
        memory: guest_memory(),
        _image: image,
        disk,
        interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
    }
}

impl Fixture {
    fn queue(&self, vq: &MockSplitQueue<GuestMemoryMmap>) -> Queue {
        let mut queue: Queue = vq.create_queue().unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(USED_RING))
            .unwrap();
        queue
    }

    fn worker(&self, vq: &MockSplitQueue<GuestMemoryMmap>) -> QueueWorker {
        QueueWorker::new(
            self.queue(vq),
            self.memory.clone(),
            self.disk.clone(),
            self.interrupt.clone(),
        )
    }

    fn interrupts(&self) -> u64 {
        self.interrupt.eventfd().read().unwrap_or(0)
    }
}

fn used_idx(memory: &GuestMemoryMmap) -> u16 {
    memory.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

/// `(id, len)` of the first `count` used ring entries.
fn used(memory: &GuestMemoryMmap, count: u16) -> Vec<(u32, u32)> {
    assert_eq!(used_idx(memory), count, "used ring index");
    (0..u64::from(count))
        .map(|i| {
            let elem: [u32; 2] = memory
                .read_obj(GuestAddress(USED_RING + 4 + 8 * i))
                .unwrap();
            (elem[0], elem[1])
        })
        .collect()
}

/// A read of `sector` into `DATA + slot * 0x1000`, status at `STATUS + slot`.
fn read_chain(
    memory: &GuestMemoryMmap,
    first: u16,
    slot: u64,
    sector: u64,
) -> Vec<virtio_queue::desc::RawDescriptor> {
    write_header(memory, HEADER + slot * 16, request_type::IN, sector);
    linked(
        first,
        &[
            (HEADER + slot * 16, 16, 0),
            (DATA + slot * 0x1000, 512, WRITE),
            (STATUS + slot, 1, WRITE),
        ],
    )
}

fn status(memory: &GuestMemoryMmap, slot: u64) -> u8 {
    memory.read_obj(GuestAddress(STATUS + slot)).unwrap()
}

#[test]
fn serves_every_available_request_and_interrupts_once() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    let mut descriptors = read_chain(&f.memory, 0, 0, 5);
    write_header(&f.memory, HEADER + 16, request_type::OUT, 9);
    descriptors.extend(linked(
        3,
        &[
            (HEADER + 16, 16, 0),
            (DATA + 0x1000, 512, 0),
            (STATUS + 1, 1, WRITE),
        ],
    ));
    write_header(&f.memory, HEADER + 32, request_type::FLUSH, 0);
    descriptors.extend(linked(6, &[(HEADER + 32, 16, 0), (STATUS + 2, 1, WRITE)]));
    f.memory
        .write_slice(&[0x42; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    vq.add_desc_chains(&descriptors, 0).unwrap();

    let mut worker = f.worker(&vq);
    let stats = worker.process_queue();
    assert_eq!(
        stats,
        PassStats {
            completed: 3,
            failed: 0
        }
    );
    assert_eq!(used(&f.memory, 3), vec![(0, 513), (3, 1), (6, 1)]);
    assert_eq!(
        [
            status(&f.memory, 0),
            status(&f.memory, 1),
            status(&f.memory, 2)
        ],
        [0; 3]
    );
    let mut sector = [0u8; 512];
    f.memory
        .read_slice(&mut sector, GuestAddress(DATA))
        .unwrap();
    assert_eq!(sector, [5; 512]);
    let image = std::fs::read(f.disk.path()).unwrap();
    assert_eq!(image[9 * 512..10 * 512], [0x42; 512]);
    assert_eq!(f.interrupts(), 1);
    assert_eq!(f.interrupt.status(), INTERRUPT_USED_RING);
    assert!(!f.interrupt.needs_reset());

    // Nothing new: no used entries, no interrupt.
    assert_eq!(worker.process_queue(), PassStats::default());
    assert_eq!(f.interrupts(), 0);
}

#[test]
fn bad_requests_do_not_stop_good_ones() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    // 1: past the end of the disk (IOERR); 2: no status byte (unanswerable); 3: a good read.
    let mut descriptors = read_chain(&f.memory, 0, 0, 1000);
    descriptors.extend(linked(3, &[(HEADER, 16, 0), (DATA, 512, 0)]));
    descriptors.extend(read_chain(&f.memory, 5, 2, 7));
    vq.add_desc_chains(&descriptors, 0).unwrap();

    let mut worker = f.worker(&vq);
    let stats = worker.process_queue();
    assert_eq!(
        stats,
        PassStats {
            completed: 3,
            failed: 2
        }
    );
    assert_eq!(used(&f.memory, 3), vec![(0, 1), (3, 0), (5, 513)]);
    assert_eq!(status(&f.memory, 0), request_status::IOERR);
    assert_eq!(status(&f.memory, 2), request_status::OK);
    // The unanswerable chain asks for a reset, but the queue keeps going.
    assert!(f.interrupt.needs_reset());
    assert!(!worker.is_broken());
}

#[test]
fn corrupt_available_index_breaks_the_queue() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    vq.add_desc_chains(&read_chain(&f.memory, 0, 0, 1), 0)
        .unwrap();
    // The driver claims 100 new entries in a 16-entry ring.
    vq.avail().idx().store(100);
    let mut worker = f.worker(&vq);
    assert_eq!(worker.process_queue(), PassStats::default());
    assert!(worker.is_broken());
    assert!(f.interrupt.needs_reset());
    assert_eq!(used_idx(&f.memory), 0);
    // It stays stopped even if the index looks sane again.
    vq.avail().idx().store(1);
    assert_eq!(worker.process_queue(), PassStats::default());
    assert_eq!(used_idx(&f.memory), 0);
}

#[test]
fn available_entries_naming_missing_descriptors_are_skipped() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    for (index, descriptor) in read_chain(&f.memory, 0, 0, 3).iter().enumerate() {
        vq.desc_table().store(index as u16, *descriptor).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(77);
    vq.avail().ring().ref_at(1).unwrap().store(0);
    vq.avail().idx().store(2);
    let mut worker = f.worker(&vq);
    let stats = worker.process_queue();
    assert_eq!(stats.completed, 1);
    assert_eq!(used(&f.memory, 1), vec![(0, 513)]);
    assert_eq!(status(&f.memory, 0), request_status::OK);
    assert!(f.interrupt.needs_reset());
    assert!(!worker.is_broken());
}

#[test]
fn event_idx_interrupts_only_when_the_driver_asks() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE));
    // The driver wants an interrupt once the used index passes 3.
    f.memory.write_obj(3u16, used_event).unwrap();
    let mut queue = f.queue(&vq);
    queue.set_event_idx(true);
    let mut worker = QueueWorker::new(queue, f.memory.clone(), f.disk.clone(), f.interrupt.clone());

    vq.add_desc_chains(&read_chain(&f.memory, 0, 0, 1), 0)
        .unwrap();
    assert_eq!(worker.process_queue().completed, 1);
    assert_eq!(f.interrupts(), 0, "used index 1 does not pass used_event 3");
    // The device tells the driver where to notify next (avail_event = next_avail).
    let avail_event = GuestAddress(USED_RING + 4 + 8 * u64::from(QUEUE));
    assert_eq!(f.memory.read_obj::<u16>(avail_event).unwrap(), 1);

    let mut descriptors = read_chain(&f.memory, 3, 1, 2);
    descriptors.extend(read_chain(&f.memory, 6, 2, 3));
    descriptors.extend(read_chain(&f.memory, 9, 3, 4));
    vq.add_desc_chains(&descriptors, 3).unwrap();
    assert_eq!(worker.process_queue().completed, 3);
    assert_eq!(f.interrupts(), 1, "used index 4 passes used_event 3");
}

fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn notifications_reach_the_worker_thread_through_the_event_loop() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    let queue_event = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();

    let mut thread = WorkerThread::spawn(f.worker(&vq)).unwrap();
    let notifier: SharedSubscriber = Arc::new(Mutex::new(
        thread.notifier(queue_event.try_clone().unwrap()),
    ));
    event_loop.add_subscriber(notifier);

    vq.add_desc_chains(&read_chain(&f.memory, 0, 0, 6), 0)
        .unwrap();
    queue_event.write(1).unwrap();
    assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
    wait_for("the first request", || used_idx(&f.memory) == 1);
    assert_eq!(status(&f.memory, 0), request_status::OK);
    wait_for("the interrupt", || {
        f.interrupt.status() & INTERRUPT_USED_RING != 0
    });

    vq.add_desc_chains(&read_chain(&f.memory, 3, 1, 7), 3)
        .unwrap();
    queue_event.write(1).unwrap();
    assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
    wait_for("the second request", || used_idx(&f.memory) == 2);

    // Once the worker is stopped, a late notification makes the handler unsubscribe itself
    // instead of failing.
    thread.stop();
    queue_event.write(1).unwrap();
    assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(event_loop.run_with_timeout(50).unwrap(), 0);
}

#[test]
fn a_stale_handler_passes_notifications_on_to_the_next_worker() {
    // A driver resets the device and brings it up again before the event loop has removed the
    // old handler: the old handler must not swallow the first notification for the new worker.
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    let queue_event = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();

    let mut old = WorkerThread::spawn(f.worker(&vq)).unwrap();
    let stale: SharedSubscriber =
        Arc::new(Mutex::new(old.notifier(queue_event.try_clone().unwrap())));
    event_loop.add_subscriber(stale);
    old.stop();

    let new = WorkerThread::spawn(f.worker(&vq)).unwrap();
    vq.add_desc_chains(&read_chain(&f.memory, 0, 0, 2), 0)
        .unwrap();
    queue_event.write(1).unwrap();
    // Only the stale handler is watching yet.
    assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
    let fresh: SharedSubscriber =
        Arc::new(Mutex::new(new.notifier(queue_event.try_clone().unwrap())));
    event_loop.add_subscriber(fresh);
    assert_eq!(event_loop.run_with_timeout(1000).unwrap(), 1);
    wait_for("the request", || used_idx(&f.memory) == 1);
    assert_eq!(status(&f.memory, 0), request_status::OK);
    drop(new);
}

#[test]
fn a_stopped_worker_leaves_later_requests_alone() {
    let f = fixture();
    let vq = MockSplitQueue::new(&f.memory, QUEUE);
    let mut thread = WorkerThread::spawn(f.worker(&vq)).unwrap();
    let notifier = thread.notifier(EventFd::new(EFD_NONBLOCK).unwrap());
    thread.stop();
    vq.add_desc_chains(&read_chain(&f.memory, 0, 0, 1), 0)
        .unwrap();
    assert!(notifier.worker.send(Message::Kick).is_err());
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(used_idx(&f.memory), 0);
}
