//! The VMM thread's event loop: console input, the guest's stop requests, stop signals.
//!
//! Devices that need their own file descriptors watched (virtio queues, backends) subscribe here
//! too; vCPU threads reach the loop through its remote endpoint.

use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use kiln_devices::legacy::serial::SerialDevice;

use crate::terminal::{EscapeFilter, Filtered};

/// A subscriber the loop can share with other threads.
pub type SharedSubscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;
/// Kiln's event manager.
pub type EventLoop = EventManager<SharedSubscriber>;

/// Watches the eventfds that end the VM (the guest's, through devices and vCPUs, and the
/// [`VmHandle`](crate::VmHandle)'s stop) and the one that only wakes the loop (a control
/// request is waiting).
pub struct StopWatcher {
    stop_fds: [RawFd; 2],
    wake_fd: RawFd,
    stopping: bool,
}

impl StopWatcher {
    /// Watches the eventfds; they must outlive the loop.
    pub fn new(guest_exit: &EventFd, stop: &EventFd, wake: &EventFd) -> Self {
        Self {
            stop_fds: [guest_exit.as_raw_fd(), stop.as_raw_fd()],
            wake_fd: wake.as_raw_fd(),
            stopping: false,
        }
    }

    /// True once a stop eventfd fired.
    pub fn stopping(&self) -> bool {
        self.stopping
    }
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer from an eventfd we watch; errors
        // (EAGAIN) are harmless.
        unsafe { libc::read(events.fd(), counter.as_mut_ptr().cast(), counter.len()) };
        if events.fd() != self.wake_fd {
            self.stopping = true;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in self.stop_fds.into_iter().chain([self.wake_fd]) {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch stop eventfd {fd}: {err:?}");
            }
        }
    }
}

/// Feeds bytes read from Kiln's stdin into the guest's serial port.
pub struct ConsoleInput {
    fd: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    /// Present on an interactive terminal: Ctrl-A x stops the VM.
    escape: Option<EscapeFilter>,
}

impl ConsoleInput {
    /// Reads from `fd` (normally 0) into `serial`. With `interactive`, Ctrl-A x stops the VM
    /// the way SIGINT does (pipes carry any byte, so they get no escape).
    pub fn new(fd: RawFd, serial: Arc<Mutex<SerialDevice>>, interactive: bool) -> Self {
        Self {
            fd,
            serial,
            escape: interactive.then(EscapeFilter::default),
        }
    }

    fn deliver(&mut self, bytes: &[u8]) {
        let filtered = match &mut self.escape {
            Some(escape) => escape.filter(bytes),
            None => Filtered {
                to_guest: bytes.to_vec(),
                quit: false,
            },
        };
        if !filtered.to_guest.is_empty() {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            serial.queue_input(&filtered.to_guest);
        }
        if filtered.quit {
            log::info!("Ctrl-A x: stopping the VM");
            // The same path as a Ctrl-C outside raw mode: the stop-signal handler records
            // SIGINT and wakes this loop.
            // SAFETY: raise(2) with a valid signal number; the handler is async-signal-safe.
            unsafe { libc::raise(libc::SIGINT) };
        }
    }

    fn stop_watching(&self, ops: &mut EventOps) {
        // Errors only mean it was never registered.
        let _ = ops.remove(Events::new_raw(self.fd, EventSet::IN));
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        // SAFETY: the descriptor is owned by the process for its lifetime (stdin), and File is
        // wrapped in ManuallyDrop so it is never closed here.
        let mut input = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(self.fd)
        });
        match input.read(&mut buf) {
            Ok(0) => {
                log::debug!("console input closed");
                self.stop_watching(ops);
            }
            Ok(n) => self.deliver(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                log::warn!("console input failed, no more input goes to the guest: {err}");
                self.stop_watching(ops);
            }
        }
        if events.event_set().contains(EventSet::HANG_UP) {
            self.stop_watching(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null: then there is simply no input.
        if let Err(err) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            log::debug!("console input not watched ({err:?}); the guest gets no input");
        }
    }
}
