//! virtio devices and the one transport they all use (virtio-mmio, virtio 1.x "modern" only).
//!
//! A device model implements [`VirtioDevice`]: what it is, what it offers, its configuration
//! space, and what it does once the driver has set it up ([`VirtioDevice::activate`]) or torn it
//! down ([`VirtioDevice::reset`]). [`mmio::MmioTransport`] wraps any such device and implements
//! the register file the guest driver talks to on the MMIO bus.
//!
//! Threads: vCPU threads run the transport synchronously on MMIO exits. Queue notifications
//! reach the VMM thread's event loop as ioeventfds (one [`EventFd`] per queue, which KVM
//! signals when the guest writes the queue's index to `QueueNotify`); interrupts leave through
//! [`Interrupt`], whose eventfd the VMM registers as a KVM irqfd. Activation happens on the vCPU
//! thread that wrote `DRIVER_OK`, so the subscriber a device hands back is added to the event
//! loop through its remote endpoint ([`EventLoopHandle`]).

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
mod spec_values_tests;
#[cfg(test)]
pub(crate) mod test_driver;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{MutEventSubscriber, RemoteEndpoint, SubscriberId, SubscriberOps};
use log::debug;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use kiln_arch::GuestMemoryMmap;

// The devices here name the limiter through this module.
use crate::log_limit;

pub(crate) use log_limit::LogLimiter;
use log_limit::{error_limited, SharedLogLimiter};

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    use virtio_bindings::virtio_config as config;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver is set up and the device is live.
    pub const DRIVER_OK: u32 = config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u32 = config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = config::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bit numbers that concern every device.
pub mod features {
    use virtio_bindings::{virtio_config, virtio_ring};

    /// The device is a virtio 1.x ("modern") device. Kiln's devices are nothing else.
    pub const VERSION_1: u32 = virtio_config::VIRTIO_F_VERSION_1;
    /// Descriptors may point at tables of further descriptors.
    pub const RING_INDIRECT_DESC: u32 = virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u32 = virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// `InterruptStatus` bit: the device used buffers in a queue.
pub const INTERRUPT_USED_RING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// `InterruptStatus` bit: the device configuration (or status) changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Largest queue the split-ring layout allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Takes the next available descriptor chain. `Err` means the available ring is corrupt (its
/// index ran more than the queue size ahead): nothing more can be taken from the queue until the
/// driver resets the device. (`QueueT::pop_descriptor_chain` would say `None` for both, and a
/// device that then asks again because the ring index moved would spin.)
pub fn next_chain<'a>(
    queue: &mut Queue,
    memory: &'a GuestMemoryMmap,
) -> Result<Option<virtio_queue::DescriptorChain<&'a GuestMemoryMmap>>, virtio_queue::Error> {
    use virtio_queue::QueueOwnedT;
    let mut available = queue.iter(memory)?;
    Ok(available.next())
}

/// The dirty-page bitmap slice that comes with every piece of Kiln's guest memory.
pub type GuestBitmap<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

/// An event subscriber that can be shared with the VMM thread's event loop.
///
/// The same type as `kiln_vmm::event_loop::SharedSubscriber`; it is spelled out here because
/// devices cannot depend on the VMM crate.
pub type SharedSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The remote endpoint of Kiln's event loop.
pub type EventLoopEndpoint = RemoteEndpoint<SharedSubscriber>;

/// Interrupt state shared between a transport (vCPU threads) and its device's workers.
///
/// The device raises interrupts by setting a bit in `InterruptStatus` and writing the irqfd; the
/// driver reads `InterruptStatus` and clears bits through `InterruptACK`.
#[derive(Debug)]
pub struct Interrupt {
    irq: EventFd,
    status: AtomicU32,
    config_generation: AtomicU32,
    needs_reset: AtomicBool,
    /// Interrupts are raised as often as the guest makes the device use buffers.
    raise_errors: SharedLogLimiter,
}

impl Interrupt {
    /// Wraps the eventfd the VMM connected to the device's interrupt line (a KVM irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            irq,
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            raise_errors: SharedLogLimiter::new(),
        }
    }

    /// Tells the driver that buffers were placed in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INTERRUPT_USED_RING);
    }

    /// Tells the driver that the device configuration changed (bumps `ConfigGeneration`).
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.raise(INTERRUPT_CONFIG_CHANGE);
    }

    /// Sets `DEVICE_NEEDS_RESET` in the device status without telling the driver (for errors
    /// found before `DRIVER_OK`).
    pub fn mark_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
    }

    /// Sets `DEVICE_NEEDS_RESET` and sends the configuration change notification the spec asks
    /// for once the device is live (virtio 1.2, 2.1.2).
    pub fn signal_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.raise(INTERRUPT_CONFIG_CHANGE);
        }
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// `InterruptACK`: clears the bits the driver handled.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The `ConfigGeneration` register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// The eventfd behind the interrupt line.
    pub fn eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// Sets the registers a snapshot saved.
    pub(crate) fn restore(&self, status: u32, config_generation: u32, needs_reset: bool) {
        self.status.store(status, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
    }

    /// Back to power-on state (device reset): no pending interrupt, no reset request.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(err) = self.irq.write(1) {
            // Only fails if the counter would overflow; the guest then has an interrupt
            // pending anyway.
            error_limited!(
                self.raise_errors,
                "virtio interrupt",
                "cannot signal a virtio interrupt: {err}"
            );
        }
    }
}

/// Everything a device needs to run once the driver has set it up.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory, for the queues and the buffers they point to.
    pub memory: GuestMemoryMmap,
    /// One queue per [`VirtioDevice::queue_max_sizes`] entry, validated against `memory`; the
    /// ones the driver did not enable are not ready.
    pub queues: Vec<Queue>,
    /// The queues' notification eventfds (the ioeventfds), in queue order.
    pub queue_events: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not enable a queue the device cannot work without.
    #[error("queue {0} was not set up by the driver")]
    QueueNotReady(usize),
    /// A host resource could not be set up.
    #[error("cannot {0}: {1}")]
    Io(&'static str, io::Error),
    /// The device's event handler could not be added to the event loop.
    #[error("cannot register with the event loop: {0:?}")]
    EventLoop(event_manager::Error),
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for a block device).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers. The transport adds `VERSION_1`.
    fn features(&self) -> u64;
    /// Maximum size of each queue (a power of two); the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device (the driver wrote `DRIVER_OK`). Returns the event handler the VMM
    /// thread's event loop should run for it, if any; it is removed again on reset.
    fn activate(
        &mut self,
        activation: Activation,
    ) -> Result<Option<SharedSubscriber>, ActivateError>;
    /// Stops the device and drops everything [`activate`](Self::activate) set up. Called on a
    /// driver reset, also when the device was never activated.
    fn reset(&mut self);
    /// Checks the features the driver accepted, when it sets `FEATURES_OK` (virtio 1.2,
    /// 3.1.1 step 5): an error refuses `FEATURES_OK`, so the driver sees the device cannot work
    /// with that set. The device must honour what was negotiated from here on.
    fn check_features(&mut self, features: u64) -> Result<(), FeaturesError> {
        let _ = features;
        Ok(())
    }
    /// Quiesces an active device: finishes the request in hand, takes nothing more from its
    /// queues until [`resume`](Self::resume), and hands back each queue's position. Called
    /// while no vCPU runs (the VM is paused), so the driver cannot add work meanwhile; queue
    /// notifications that arrive are kept for the resume.
    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        Ok(Vec::new())
    }
    /// Restarts queue processing after [`pause`](Self::pause), serving whatever was notified
    /// in between.
    fn resume(&mut self) {}
    /// State of its own the guest can observe and a snapshot must carry (a NIC's MAC and link
    /// state), beyond the transport's; empty for most devices.
    fn saved_state(&self) -> Vec<u8> {
        Vec::new()
    }
    /// Takes back what [`saved_state`](Self::saved_state) gave, on a device just created from
    /// the same config; an error names what does not fit.
    fn restore_state(&mut self, saved: &[u8]) -> Result<(), String> {
        let _ = saved;
        Ok(())
    }
}

/// The driver accepted a set of features the device cannot honour.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FeaturesError(pub String);

/// A device could not be quiesced.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The device's I/O thread is gone (it panicked or could not be reached).
    #[error("its I/O thread does not answer")]
    WorkerGone,
}

/// Adds and removes device event handlers on the VMM thread's event loop from any thread.
///
/// Requests travel through the loop's remote endpoint in order and never block the caller, so a
/// vCPU thread that holds a device lock cannot deadlock against an event handler waiting for the
/// same lock. Because the queue is ordered, a removal always finds the ID its addition stored.
#[derive(Clone)]
pub struct EventLoopHandle {
    endpoint: EventLoopEndpoint,
}

impl std::fmt::Debug for EventLoopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoopHandle").finish_non_exhaustive()
    }
}

/// A device event handler registered (or about to be) with the event loop.
#[derive(Debug)]
pub struct Subscription {
    id: Arc<Mutex<Option<SubscriberId>>>,
}

impl EventLoopHandle {
    /// Wraps the event loop's remote endpoint.
    pub fn new(endpoint: EventLoopEndpoint) -> Self {
        Self { endpoint }
    }

    /// Asks the loop to add `subscriber`; it starts watching its file descriptors as soon as the
    /// loop thread handles the request.
    pub fn subscribe(
        &self,
        subscriber: SharedSubscriber,
    ) -> Result<Subscription, event_manager::Error> {
        let id = Arc::new(Mutex::new(None));
        let slot = id.clone();
        self.endpoint.fire(
            move |ops: &mut dyn SubscriberOps<Subscriber = SharedSubscriber>| {
                let new_id = ops.add_subscriber(subscriber);
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(new_id);
            },
        )?;
        Ok(Subscription { id })
    }

    /// Asks the loop to remove a subscriber added by [`subscribe`](Self::subscribe).
    pub fn unsubscribe(&self, subscription: Subscription) {
        let slot = subscription.id;
        let fired = self.endpoint.fire(
            move |ops: &mut dyn SubscriberOps<Subscriber = SharedSubscriber>| {
                let id = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(id) = id {
                    if let Err(err) = ops.remove_subscriber(id) {
                        debug!("virtio event handler was already gone: {err:?}");
                    }
                }
            },
        );
        if let Err(err) = fired {
            // The loop is gone (the VM is shutting down): nothing is watched any more.
            debug!("cannot remove a virtio event handler: {err:?}");
        }
    }
}

/// A close-on-exec duplicate of `fd`, for an event handler that watches a descriptor its device
/// owns (the handler's registration must not depend on the device's lifetime).
pub(crate) fn duplicate_fd(fd: std::os::fd::RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor; the result is checked.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(duplicate) })
}

/// A driver's read of `data.len()` bytes at `offset` of a device's configuration space
/// `config`: the bytes there, zeros past its end (virtio-mmio reads never fail).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let len = available.len().min(data.len());
        data[..len].copy_from_slice(&available[..len]);
    }
}
