//! The virtio-mmio transport (virtio 1.2, 4.2.2), register layout version 2 only.
//!
//! [`MmioTransport`] sits on the MMIO bus and owns one [`VirtioDevice`]. It implements the
//! register file: identification, feature negotiation, the device status state machine, queue
//! setup, interrupt status/acknowledge and the device configuration space. Writing `DRIVER_OK`
//! activates the device; writing 0 to `Status` resets transport and device to power-on state so
//! that the guest driver can be unbound and bound again.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_arch::GuestMemoryMmap;

use super::log_limit::{debug_limited, error_limited, info_limited, warn_limited};
use super::{
    features, status, Activation, EventLoopHandle, Interrupt, LogLimiter, Subscription,
    VirtioDevice, MAX_QUEUE_SIZE,
};
use crate::bus::BusDevice;
use queue::{set_half, QueueRegisters};
pub use state::{MmioState, QueuePosition, QueueRegisterState, RestoreError, VirtioTransport};

mod queue;
pub mod regs;
mod state;

/// `MagicValue`: "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// `Version`: 2, the virtio 1.x register layout. Legacy (version 1) is not offered.
pub const VERSION: u32 = 2;
/// `VendorID`: "KILN" in little-endian.
pub const VENDOR_ID: u32 = 0x4e4c_494b;
/// Size of one virtio-mmio window (registers and configuration space).
pub const WINDOW_SIZE: u64 = 0x1000;

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A device declared a queue size the split ring does not allow.
    #[error("virtio device type {device_type} declares queue {index} of size {size}, which is not a power of two in 1..={MAX_QUEUE_SIZE}")]
    InvalidQueueSize {
        /// The device type.
        device_type: u32,
        /// Queue index.
        index: usize,
        /// The size declared.
        size: u16,
    },
    /// A queue eventfd could not be created.
    #[error("cannot create a virtio queue eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    memory: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    event_loop: Option<EventLoopHandle>,
    subscription: Option<Subscription>,
    active: bool,
    /// Quiesced by [`VirtioTransport::pause`]: the device processes nothing until resumed.
    paused: bool,
    /// The queue positions the device handed back when it was paused.
    paused_queues: Vec<QueuePosition>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// The driver set feature bits beyond the 64 any Kiln device offers.
    driver_features_unknown: bool,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    warnings: LogLimiter,
}

impl<D: VirtioDevice> std::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`. `irq` is the eventfd of its interrupt line; `event_loop` is where the
    /// device's event handler goes when it is activated (None: nothing watches its queues,
    /// which only makes sense in tests).
    pub fn new(
        device: D,
        memory: GuestMemoryMmap,
        irq: EventFd,
        event_loop: Option<EventLoopHandle>,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(TransportError::InvalidQueueSize {
                    device_type,
                    index,
                    size,
                });
            }
            queues.push(QueueRegisters::new(size));
            queue_events.push(EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_events,
            event_loop,
            subscription: None,
            active: false,
            paused: false,
            paused_queues: Vec::new(),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_unknown: false,
            queue_sel: 0,
            queues,
            warnings: LogLimiter::new(),
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, to change it; the VMM does so only while the VM is paused.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The queue notification eventfds, in queue order: the VMM registers each as an
    /// ioeventfd on `QueueNotify` with the queue index as datamatch.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device's interrupt (its eventfd is the irqfd).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Whether the device is running (the driver wrote `DRIVER_OK` and activation worked).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The `Status` register as the driver reads it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Features offered to the driver: the device's, plus `VERSION_1`.
    pub fn offered_features(&self) -> u64 {
        self.device.features() | (1 << features::VERSION_1)
    }

    /// Features the driver has written so far.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegisters> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get(index));
        match offset {
            regs::MAGIC_VALUE => MAGIC_VALUE,
            regs::VERSION => VERSION,
            regs::DEVICE_ID => self.device.device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            regs::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            regs::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status(),
            regs::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                debug_limited!(
                    self.warnings,
                    "virtio-mmio",
                    "virtio-mmio: read of write-only or unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            regs::DRIVER_FEATURES => self.write_driver_features(value),
            regs::QUEUE_SEL => self.queue_sel = value,
            regs::QUEUE_NUM
            | regs::QUEUE_READY
            | regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            regs::QUEUE_NOTIFY => self.notify_queue(value),
            regs::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            regs::STATUS => self.write_status(value),
            regs::LEGACY_GUEST_PAGE_SIZE | regs::LEGACY_QUEUE_ALIGN | regs::LEGACY_QUEUE_PFN => {
                warn_limited!(
                    self.warnings,
                    "virtio-mmio",
                    "virtio-mmio: the driver wrote legacy (version 1) register {offset:#x}; Kiln only offers version 2 devices"
                );
            }
            _ => warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: write of {value:#x} to read-only or unknown register {offset:#x} ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status != status::ACKNOWLEDGE | status::DRIVER {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: driver features written in device status {:#x}; ignored",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, false, value),
            1 => set_half(&mut self.driver_features, true, value),
            _ if value != 0 => self.driver_features_unknown = true,
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues are set up after feature negotiation and before the device goes live.
        let writable = self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK;
        let queue_sel = self.queue_sel;
        let memory = self.memory.clone();
        let Some(queue) = self.selected_queue().copied() else {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: write to register {offset:#x} of queue {queue_sel}, which does not exist"
            );
            return;
        };
        if offset == regs::QUEUE_READY && value == 0 && !queue.ready {
            // Linux disables each queue again after resetting the device (vm_del_vq): a no-op.
            return;
        }
        if !writable || (queue.ready && offset != regs::QUEUE_READY) {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: queue {queue_sel} register {offset:#x} written in device status {:#x} (queue ready: {}); ignored",
                self.status,
                queue.ready
            );
            return;
        }
        let mut updated = queue;
        match offset {
            regs::QUEUE_NUM => updated.size = u16::try_from(value).unwrap_or(0),
            regs::QUEUE_DESC_LOW => set_half(&mut updated.desc_table, false, value),
            regs::QUEUE_DESC_HIGH => set_half(&mut updated.desc_table, true, value),
            regs::QUEUE_AVAIL_LOW => set_half(&mut updated.avail_ring, false, value),
            regs::QUEUE_AVAIL_HIGH => set_half(&mut updated.avail_ring, true, value),
            regs::QUEUE_USED_LOW => set_half(&mut updated.used_ring, false, value),
            regs::QUEUE_USED_HIGH => set_half(&mut updated.used_ring, true, value),
            regs::QUEUE_READY if value == 0 => updated.ready = false,
            regs::QUEUE_READY => match queue.build(&memory, false) {
                Ok(_) => updated.ready = true,
                Err(err) => {
                    warn_limited!(
                        self.warnings,
                        "virtio-mmio",
                        "virtio-mmio: refusing queue {queue_sel} (size {}, descriptors {:#x}, available {:#x}, used {:#x}): {err}",
                        queue.size,
                        queue.desc_table,
                        queue.avail_ring,
                        queue.used_ring
                    );
                    self.interrupt.mark_needs_reset();
                }
            },
            _ => {}
        }
        if let Some(queue) = self.selected_queue() {
            *queue = updated;
        }
    }

    fn notify_queue(&mut self, value: u32) {
        // With the ioeventfd registered, KVM handles these writes itself; this is the path
        // for hosts (or tests) without it.
        match usize::try_from(value)
            .ok()
            .and_then(|index| self.queue_events.get(index))
        {
            Some(event) => {
                if let Err(err) = event.write(1) {
                    error_limited!(
                        self.warnings,
                        "virtio-mmio",
                        "virtio-mmio: cannot signal queue {value}: {err}"
                    );
                }
            }
            None => warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: notification for queue {value}, which does not exist"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & old != old {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: driver cleared status bits ({old:#x} -> {value:#x}) without a reset; ignored"
            );
            return;
        }
        if value & status::FAILED != 0 && old & status::FAILED == 0 {
            info_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: the guest driver gave up on virtio device type {}",
                self.device.device_type()
            );
            self.status |= status::FAILED;
        }
        // Bits in the order the driver must set them, each with its precondition.
        for bit in [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ] {
            if value & bit == 0 || self.status & bit != 0 {
                continue;
            }
            let accepted = match bit {
                status::ACKNOWLEDGE => true,
                status::DRIVER => self.status & status::ACKNOWLEDGE != 0,
                status::FEATURES_OK => {
                    self.status & status::DRIVER != 0
                        && self.features_acceptable()
                        && self.device_accepts_features()
                }
                _ => self.status & status::FEATURES_OK != 0,
            };
            if !accepted {
                warn_limited!(
                    self.warnings,
                    "virtio-mmio",
                    "virtio-mmio: status bit {bit:#x} refused in status {:#x} (driver features {:#x}, offered {:#x})",
                    self.status,
                    self.driver_features,
                    self.offered_features()
                );
                return;
            }
            self.status |= bit;
            if bit == status::DRIVER_OK {
                self.activate();
            }
        }
        let ignored = value & !(self.status | status::NEEDS_RESET);
        if ignored != 0 {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: unknown status bits {ignored:#x} ignored"
            );
        }
    }

    /// FEATURES_OK is refused unless the driver accepted VERSION_1 and nothing not offered.
    fn features_acceptable(&self) -> bool {
        !self.driver_features_unknown
            && self.driver_features & (1 << features::VERSION_1) != 0
            && self.driver_features & !self.offered_features() == 0
    }

    /// The device's own say on the negotiated features (e.g. a combination it cannot honour).
    fn device_accepts_features(&mut self) -> bool {
        match self.device.check_features(self.driver_features) {
            Ok(()) => true,
            Err(err) => {
                warn_limited!(
                    self.warnings,
                    "virtio-mmio",
                    "virtio-mmio: virtio device type {} refuses driver features {:#x}: {err}",
                    self.device.device_type(),
                    self.driver_features
                );
                false
            }
        }
    }

    fn activate(&mut self) {
        self.activate_at(&[]);
    }

    /// Activates the device with its queues at `positions` (a restored snapshot's; empty: the
    /// rings' start, as on a driver's `DRIVER_OK`).
    fn activate_at(&mut self, positions: &[QueuePosition]) {
        if self.interrupt.needs_reset() {
            log::warn!("virtio-mmio: not starting a device that needs a reset");
            return;
        }
        let event_idx = self.driver_features & (1 << features::RING_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, regs) in self.queues.iter().enumerate() {
            let queue = if regs.ready {
                match regs.build(&self.memory, event_idx) {
                    Ok(mut queue) => {
                        if let Some(position) = positions.get(index) {
                            queue.set_next_avail(position.next_avail);
                            queue.set_next_used(position.next_used);
                        }
                        queue
                    }
                    Err(err) => {
                        log::warn!("virtio-mmio: queue {index} became invalid: {err}");
                        self.interrupt.signal_needs_reset();
                        return;
                    }
                }
            } else {
                // Sizes were checked in new(), so this cannot fail; stay safe anyway.
                match Queue::new(regs.max_size) {
                    Ok(queue) => queue,
                    Err(err) => {
                        log::error!("virtio-mmio: queue {index}: {err}");
                        self.interrupt.signal_needs_reset();
                        return;
                    }
                }
            };
            queues.push(queue);
        }
        let mut queue_events = Vec::with_capacity(self.queue_events.len());
        for event in &self.queue_events {
            match event.try_clone() {
                Ok(event) => queue_events.push(event),
                Err(err) => {
                    log::error!("virtio-mmio: cannot clone a queue eventfd: {err}");
                    self.interrupt.signal_needs_reset();
                    return;
                }
            }
        }
        let activation = Activation {
            memory: self.memory.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            features: self.driver_features,
        };
        let subscriber = match self.device.activate(activation) {
            Ok(subscriber) => subscriber,
            Err(err) => {
                log::warn!(
                    "virtio-mmio: virtio device type {} could not start: {err}",
                    self.device.device_type()
                );
                self.device.reset();
                self.interrupt.signal_needs_reset();
                return;
            }
        };
        self.active = true;
        let (Some(subscriber), Some(event_loop)) = (subscriber, &self.event_loop) else {
            return;
        };
        match event_loop.subscribe(subscriber) {
            Ok(subscription) => self.subscription = Some(subscription),
            Err(err) => {
                log::error!(
                    "virtio-mmio: cannot add the device's event handler to the event loop: {err:?}"
                );
                self.device.reset();
                self.active = false;
                self.interrupt.signal_needs_reset();
            }
        }
    }

    /// Device reset: everything back to power-on state, the device stopped.
    fn reset(&mut self) {
        if let (Some(subscription), Some(event_loop)) = (self.subscription.take(), &self.event_loop)
        {
            event_loop.unsubscribe(subscription);
        }
        self.device.reset();
        self.active = false;
        self.paused = false;
        self.paused_queues.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_unknown = false;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        self.interrupt.reset();
        for event in &self.queue_events {
            // Drop notifications that were meant for the old queues (EAGAIN: there were none).
            let _ = event.read();
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            self.device.read_config(offset - regs::CONFIG, data);
            return;
        }
        // The driver MUST use 32-bit aligned accesses for the registers (4.2.2.2).
        if data.len() != 4 || !offset.is_multiple_of(4) {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: {}-byte read at register offset {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            self.device.write_config(offset - regs::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: {}-byte write at register offset {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            warn_limited!(
                self.warnings,
                "virtio-mmio",
                "virtio-mmio: unaligned write at register offset {offset:#x} ignored"
            );
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod log_tests;
#[cfg(test)]
mod tests;
