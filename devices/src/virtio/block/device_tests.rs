//! The block device driven through the MMIO transport and a real event loop, the way a guest
//! driver and Kiln's VMM thread use it.

use std::time::{Duration, Instant};

use event_manager::EventManager;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_arch::GuestMemoryMmap;

use super::*;
use crate::bus::BusDevice;
use crate::virtio::block::test_utils::*;
use crate::virtio::block::{request_status, request_type};
use crate::virtio::mmio::{regs, MmioTransport, VirtioTransport};
use crate::virtio::{status, EventLoopHandle, INTERRUPT_USED_RING};

const QUEUE: u16 = 16;
const USED_RING: u64 = 0x8000;

fn read(t: &mut MmioTransport<Block>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport<Block>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn offered(t: &mut MmioTransport<Block>) -> u64 {
    write(t, regs::DEVICE_FEATURES_SEL, 0);
    let low = read(t, regs::DEVICE_FEATURES);
    write(t, regs::DEVICE_FEATURES_SEL, 1);
    u64::from(read(t, regs::DEVICE_FEATURES)) << 32 | u64::from(low)
}

/// What Linux's virtio-mmio and virtio-blk drivers do to bring the device up.
fn bring_up(t: &mut MmioTransport<Block>, vq: &MockSplitQueue<GuestMemoryMmap>) {
    bring_up_without(t, vq, 0);
}

/// [`bring_up`] with a driver that does not accept the `declined` features.
fn bring_up_without(
    t: &mut MmioTransport<Block>,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    declined: u64,
) {
    write(t, regs::STATUS, 0);
    write(t, regs::STATUS, status::ACKNOWLEDGE);
    write(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let features = offered(t) & !declined;
    write(t, regs::DRIVER_FEATURES_SEL, 0);
    write(t, regs::DRIVER_FEATURES, features as u32);
    write(t, regs::DRIVER_FEATURES_SEL, 1);
    write(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
    let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(t, regs::STATUS, negotiated);
    assert_eq!(read(t, regs::STATUS), negotiated);
    write(t, regs::QUEUE_SEL, 0);
    assert_eq!(read(t, regs::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE));
    write(t, regs::QUEUE_NUM, u32::from(QUEUE));
    write(t, regs::QUEUE_DESC_LOW, vq.desc_table_addr().0 as u32);
    write(t, regs::QUEUE_DESC_HIGH, 0);
    write(t, regs::QUEUE_AVAIL_LOW, vq.avail_addr().0 as u32);
    write(t, regs::QUEUE_AVAIL_HIGH, 0);
    write(t, regs::QUEUE_USED_LOW, USED_RING as u32);
    write(t, regs::QUEUE_USED_HIGH, 0);
    write(t, regs::QUEUE_READY, 1);
    write(t, regs::STATUS, negotiated | status::DRIVER_OK);
    assert_eq!(read(t, regs::STATUS), negotiated | status::DRIVER_OK);
}

fn used_idx(memory: &GuestMemoryMmap) -> u16 {
    memory.read_obj(GuestAddress(USED_RING + 2)).unwrap()
}

/// Runs the event loop until the used ring reaches `count`.
fn serve_until(
    event_loop: &mut EventManager<SharedSubscriber>,
    memory: &GuestMemoryMmap,
    count: u16,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(memory) != count {
        assert!(Instant::now() < deadline, "request {count} was not served");
        event_loop.run_with_timeout(5).unwrap();
    }
}

#[test]
fn configuration_space_reports_capacity_and_seg_max() {
    let image = TempImage::new("config", 3 * 1024 * 1024);
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let mut config = [0u8; 24];
    block.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 6144);
    assert_eq!(
        u32::from_le_bytes(config[12..16].try_into().unwrap()),
        SEG_MAX
    );
    let mut byte = [0xffu8; 1];
    block.read_config(1, &mut byte);
    assert_eq!(byte, [0x18]); // 6144 = 0x1800
    let mut beyond = [0xffu8; 4];
    block.read_config(60, &mut beyond);
    assert_eq!(beyond, [0; 4]);
    block.read_config(u64::MAX, &mut beyond);
    assert_eq!(beyond, [0; 4]);

    assert_eq!(block.features() & (1 << features::RO), 0);
    assert_ne!(block.features() & (1 << features::FLUSH), 0);
    drop(block);
    let readonly = Block::new(DiskImage::open(image.path(), true, None).unwrap()).unwrap();
    assert_ne!(readonly.features() & (1 << features::RO), 0);
}

#[test]
fn guest_requests_are_served_through_the_transport_and_event_loop() {
    let memory = guest_memory();
    let image = TempImage::new("e2e", 1024 * 1024);
    std::fs::write(image.path(), vec![0x3c; 1024 * 1024]).unwrap();
    let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();
    let block = Block::new(DiskImage::open(image.path(), false, Some("e2e")).unwrap()).unwrap();
    let mut t = MmioTransport::new(
        block,
        memory.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Some(EventLoopHandle::new(event_loop.remote_endpoint())),
    )
    .unwrap();
    let vq = MockSplitQueue::new(&memory, QUEUE);
    bring_up(&mut t, &vq);
    assert!(t.device().is_running());

    // A write, then a read of the same sector.
    write_header(&memory, HEADER, request_type::OUT, 100);
    memory
        .write_slice(&[0xa5; 1024], GuestAddress(DATA))
        .unwrap();
    vq.add_desc_chains(
        &linked(0, &[(HEADER, 16, 0), (DATA, 1024, 0), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 1);
    assert_eq!(
        memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        request_status::OK
    );
    let content = std::fs::read(image.path()).unwrap();
    assert_eq!(content[100 * 512..102 * 512], [0xa5; 1024]);
    assert_eq!(content[102 * 512], 0x3c);
    assert_ne!(
        read(&mut t, regs::INTERRUPT_STATUS) & INTERRUPT_USED_RING,
        0
    );
    write(&mut t, regs::INTERRUPT_ACK, INTERRUPT_USED_RING);

    write_header(&memory, HEADER + 16, request_type::IN, 101);
    vq.add_desc_chains(
        &linked(
            3,
            &[
                (HEADER + 16, 16, 0),
                (DATA + 0x1000, 512, WRITE),
                (STATUS + 1, 1, WRITE),
            ],
        ),
        3,
    )
    .unwrap();
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 2);
    let mut sector = [0u8; 512];
    memory
        .read_slice(&mut sector, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(sector, [0xa5; 512]);

    // The driver reloads: reset stops the I/O thread, a new bring-up starts a fresh one on
    // a fresh queue.
    write(&mut t, regs::STATUS, 0);
    assert!(!t.device().is_running());
    assert_eq!(read(&mut t, regs::STATUS), 0);
    // The new driver instance starts from fresh rings.
    memory
        .write_slice(&[0u8; 0x100], GuestAddress(USED_RING))
        .unwrap();
    let vq = MockSplitQueue::new(&memory, QUEUE);
    bring_up(&mut t, &vq);
    assert!(t.device().is_running());
    write_header(&memory, HEADER, request_type::GET_ID, 0);
    vq.add_desc_chains(
        &linked(0, &[(HEADER, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]),
        0,
    )
    .unwrap();
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 1);
    let mut id = [0u8; 20];
    memory.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..4], b"e2e\0");
}

#[test]
fn activation_without_a_ready_queue_fails_cleanly() {
    let memory = guest_memory();
    let image = TempImage::new("noqueue", 4096);
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let mut t =
        MmioTransport::new(block, memory, EventFd::new(EFD_NONBLOCK).unwrap(), None).unwrap();
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    write(&mut t, regs::DRIVER_FEATURES, 1);
    let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(&mut t, regs::STATUS, negotiated);
    write(&mut t, regs::STATUS, negotiated | status::DRIVER_OK);
    assert!(!t.is_active());
    assert!(!t.device().is_running());
    assert_ne!(read(&mut t, regs::STATUS) & status::NEEDS_RESET, 0);
}

/// A block device on a transport with an event loop, plus its image.
fn live_block(
    name: &str,
) -> (
    MmioTransport<Block>,
    EventManager<SharedSubscriber>,
    GuestMemoryMmap,
    TempImage,
) {
    let memory = guest_memory();
    let image = TempImage::new(name, 1024 * 1024);
    let event_loop = EventManager::<SharedSubscriber>::new().unwrap();
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let t = MmioTransport::new(
        block,
        memory.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Some(EventLoopHandle::new(event_loop.remote_endpoint())),
    )
    .unwrap();
    (t, event_loop, memory, image)
}

/// Queues a one-sector write at descriptor `head` (slot `slot` of the data/status areas).
fn queue_write(
    memory: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    head: u16,
    slot: u64,
) {
    write_header(memory, HEADER + 16 * slot, request_type::OUT, slot);
    vq.add_desc_chains(
        &linked(
            head,
            &[
                (HEADER + 16 * slot, 16, 0),
                (DATA + 0x1000 * slot, 512, 0),
                (STATUS + slot, 1, WRITE),
            ],
        ),
        head,
    )
    .unwrap();
}

#[test]
fn driver_resets_reuse_the_io_thread_created_with_the_device() {
    let (mut t, mut event_loop, memory, _image) = live_block("reuse");
    // The thread exists before the driver ever activates the device.
    let thread = t
        .device()
        .thread
        .thread_id()
        .expect("an I/O thread from the start");
    for round in 0..50 {
        memory
            .write_slice(&[0u8; 0x100], GuestAddress(USED_RING))
            .unwrap();
        let vq = MockSplitQueue::new(&memory, QUEUE);
        bring_up(&mut t, &vq);
        assert!(t.device().is_running(), "round {round}");
        queue_write(&memory, &vq, 0, 0);
        write(&mut t, regs::QUEUE_NOTIFY, 0);
        serve_until(&mut event_loop, &memory, 1);
        write(&mut t, regs::STATUS, 0);
        assert!(!t.device().is_running());
        assert_eq!(
            t.device().thread.thread_id(),
            Some(thread),
            "round {round}: a new thread"
        );
    }
}

#[test]
fn a_paused_device_hands_back_its_queue_and_serves_nothing_until_resumed() {
    let (mut t, mut event_loop, memory, _image) = live_block("pause");
    let vq = MockSplitQueue::new(&memory, QUEUE);
    bring_up(&mut t, &vq);
    queue_write(&memory, &vq, 0, 0);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 1);

    VirtioTransport::pause(&mut t).unwrap();
    let state = VirtioTransport::state(&t);
    assert!(state.paused && state.active);
    assert_eq!(state.queues.len(), 1);
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (1, 1)
    );

    // A request notified while paused waits: nothing is lost, nothing is served.
    queue_write(&memory, &vq, 3, 1);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    for _ in 0..20 {
        event_loop.run_with_timeout(5).unwrap();
    }
    assert_eq!(used_idx(&memory), 1, "a paused device served a request");

    VirtioTransport::resume(&mut t);
    assert!(!VirtioTransport::state(&t).paused);
    assert!(VirtioTransport::state(&t).queues.is_empty());
    serve_until(&mut event_loop, &memory, 2);
    assert_eq!(
        memory.read_obj::<u8>(GuestAddress(STATUS + 1)).unwrap(),
        request_status::OK
    );
}

#[test]
fn without_flush_negotiated_every_write_is_made_durable() {
    for (declined, durable_writes) in [(1 << features::FLUSH, true), (0, false)] {
        let (mut t, mut event_loop, memory, _image) = live_block("write-through");
        let vq = MockSplitQueue::new(&memory, QUEUE);
        bring_up_without(&mut t, &vq, declined);
        let before = t.device().disk().flush_count();
        for slot in 0..3u16 {
            queue_write(&memory, &vq, slot * 3, u64::from(slot));
            write(&mut t, regs::QUEUE_NOTIFY, 0);
            serve_until(&mut event_loop, &memory, slot + 1);
        }
        let flushes = t.device().disk().flush_count() - before;
        assert_eq!(
            flushes,
            if durable_writes { 3 } else { 0 },
            "FLUSH declined: {}",
            declined != 0
        );
    }
}

#[test]
fn a_replaced_image_serves_the_next_requests_and_reports_its_capacity() {
    let (mut t, mut event_loop, memory, old_image) = live_block("replace-old");
    let vq = MockSplitQueue::new(&memory, QUEUE);
    bring_up(&mut t, &vq);
    memory
        .write_slice(&[0x11u8; 512], GuestAddress(DATA))
        .unwrap();
    queue_write(&memory, &vq, 0, 0);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 1);

    let new_image = TempImage::new("replace-new", 2 * 1024 * 1024);
    VirtioTransport::pause(&mut t).unwrap();
    let replacement = DiskImage::open(new_image.path(), false, None).unwrap();
    let stats = t.device().disk().stats().clone();
    t.device_mut().replace_disk(replacement.with_stats(stats));
    VirtioTransport::resume(&mut t);
    // The old image is closed: its exclusive lock is free again.
    DiskImage::open(old_image.path(), false, None).expect("the old image is still locked");

    let mut capacity = [0u8; 8];
    t.read(regs::CONFIG, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 2 * 1024 * 1024 / 512);

    memory
        .write_slice(&[0x22u8; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    queue_write(&memory, &vq, 3, 1);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 2);
    let new_content = std::fs::read(new_image.path()).unwrap();
    assert_eq!(new_content[512..1024], [0x22u8; 512]);
    let old_content = std::fs::read(old_image.path()).unwrap();
    assert_eq!(old_content[..512], [0x11u8; 512]);
    assert_eq!(
        old_content[512..1024],
        [0u8; 512],
        "written to the old image"
    );
    assert_eq!(t.device().disk().stats().snapshot().write_count, 2);
}

#[test]
fn a_restored_transport_continues_the_queue_where_the_snapshot_left_it() {
    let (mut t, mut event_loop, memory, image) = live_block("restore");
    let vq = MockSplitQueue::new(&memory, QUEUE);
    bring_up(&mut t, &vq);
    queue_write(&memory, &vq, 0, 0);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    serve_until(&mut event_loop, &memory, 1);
    VirtioTransport::pause(&mut t).unwrap();
    let saved = VirtioTransport::state(&t);
    let features = t.driver_features();
    drop(t);

    // A new device on the same image and memory (as in a new process after a restore).
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let mut restored = MmioTransport::new(
        block,
        memory.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Some(EventLoopHandle::new(event_loop.remote_endpoint())),
    )
    .unwrap();
    restored.restore(&saved).unwrap();
    assert!(restored.is_active() && restored.is_paused());
    assert_eq!(restored.driver_features(), features);
    assert_eq!(read(&mut restored, regs::STATUS), saved.status);
    assert_eq!(VirtioTransport::state(&restored).queues, saved.queues);

    // A request made while the restored VM is still paused waits for the resume.
    queue_write(&memory, &vq, 3, 1);
    write(&mut restored, regs::QUEUE_NOTIFY, 0);
    for _ in 0..20 {
        event_loop.run_with_timeout(5).unwrap();
    }
    assert_eq!(
        used_idx(&memory),
        1,
        "a restored, paused device served a request"
    );
    VirtioTransport::resume(&mut restored);
    serve_until(&mut event_loop, &memory, 2);
    drop(restored);

    // A state of another device type or queue layout is refused.
    let mut other = saved.clone();
    other.device_type = 1;
    let block = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let mut fresh = MmioTransport::new(
        block,
        memory.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        None,
    )
    .unwrap();
    assert!(fresh.restore(&other).is_err());
    let mut outside = saved.clone();
    outside.queue_registers[0].desc_table = 1 << 40;
    assert!(matches!(
        fresh.restore(&outside),
        Err(crate::virtio::mmio::RestoreError::QueueOutsideMemory(0))
    ));
    // A driver that accepted a feature this device does not offer (bit 60, reserved) is refused.
    let mut unoffered = saved.clone();
    unoffered.driver_features |= 1 << 60;
    let err = fresh.restore(&unoffered).unwrap_err();
    assert!(
        matches!(err, crate::virtio::mmio::RestoreError::Features { missing, .. } if missing == 1 << 60),
        "{err}"
    );
}
