//! The virtio-net device model the transport drives, and the event loop handler that runs it.
//!
//! Everything runs on the VMM thread's event loop, like vsock: the handler watches the two
//! queue notifications, a wake eventfd and the backend's descriptor (edge-triggered: readable,
//! and writable only while a frame waits for room), and each event runs one pass under the
//! device's lock (`rxtx`).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{Backend, Offloads};
use super::rxtx::{Core, Queues};
use super::{features, MacAddress, DEVICE_TYPE, LINK_UP, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::log_limit::warn_limited;
use crate::virtio::{
    features as ring_features, ActivateError, Activation, FeaturesError, LogLimiter, PauseError,
    SharedSubscriber, VirtioDevice,
};

pub use super::rxtx::NetStats;

/// Bytes of the configuration space Kiln fills: `mac`, `status`, `max_virtqueue_pairs`.
const CONFIG_SIZE: usize = 10;

/// A virtio-net device over a host [`Backend`].
#[derive(Debug)]
pub struct Net {
    name: String,
    mac: MacAddress,
    core: Arc<Mutex<Core>>,
    status: Arc<AtomicU16>,
    vnet_header: bool,
    queue_sizes: [u16; 2],
    /// Makes the handler run a pass (activation, resume, more work than one pass's budget).
    wake: Arc<EventFd>,
    stats: Arc<NetStats>,
    active: bool,
    warnings: LogLimiter,
}

impl Net {
    /// A NIC called `name` in log lines (`net0 (tap0)`), with address `mac`, on `backend`;
    /// the link is up.
    pub fn new(
        name: impl Into<String>,
        mac: MacAddress,
        backend: Box<dyn Backend>,
    ) -> std::io::Result<Self> {
        let name = name.into();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let status = Arc::new(AtomicU16::new(LINK_UP));
        let stats = Arc::new(NetStats::default());
        let vnet_header = backend.has_vnet_header();
        let core = Core::new(
            name.clone(),
            backend,
            status.clone(),
            wake.clone(),
            stats.clone(),
        );
        Ok(Self {
            name,
            mac,
            core: Arc::new(Mutex::new(core)),
            status,
            vnet_header,
            queue_sizes: [QUEUE_SIZE; 2],
            wake,
            stats,
            active: false,
            warnings: LogLimiter::new(),
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// Whether the link is up (false once the backend went away).
    pub fn link_up(&self) -> bool {
        self.status.load(Ordering::Acquire) & LINK_UP != 0
    }

    /// Frame and drop counters.
    pub fn stats(&self) -> &Arc<NetStats> {
        &self.stats
    }

    /// Runs one pass now, as the event handler would (tests drive the device with it).
    pub fn run_pass(&self) {
        self.core().run();
    }

    /// Sets the link state a snapshot saved: a link that was down stays down for the guest
    /// even though the backend was opened again.
    fn restore_link(&self, up: bool) {
        if !up {
            self.status.fetch_and(!LINK_UP, Ordering::AcqRel);
        }
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_handler(&self) {
        if let Err(err) = self.wake.write(1) {
            log::error!("{}: cannot wake the event handler: {err}", self.name);
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&self.status.load(Ordering::Acquire).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut offered = (1 << ring_features::RING_EVENT_IDX)
            | (1 << ring_features::RING_INDIRECT_DESC)
            | (1 << features::MAC)
            | (1 << features::STATUS)
            | (1 << features::MRG_RXBUF);
        if self.vnet_header {
            for bit in [
                features::CSUM,
                features::GUEST_CSUM,
                features::GUEST_TSO4,
                features::GUEST_TSO6,
                features::HOST_TSO4,
                features::HOST_TSO6,
            ] {
                offered |= 1 << bit;
            }
        }
        offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Without VIRTIO_NET_F_CTRL_MAC_ADDR the MAC is read-only in virtio 1.x.
        warn_limited!(
            self.warnings,
            "net",
            "{}: the driver wrote {} bytes at configuration offset {offset:#x}; the configuration is read-only",
            self.name,
            data.len()
        );
    }

    fn saved_state(&self) -> Vec<u8> {
        // The configuration space: MAC and link status.
        self.config_bytes().to_vec()
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.is_empty() {
            return Ok(());
        }
        if saved.len() != CONFIG_SIZE {
            return Err(format!(
                "{}: the snapshot's NIC state has {} bytes, not {CONFIG_SIZE}",
                self.name,
                saved.len()
            ));
        }
        if saved[..6] != self.mac.0 {
            return Err(format!(
                "{}: the snapshot's NIC had MAC {}, this one has {}",
                self.name,
                MacAddress(saved[..6].try_into().unwrap_or_default()),
                self.mac
            ));
        }
        // The backend was opened anew; a link the guest saw down stays down for it until it
        // resets the device.
        self.restore_link(u16::from_le_bytes([saved[6], saved[7]]) & LINK_UP != 0);
        Ok(())
    }

    fn check_features(&mut self, accepted: u64) -> Result<(), FeaturesError> {
        // virtio 1.2, 5.1.3.1: segmentation offloads need the matching checksum offload.
        let needs = [
            (features::HOST_TSO4, features::CSUM),
            (features::HOST_TSO6, features::CSUM),
            (features::GUEST_TSO4, features::GUEST_CSUM),
            (features::GUEST_TSO6, features::GUEST_CSUM),
        ];
        for (feature, required) in needs {
            if has(accepted, feature) && !has(accepted, required) {
                return Err(FeaturesError(format!(
                    "{}: feature bit {feature} was accepted without bit {required}, which it requires",
                    self.name
                )));
            }
        }
        Ok(())
    }

    fn activate(
        &mut self,
        activation: Activation,
    ) -> Result<Option<SharedSubscriber>, ActivateError> {
        self.reset();
        let Activation {
            memory,
            queues,
            queue_events,
            interrupt,
            features: accepted,
        } = activation;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady(RX_QUEUE));
        };
        for (index, queue) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        let mut core = self.core();
        if self.vnet_header {
            let offloads = Offloads {
                csum: has(accepted, features::GUEST_CSUM),
                tso4: has(accepted, features::GUEST_TSO4),
                tso6: has(accepted, features::GUEST_TSO6),
            };
            core.backend
                .set_offloads(offloads)
                .map_err(|e| ActivateError::Io("set the backend's offloads", e))?;
        }
        let handler = NetHandler::new(
            self.core.clone(),
            queue_events,
            core.backend.fd(),
            &self.wake,
        )
        .map_err(|e| ActivateError::Io("set up the virtio-net event handler", e))?;
        core.queues = Some(Queues {
            memory,
            rx,
            tx,
            interrupt,
            mergeable: has(accepted, features::MRG_RXBUF),
            guest_csum: has(accepted, features::GUEST_CSUM),
            host_tso4: has(accepted, features::HOST_TSO4),
            host_tso6: has(accepted, features::HOST_TSO6),
            broken: false,
        });
        drop(core);
        self.active = true;
        log::debug!("{}: activated (features {accepted:#x})", self.name);
        self.wake_handler();
        Ok(Some(Arc::new(Mutex::new(handler))))
    }

    fn reset(&mut self) {
        self.core().reset();
        if std::mem::take(&mut self.active) {
            log::debug!("{}: reset", self.name);
        }
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        // The handler runs under the same lock: once it is held, no pass is half done.
        let mut core = self.core();
        core.paused = true;
        Ok(core
            .queues
            .as_ref()
            .map(|queues| vec![queues.rx.state(), queues.tx.state()])
            .unwrap_or_default())
    }

    fn resume(&mut self) {
        self.core().paused = false;
        self.wake_handler();
    }
}

/// The event loop handler of an active device.
#[derive(Debug)]
pub struct NetHandler {
    core: Arc<Mutex<Core>>,
    queue_events: Vec<EventFd>,
    /// A duplicate of the backend's descriptor: every activation registers its own number, so
    /// a stale handler's removal never unregisters the next one's.
    backend: OwnedFd,
    watching_writable: bool,
    backend_watched: bool,
    wake: EventFd,
}

impl NetHandler {
    fn new(
        core: Arc<Mutex<Core>>,
        queue_events: Vec<EventFd>,
        backend_fd: RawFd,
        wake: &EventFd,
    ) -> std::io::Result<Self> {
        let backend = crate::virtio::duplicate_fd(backend_fd)?;
        Ok(Self {
            core,
            queue_events,
            backend,
            watching_writable: false,
            backend_watched: false,
            wake: wake.try_clone()?,
        })
    }

    fn backend_events(&self, writable: bool) -> Events {
        let mut set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if writable {
            set |= EventSet::OUT;
        }
        Events::new_raw(self.backend.as_raw_fd(), set)
    }
}

impl MutEventSubscriber for NetHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(queue_event) = self.queue_events.iter().find(|e| e.as_raw_fd() == fd) {
            // EAGAIN only means another pass already consumed it.
            let _ = queue_event.read();
        } else if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        }
        let mut core = self.core.lock().unwrap_or_else(|p| p.into_inner());
        core.run();
        let (gone, blocked) = (core.backend_gone, core.tx_blocked);
        drop(core);
        if gone && self.backend_watched {
            let _ = ops.remove(self.backend_events(self.watching_writable));
            self.backend_watched = false;
        } else if self.backend_watched && blocked != self.watching_writable {
            match ops.modify(self.backend_events(blocked)) {
                Ok(()) => self.watching_writable = blocked,
                Err(err) => log::error!("virtio-net: cannot change the backend's events: {err:?}"),
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in self
            .queue_events
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([self.wake.as_raw_fd()])
        {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-net: cannot watch descriptor {fd}: {err:?}");
            }
        }
        match ops.add(self.backend_events(false)) {
            Ok(()) => self.backend_watched = true,
            Err(err) => log::error!("virtio-net: cannot watch the backend: {err:?}"),
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
