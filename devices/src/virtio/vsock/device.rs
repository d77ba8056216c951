//! The virtio-vsock device model the transport drives, and the event loop handler that runs it.
//!
//! Everything runs on the VMM thread's event loop (see docs/architecture.md for why): the
//! handler watches the three queue notifications, the muxer's epoll descriptor and a wake
//! eventfd, and each event runs one pass under the device's lock: drain socket readiness,
//! serve the host sockets, take the guest's packets (TX), fill the guest's receive buffers (RX).

use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_arch::GuestMemoryMmap;

use super::muxer::{Muxer, MuxerError, Timeouts, MAX_RX_BATCH};
use super::packet::{self, Header, VsockPacket, EVENT_SIZE, EVENT_TRANSPORT_RESET, MAX_PKT_DATA};
use super::{DEVICE_TYPE, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::log_limit::warn_limited;
use crate::virtio::{
    features as ring_features, next_chain, ActivateError, Activation, Interrupt, LogLimiter,
    PauseError, SharedSubscriber, VirtioDevice,
};

/// Packets moved per queue and pass before the handler lets other events of the loop run.
const PASS_BUDGET: u32 = 256;
/// Largest receive buffer Kiln accepts from the guest (it fills at most the guest's credit).
const MAX_RX_BUFFER: u32 = 1 << 20;

/// A virtio-vsock device whose host side is a Unix socket (Firecracker's hybrid vsock).
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    core: Arc<Mutex<Core>>,
    queue_sizes: [u16; 3],
    /// Makes the handler run a pass (activation, resume, more work than one pass's budget).
    wake: Arc<EventFd>,
    active: bool,
    warnings: LogLimiter,
}

/// The queues of an active device.
#[derive(Debug)]
struct Queues {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    event: Queue,
    interrupt: Arc<Interrupt>,
    /// A ring is corrupt: the device does nothing more until the driver resets it.
    broken: bool,
}

/// What the event handler and the device share.
#[derive(Debug)]
struct Core {
    muxer: Muxer,
    queues: Option<Queues>,
    paused_since: Option<Instant>,
    /// A `TRANSPORT_RESET` event waits for an event buffer.
    reset_event_pending: bool,
    /// Receive buffers taken per batch now (adapts between 1 and [`MAX_RX_BATCH`]).
    rx_batch: usize,
    /// The reset event was delivered and the guest has not yet handled it: the event queue's
    /// available index when it was taken. Linux's driver gives the buffer back (the index
    /// moves) only after it reset its sockets; nothing goes to the receive queue meanwhile
    /// (see reset_event.rs).
    reset_event_unhandled: Option<Wrapping<u16>>,
    wake: Arc<EventFd>,
    warnings: LogLimiter,
}

impl Vsock {
    /// A device for guest `guest_cid`, listening on the Unix socket `path` (which must not
    /// exist). Guest connections to host port P go to `PATH_P`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, MuxerError> {
        Self::with_timeouts(guest_cid, path, Timeouts::default())
    }

    /// [`new`](Self::new) with other time limits (tests).
    pub fn with_timeouts(
        guest_cid: u64,
        path: &Path,
        timeouts: Timeouts,
    ) -> Result<Self, MuxerError> {
        let muxer = Muxer::new(guest_cid, path, timeouts)?;
        let wake = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|e| MuxerError::Io("create an eventfd", e))?,
        );
        Ok(Self {
            guest_cid,
            core: Arc::new(Mutex::new(Core {
                muxer,
                queues: None,
                paused_since: None,
                reset_event_pending: false,
                rx_batch: 1,
                reset_event_unhandled: None,
                wake: wake.clone(),
                warnings: LogLimiter::new(),
            })),
            queue_sizes: [QUEUE_SIZE; 3],
            wake,
            active: false,
            warnings: LogLimiter::new(),
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> std::path::PathBuf {
        self.core().muxer.path().to_path_buf()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.core().muxer.connection_count()
    }

    /// Drops every connection and tells the guest with a `TRANSPORT_RESET` event (for example
    /// after the VM was restored elsewhere): its sockets see a reset. New connections reach
    /// the guest once it has handled the event, so the reset never catches them.
    pub fn reset_transport(&self) {
        let mut core = self.core();
        core.muxer.drop_all();
        core.reset_event_pending = true;
        core.reset_event_unhandled = None;
        drop(core);
        self.wake_handler();
    }

    /// Runs one pass now, as the event handler would (tests drive the device with it).
    pub fn run_pass(&self) {
        self.core().run();
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_handler(&self) {
        if let Err(err) = self.wake.write(1) {
            log::error!("vsock: cannot wake the event handler: {err}");
        }
    }
}

impl Core {
    /// One pass: everything that can move, moves, unless paused.
    fn run(&mut self) {
        self.muxer.poll_events();
        if self.paused_since.is_some() || self.queues.as_ref().is_none_or(|q| q.broken) {
            return;
        }
        let mut rx_used = 0;
        let mut tx_used = 0;
        let mut budget_left = true;
        loop {
            self.muxer.service_host();
            let taken = self.process_tx();
            let given = self.process_rx();
            tx_used += taken;
            rx_used += given;
            self.deliver_reset_event();
            if taken == 0 && given == 0 {
                break;
            }
            if tx_used >= PASS_BUDGET || rx_used >= PASS_BUDGET {
                budget_left = false;
                break;
            }
            self.muxer.poll_events();
        }
        if !budget_left {
            // Let the rest of the event loop run; come back at once.
            if let Err(err) = self.wake.write(1) {
                log::error!("vsock: cannot wake the event handler: {err}");
            }
        }
        let Some(queues) = &mut self.queues else {
            return;
        };
        // One interrupt for both queues: the device has a single interrupt line, and the
        // driver looks at every queue when it fires.
        let mut notify = false;
        for (queue, used) in [(&mut queues.rx, rx_used), (&mut queues.tx, tx_used)] {
            // A spurious interrupt is harmless, a lost one stalls the guest.
            if used > 0 && queue.needs_notification(&queues.memory).unwrap_or(true) {
                notify = true;
            }
        }
        if notify {
            queues.interrupt.signal_used_queue();
        }
    }

    /// Takes the guest's packets; returns how many.
    fn process_tx(&mut self) -> u32 {
        let Some(queues) = &mut self.queues else {
            return 0;
        };
        let Queues {
            memory,
            tx,
            interrupt,
            broken,
            ..
        } = queues;
        let mut taken = 0;
        loop {
            if let Err(err) = tx.disable_notification(memory) {
                warn_limited!(self.warnings, "vsock", "vsock: TX queue: {err}");
                return taken;
            }
            while taken < PASS_BUDGET && self.muxer.accepts_guest_packets() {
                let mut chain = match next_chain(tx, memory) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(err) => {
                        queues_broken(&mut self.warnings, interrupt, "TX", &err);
                        *broken = true;
                        return taken;
                    }
                };
                let head = chain.head_index();
                let raw = chain.clone();
                match VsockPacket::from_tx_virtq_chain(&*memory, &mut chain, MAX_PKT_DATA) {
                    Ok(packet) => {
                        let header = Header::of(&packet);
                        self.muxer.handle_guest_packet(&header, packet.data_slice());
                    }
                    Err(err) => {
                        let header = packet::raw_tx_header(memory, &raw);
                        warn_limited!(
                            self.warnings,
                            "vsock",
                            "vsock: malformed packet from the guest ({err}); {}",
                            if header.is_some() {
                                "its connection is reset"
                            } else {
                                "dropped"
                            }
                        );
                        if let Some(header) = header {
                            self.muxer.reject_malformed(&header);
                        }
                    }
                }
                if let Err(err) = tx.add_used(memory, head, 0) {
                    warn_limited!(self.warnings, "vsock", "vsock: TX queue: {err}");
                    return taken;
                }
                taken += 1;
            }
            if taken >= PASS_BUDGET || !self.muxer.accepts_guest_packets() {
                // Back soon (budget) or once receive buffers drained the resets.
                return taken;
            }
            match tx.enable_notification(memory) {
                Ok(true) => continue,
                Ok(false) => return taken,
                Err(err) => {
                    warn_limited!(self.warnings, "vsock", "vsock: TX queue: {err}");
                    return taken;
                }
            }
        }
    }

    /// Sends a pending `TRANSPORT_RESET` event if the guest gave an event buffer.
    fn deliver_reset_event(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let Some(queues) = &mut self.queues else {
            return;
        };
        let Queues {
            memory,
            event,
            interrupt,
            broken,
            ..
        } = queues;
        let chain = match next_chain(event, memory) {
            Ok(Some(chain)) => chain,
            Ok(None) => return,
            Err(err) => {
                queues_broken(&mut self.warnings, interrupt, "event", &err);
                *broken = true;
                return;
            }
        };
        let head = chain.head_index();
        let target = chain
            .writable()
            .next()
            .filter(|descriptor| descriptor.len() >= EVENT_SIZE);
        let used = match target {
            Some(descriptor) => {
                match memory.write_obj(EVENT_TRANSPORT_RESET.to_le(), descriptor.addr()) {
                    Ok(()) => {
                        self.reset_event_pending = false;
                        // Read before the guest can see the event (an unreadable ring: do not
                        // wait for it).
                        self.reset_event_unhandled = event
                            .avail_idx(&*memory, std::sync::atomic::Ordering::Acquire)
                            .ok();
                        if let Some(index) = self.reset_event_unhandled {
                            reset_event::ask_for_notification_after(event, memory, index);
                        }
                        EVENT_SIZE
                    }
                    Err(_) => 0,
                }
            }
            None => 0,
        };
        if used == 0 {
            warn_limited!(
                self.warnings,
                "vsock",
                "vsock: an event buffer from the guest cannot hold an event; returned empty"
            );
        }
        if event.add_used(&*memory, head, used).is_ok() {
            interrupt.signal_used_queue();
        }
    }
}

/// A corrupt ring: logged, and the driver is told the device needs a reset.
fn queues_broken(
    warnings: &mut LogLimiter,
    interrupt: &Interrupt,
    queue: &str,
    err: &virtio_queue::Error,
) {
    warn_limited!(
        warnings,
        "vsock",
        "vsock: {queue} queue: {err}; the device stops until the guest resets it"
    );
    interrupt.signal_needs_reset();
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        1 << ring_features::RING_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        crate::virtio::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_limited!(
            self.warnings,
            "vsock",
            "vsock: the driver wrote {} bytes at configuration offset {offset:#x}; the configuration is read-only",
            data.len()
        );
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
            ..
        } = activation;
        let mut queues = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueNotReady(RX_QUEUE));
        };
        for (index, queue) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx), (EVENT_QUEUE, &event)] {
            if !queue.ready() {
                return Err(ActivateError::QueueNotReady(index));
            }
        }
        let epoll_fd = self.core().muxer.epoll_fd();
        let handler = VsockHandler::new(self.core.clone(), queue_events, epoll_fd, &self.wake)
            .map_err(|e| ActivateError::Io("set up the vsock event handler", e))?;
        self.core().queues = Some(Queues {
            memory,
            rx,
            tx,
            event,
            interrupt,
            broken: false,
        });
        self.active = true;
        log::debug!("vsock (guest CID {}): activated", self.guest_cid);
        // The driver may have given buffers, and host clients may be waiting: run a pass.
        self.wake_handler();
        Ok(Some(Arc::new(Mutex::new(handler))))
    }

    fn reset(&mut self) {
        let mut core = self.core();
        core.queues = None;
        core.paused_since = None;
        core.reset_event_pending = false;
        core.reset_event_unhandled = None;
        core.muxer.drop_all();
        drop(core);
        if std::mem::take(&mut self.active) {
            log::debug!("vsock (guest CID {}): reset", self.guest_cid);
        }
    }

    fn saved_state(&self) -> Vec<u8> {
        reset_event::saved_state(&self.core().muxer)
    }

    fn restore_state(&mut self, saved: &[u8]) -> Result<(), String> {
        reset_event::restore_state(&mut self.core().muxer, saved)
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        // The handler runs under the same lock: once it is held, no pass is half done, and
        // passes started later move nothing until resume.
        let mut core = self.core();
        core.paused_since.get_or_insert_with(Instant::now);
        Ok(core
            .queues
            .as_ref()
            .map(|queues| vec![queues.rx.state(), queues.tx.state(), queues.event.state()])
            .unwrap_or_default())
    }

    fn resume(&mut self) {
        let mut core = self.core();
        if let Some(since) = core.paused_since.take() {
            core.muxer.postpone_deadlines(since.elapsed());
        }
        drop(core);
        // Serve what arrived meanwhile.
        self.wake_handler();
    }
}

/// The event loop handler of an active device.
#[derive(Debug)]
pub struct VsockHandler {
    core: Arc<Mutex<Core>>,
    queue_events: Vec<EventFd>,
    /// A duplicate of the muxer's epoll descriptor: every activation registers its own number,
    /// so a stale handler's removal never unregisters the next one's.
    epoll: OwnedFd,
    wake: EventFd,
}

impl VsockHandler {
    fn new(
        core: Arc<Mutex<Core>>,
        queue_events: Vec<EventFd>,
        epoll_fd: RawFd,
        wake: &EventFd,
    ) -> std::io::Result<Self> {
        let epoll = crate::virtio::duplicate_fd(epoll_fd)?;
        Ok(Self {
            core,
            queue_events,
            epoll,
            wake: wake.try_clone()?,
        })
    }
}

impl MutEventSubscriber for VsockHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(queue_event) = self.queue_events.iter().find(|e| e.as_raw_fd() == fd) {
            // EAGAIN only means another pass already consumed it.
            let _ = queue_event.read();
        } else if fd == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        }
        if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
            && fd != self.epoll.as_raw_fd()
        {
            let _ = ops.remove(events);
        }
        self.core.lock().unwrap_or_else(|p| p.into_inner()).run();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = self
            .queue_events
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain([self.epoll.as_raw_fd(), self.wake.as_raw_fd()]);
        for fd in fds {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("vsock: cannot watch descriptor {fd}: {err:?}");
            }
        }
    }
}

#[path = "reset_event.rs"]
mod reset_event;
#[path = "device_rx.rs"]
mod rx;

#[cfg(test)]
#[path = "bad_input_tests.rs"]
mod bad_input_tests;
#[cfg(test)]
#[path = "reset_tests.rs"]
mod reset_tests;
#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
