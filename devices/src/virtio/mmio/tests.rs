use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::GuestAddress;

use super::*;
use crate::test_logger::capture_logs;
use crate::virtio::{
    ActivateError, FeaturesError, SharedSubscriber, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING,
};

const MEMORY_SIZE: usize = 0x10_0000;
const FEATURE_A: u64 = 1 << 3;
const FEATURE_HIGH: u64 = 1 << 40;

/// Counts the events of the first queue's eventfd while subscribed.
struct CountingSubscriber {
    event: EventFd,
    count: Arc<AtomicUsize>,
}

impl MutEventSubscriber for CountingSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new(&self.event, EventSet::IN)).unwrap();
    }
}

#[derive(Default)]
struct MockDevice {
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    config_writes: Vec<(u64, Vec<u8>)>,
    /// Per activation: which queues were ready, their sizes, the features.
    activations: Vec<(Vec<bool>, Vec<u16>, u64)>,
    resets: usize,
    require_queue_0: bool,
    /// Features `check_features` refuses.
    refused_features: u64,
    events: Arc<AtomicUsize>,
    interrupt: Option<Arc<Interrupt>>,
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        42
    }

    fn features(&self) -> u64 {
        FEATURE_A | FEATURE_HIGH | (1 << features::RING_EVENT_IDX)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.config_writes.push((offset, data.to_vec()));
    }

    fn activate(
        &mut self,
        activation: Activation,
    ) -> Result<Option<SharedSubscriber>, ActivateError> {
        if self.require_queue_0 && !activation.queues[0].ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.activations.push((
            activation.queues.iter().map(|q| q.ready()).collect(),
            activation.queues.iter().map(|q| q.size()).collect(),
            activation.features,
        ));
        self.interrupt = Some(activation.interrupt.clone());
        let event = activation.queue_events.into_iter().next().unwrap();
        Ok(Some(Arc::new(Mutex::new(CountingSubscriber {
            event,
            count: self.events.clone(),
        }))))
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn check_features(&mut self, features: u64) -> Result<(), FeaturesError> {
        if features & self.refused_features != 0 {
            return Err(FeaturesError("that combination is not supported".into()));
        }
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap()
}

fn transport_with(
    device: MockDevice,
    event_loop: Option<EventLoopHandle>,
) -> MmioTransport<MockDevice> {
    MmioTransport::new(
        device,
        memory(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        event_loop,
    )
    .unwrap()
}

fn transport() -> MmioTransport<MockDevice> {
    transport_with(
        MockDevice {
            queue_sizes: vec![16, 8],
            config: (0..16).collect(),
            ..Default::default()
        },
        None,
    )
}

fn read(t: &mut MmioTransport<MockDevice>, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport<MockDevice>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn write_features(t: &mut MmioTransport<MockDevice>, features: u64) {
    write(t, regs::DRIVER_FEATURES_SEL, 0);
    write(t, regs::DRIVER_FEATURES, features as u32);
    write(t, regs::DRIVER_FEATURES_SEL, 1);
    write(t, regs::DRIVER_FEATURES, (features >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
fn negotiate(t: &mut MmioTransport<MockDevice>, features: u64) -> u32 {
    write(t, regs::STATUS, status::ACKNOWLEDGE);
    write(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write_features(t, features);
    write(
        t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    read(t, regs::STATUS)
}

const VERSION_1: u64 = 1 << features::VERSION_1;
const NEGOTIATED: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
const LIVE: u32 = NEGOTIATED | status::DRIVER_OK;

/// Queue `index` at `base`: descriptors, then available ring, then used ring.
fn setup_queue(t: &mut MmioTransport<MockDevice>, index: u32, size: u32, base: u64) {
    let avail = base + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    write(t, regs::QUEUE_SEL, index);
    write(t, regs::QUEUE_NUM, size);
    for (low, value) in [
        (regs::QUEUE_DESC_LOW, base),
        (regs::QUEUE_AVAIL_LOW, avail),
        (regs::QUEUE_USED_LOW, used),
    ] {
        write(t, low, value as u32);
        write(t, low + 4, (value >> 32) as u32);
    }
    write(t, regs::QUEUE_READY, 1);
}

fn go_live(t: &mut MmioTransport<MockDevice>) {
    assert_eq!(negotiate(t, VERSION_1 | FEATURE_A), NEGOTIATED);
    setup_queue(t, 0, 16, 0x1000);
    write(t, regs::STATUS, LIVE);
}

#[test]
fn identifies_as_a_modern_virtio_mmio_device() {
    let mut t = transport();
    assert_eq!(read(&mut t, regs::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(&read(&mut t, regs::MAGIC_VALUE).to_le_bytes(), b"virt");
    assert_eq!(read(&mut t, regs::VERSION), 2);
    assert_eq!(read(&mut t, regs::DEVICE_ID), 42);
    assert_eq!(read(&mut t, regs::VENDOR_ID), VENDOR_ID);
    assert_eq!(read(&mut t, regs::STATUS), 0);
}

#[test]
fn device_features_are_offered_in_32_bit_words_with_version_1() {
    let mut t = transport();
    write(&mut t, regs::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        read(&mut t, regs::DEVICE_FEATURES),
        (FEATURE_A | (1 << features::RING_EVENT_IDX)) as u32
    );
    write(&mut t, regs::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read(&mut t, regs::DEVICE_FEATURES),
        ((FEATURE_HIGH | VERSION_1) >> 32) as u32
    );
    write(&mut t, regs::DEVICE_FEATURES_SEL, 2);
    assert_eq!(read(&mut t, regs::DEVICE_FEATURES), 0);
}

#[test]
fn driver_init_sequence_activates_the_device() {
    let mut t = transport();
    go_live(&mut t);
    assert_eq!(read(&mut t, regs::STATUS), LIVE);
    assert!(t.is_active());
    let device = t.device();
    assert_eq!(device.activations.len(), 1);
    let (ready, sizes, features) = &device.activations[0];
    assert_eq!(ready, &vec![true, false]);
    assert_eq!(sizes, &vec![16, 8]);
    assert_eq!(*features, VERSION_1 | FEATURE_A);
}

#[test]
fn features_ok_needs_version_1() {
    let mut t = transport();
    assert_eq!(
        negotiate(&mut t, FEATURE_A),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // The driver may fix its choice and try again.
    write_features(&mut t, FEATURE_A | VERSION_1);
    write(&mut t, regs::STATUS, NEGOTIATED);
    assert_eq!(read(&mut t, regs::STATUS), NEGOTIATED);
}

#[test]
fn features_ok_refuses_features_not_offered() {
    let mut t = transport();
    assert_eq!(
        negotiate(&mut t, VERSION_1 | (1 << 7)),
        status::ACKNOWLEDGE | status::DRIVER
    );
    let mut t = transport();
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write_features(&mut t, VERSION_1);
    write(&mut t, regs::DRIVER_FEATURES_SEL, 2);
    write(&mut t, regs::DRIVER_FEATURES, 1);
    write(&mut t, regs::STATUS, NEGOTIATED);
    assert_eq!(
        read(&mut t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
}

#[test]
fn driver_features_are_only_written_during_negotiation() {
    let mut t = transport();
    write_features(&mut t, VERSION_1 | FEATURE_A);
    assert_eq!(t.driver_features(), 0, "written before DRIVER");
    assert_eq!(negotiate(&mut t, VERSION_1), NEGOTIATED);
    write_features(&mut t, VERSION_1 | FEATURE_A);
    assert_eq!(t.driver_features(), VERSION_1, "written after FEATURES_OK");
}

#[test]
fn status_bits_must_come_in_order() {
    let mut t = transport();
    write(&mut t, regs::STATUS, status::DRIVER);
    assert_eq!(read(&mut t, regs::STATUS), 0);
    write(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER_OK,
    );
    assert_eq!(read(&mut t, regs::STATUS), status::ACKNOWLEDGE);
    assert!(!t.is_active());
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // Clearing a bit without a reset is refused.
    write(&mut t, regs::STATUS, status::DRIVER);
    assert_eq!(
        read(&mut t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // NEEDS_RESET is the device's bit, not the driver's.
    write(
        &mut t,
        regs::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::NEEDS_RESET,
    );
    assert_eq!(
        read(&mut t, regs::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // Several bits at once are taken in order.
    write_features(&mut t, VERSION_1);
    write(&mut t, regs::STATUS, LIVE);
    assert_eq!(read(&mut t, regs::STATUS), LIVE);
    assert!(t.is_active());
}

#[test]
fn failed_is_recorded() {
    let mut t = transport();
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::FAILED);
    assert_eq!(
        read(&mut t, regs::STATUS),
        status::ACKNOWLEDGE | status::FAILED
    );
    write(&mut t, regs::STATUS, 0);
    assert_eq!(read(&mut t, regs::STATUS), 0);
}

#[test]
fn queue_registers_describe_the_selected_queue() {
    let mut t = transport();
    assert_eq!(read(&mut t, regs::QUEUE_NUM_MAX), 16);
    write(&mut t, regs::QUEUE_SEL, 1);
    assert_eq!(read(&mut t, regs::QUEUE_NUM_MAX), 8);
    write(&mut t, regs::QUEUE_SEL, 2);
    assert_eq!(read(&mut t, regs::QUEUE_NUM_MAX), 0);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
    // Writes to a queue that does not exist change nothing.
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 2, 8, 0x1000);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
    assert!(!t.interrupt().needs_reset());
}

#[test]
fn queue_setup_before_features_ok_is_ignored() {
    let mut t = transport();
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    write(&mut t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    setup_queue(&mut t, 0, 16, 0x1000);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
}

#[test]
fn valid_queues_become_ready_and_are_locked_while_ready() {
    let mut t = transport();
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 1, 4, 0x4000);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 1);
    // A ready queue's registers cannot change under the device...
    write(&mut t, regs::QUEUE_NUM, 2);
    write(&mut t, regs::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(t.queues[1].size, 4);
    assert_eq!(t.queues[1].desc_table, 0x4000);
    // ...until the driver disables it.
    write(&mut t, regs::QUEUE_READY, 0);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
    write(&mut t, regs::QUEUE_NUM, 2);
    assert_eq!(t.queues[1].size, 2);
    assert!(!t.interrupt().needs_reset());
}

fn refused(size: u32, base: u64) -> MmioTransport<MockDevice> {
    let mut t = transport();
    negotiate(&mut t, VERSION_1);
    setup_queue(&mut t, 0, size, base);
    assert_eq!(
        read(&mut t, regs::QUEUE_READY),
        0,
        "size {size} at {base:#x}"
    );
    assert_ne!(read(&mut t, regs::STATUS) & status::NEEDS_RESET, 0);
    t
}

#[test]
fn invalid_queues_are_refused_and_ask_for_a_reset() {
    // Sizes: not a power of two, larger than the maximum, zero.
    refused(12, 0x1000);
    refused(32, 0x1000);
    refused(0, 0x1000);
    // Misaligned descriptor table.
    refused(16, 0x1008);
    // Rings outside guest memory: past its end, straddling it, above 4 GiB.
    refused(16, MEMORY_SIZE as u64);
    refused(16, MEMORY_SIZE as u64 - 0x100);
    refused(16, 1 << 32);
    // A device that needs a reset does not start.
    let mut t = refused(16, 1 << 40);
    write(&mut t, regs::STATUS, LIVE);
    assert!(!t.is_active());
    assert!(t.device().activations.is_empty());
}

#[test]
fn activation_failure_asks_for_a_reset_with_a_config_interrupt() {
    let mut t = transport_with(
        MockDevice {
            queue_sizes: vec![16],
            require_queue_0: true,
            ..Default::default()
        },
        None,
    );
    negotiate(&mut t, VERSION_1);
    write(&mut t, regs::STATUS, LIVE);
    assert!(!t.is_active());
    assert_eq!(read(&mut t, regs::STATUS), LIVE | status::NEEDS_RESET);
    assert_eq!(
        read(&mut t, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(t.interrupt().eventfd().read().unwrap(), 1);
    // The reset the driver then does clears it.
    write(&mut t, regs::STATUS, 0);
    assert_eq!(read(&mut t, regs::STATUS), 0);
    assert_eq!(read(&mut t, regs::INTERRUPT_STATUS), 0);
}

#[test]
fn reset_returns_to_power_on_state_and_the_device_can_start_again() {
    let mut t = transport();
    go_live(&mut t);
    write(&mut t, regs::QUEUE_SEL, 1);
    write(&mut t, regs::DEVICE_FEATURES_SEL, 1);
    t.device().interrupt.as_ref().unwrap().signal_used_queue();

    write(&mut t, regs::STATUS, 0);
    assert!(!t.is_active());
    assert_eq!(t.device().resets, 1);
    assert_eq!(read(&mut t, regs::STATUS), 0);
    assert_eq!(read(&mut t, regs::INTERRUPT_STATUS), 0);
    assert_eq!(t.driver_features(), 0);
    assert_eq!(
        read(&mut t, regs::DEVICE_FEATURES),
        FEATURE_A as u32 | (1 << 29)
    );
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0, "queue 0 selected again");
    assert_eq!(t.queues[0].size, 16);
    assert_eq!(t.queues[0].desc_table, 0);

    // A second driver (or the same one after a reload) brings it up with other settings.
    assert_eq!(negotiate(&mut t, VERSION_1), NEGOTIATED);
    setup_queue(&mut t, 0, 8, 0x2000);
    setup_queue(&mut t, 1, 8, 0x3000);
    write(&mut t, regs::STATUS, LIVE);
    assert!(t.is_active());
    let activations = &t.device().activations;
    assert_eq!(activations.len(), 2);
    assert_eq!(activations[1], (vec![true, true], vec![8, 8], VERSION_1));
}

#[test]
fn linux_driver_removal_sequence_is_quiet() {
    // virtio_blk's remove: reset the device, then disable each queue (vm_del_vq).
    let mut t = transport();
    go_live(&mut t);
    let ((), lines) = capture_logs(|| {
        write(&mut t, regs::STATUS, 0);
        write(&mut t, regs::QUEUE_SEL, 0);
        write(&mut t, regs::QUEUE_READY, 0);
    });
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
    assert_eq!(lines, [], "no log line for a legitimate sequence");
    // Disabling a live queue is not supported (no VIRTIO_F_RING_RESET): refused, and said so.
    go_live(&mut t);
    let ((), lines) = capture_logs(|| {
        write(&mut t, regs::QUEUE_SEL, 0);
        write(&mut t, regs::QUEUE_READY, 0);
    });
    assert_eq!(read(&mut t, regs::QUEUE_READY), 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].0, log::Level::Warn);
}

#[test]
fn interrupt_status_is_acknowledged_bit_by_bit() {
    let mut t = transport();
    go_live(&mut t);
    let interrupt = t.device().interrupt.clone().unwrap();
    assert_eq!(read(&mut t, regs::CONFIG_GENERATION), 0);
    interrupt.signal_used_queue();
    interrupt.signal_config_change();
    assert_eq!(
        read(&mut t, regs::INTERRUPT_STATUS),
        INTERRUPT_USED_RING | INTERRUPT_CONFIG_CHANGE
    );
    assert_eq!(read(&mut t, regs::CONFIG_GENERATION), 1);
    assert_eq!(t.interrupt().eventfd().read().unwrap(), 2);
    write(&mut t, regs::INTERRUPT_ACK, INTERRUPT_USED_RING);
    assert_eq!(
        read(&mut t, regs::INTERRUPT_STATUS),
        INTERRUPT_CONFIG_CHANGE
    );
    write(&mut t, regs::INTERRUPT_ACK, INTERRUPT_CONFIG_CHANGE);
    assert_eq!(read(&mut t, regs::INTERRUPT_STATUS), 0);
}

#[test]
fn configuration_space_goes_to_the_device() {
    let mut t = transport();
    let mut data = [0u8; 2];
    t.read(regs::CONFIG + 4, &mut data);
    assert_eq!(data, [4, 5]);
    let mut byte = [0u8; 1];
    t.read(regs::CONFIG + 15, &mut byte);
    assert_eq!(byte, [15]);
    t.write(regs::CONFIG + 2, &[9, 9, 9]);
    assert_eq!(t.device().config_writes, vec![(2, vec![9, 9, 9])]);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut t = transport();
    write(&mut t, regs::QUEUE_NOTIFY, 1);
    write(&mut t, regs::QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_events()[1].read().unwrap(), 2);
    assert!(t.queue_events()[0].read().is_err());
    // A queue that does not exist is ignored.
    write(&mut t, regs::QUEUE_NOTIFY, 7);
    assert!(t.queue_events()[0].read().is_err());
    assert!(t.queue_events()[1].read().is_err());
}

#[test]
fn register_accesses_that_are_not_32_bit_aligned_are_ignored() {
    let mut t = transport();
    t.write(regs::STATUS, &[status::ACKNOWLEDGE as u8]);
    t.write(regs::STATUS, &[status::ACKNOWLEDGE as u8, 0]);
    t.write(regs::STATUS + 1, &[1, 0, 0, 0]);
    assert_eq!(read(&mut t, regs::STATUS), 0);
    let mut data = [0xffu8; 2];
    t.read(regs::MAGIC_VALUE, &mut data);
    assert_eq!(data, [0, 0]);
    let mut data = [0xffu8; 4];
    t.read(regs::MAGIC_VALUE + 2, &mut data);
    assert_eq!(data, [0; 4]);
}

#[test]
fn legacy_registers_do_nothing() {
    let mut t = transport();
    negotiate(&mut t, VERSION_1);
    write(&mut t, regs::LEGACY_GUEST_PAGE_SIZE, 4096);
    write(&mut t, regs::LEGACY_QUEUE_ALIGN, 4096);
    write(&mut t, regs::LEGACY_QUEUE_PFN, 1);
    assert_eq!(read(&mut t, regs::LEGACY_QUEUE_PFN), 0);
    assert_eq!(read(&mut t, regs::QUEUE_READY), 0);
    assert_eq!(read(&mut t, regs::STATUS), NEGOTIATED);
}

#[test]
fn activation_subscribes_to_the_event_loop_and_reset_unsubscribes() {
    let mut event_loop = EventManager::<SharedSubscriber>::new().unwrap();
    let events = Arc::new(AtomicUsize::new(0));
    let mut t = transport_with(
        MockDevice {
            queue_sizes: vec![16],
            events: events.clone(),
            ..Default::default()
        },
        Some(EventLoopHandle::new(event_loop.remote_endpoint())),
    );
    // Nothing is watched before activation: the request sits in the channel.
    go_live(&mut t);
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
    write(&mut t, regs::QUEUE_NOTIFY, 0);
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
    assert_eq!(events.load(Ordering::SeqCst), 1);

    write(&mut t, regs::STATUS, 0);
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1); // the removal
    t.queue_events()[0].write(1).unwrap();
    assert_eq!(event_loop.run_with_timeout(50).unwrap(), 0);
    assert_eq!(events.load(Ordering::SeqCst), 1);

    // Activate again: watched again.
    go_live(&mut t);
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 1);
    assert_eq!(events.load(Ordering::SeqCst), 2);
}

#[test]
fn queue_sizes_must_be_powers_of_two() {
    let err = MmioTransport::new(
        MockDevice {
            queue_sizes: vec![16, 24],
            ..Default::default()
        },
        memory(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        None,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        TransportError::InvalidQueueSize {
            index: 1,
            size: 24,
            ..
        }
    ));
}

#[test]
fn features_ok_is_refused_when_the_device_cannot_honour_the_features() {
    let mut t = transport_with(
        MockDevice {
            queue_sizes: vec![16],
            refused_features: FEATURE_A,
            ..Default::default()
        },
        None,
    );
    let status = negotiate(&mut t, VERSION_1 | FEATURE_A);
    assert_eq!(status & status::FEATURES_OK, 0, "FEATURES_OK accepted");
    // Without the refused feature the same device accepts.
    write(&mut t, regs::STATUS, 0);
    assert_eq!(negotiate(&mut t, VERSION_1), NEGOTIATED);
}
