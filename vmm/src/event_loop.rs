//! The VMM thread's event loop: console input, the guest's stop requests, stop signals.
//!
//! Devices that need their own file descriptors watched (virtio queues, backends) subscribe here
//! too; vCPU threads reach the loop through its remote endpoint.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use kiln_devices::legacy::serial::SerialDevice;

use crate::host_fd::{self, FdKind};
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

/// How console input is read without ever waiting, whatever the descriptor's own mode.
enum InputSource {
    /// A private non-blocking description of the pipe or terminal (see [`crate::host_fd`]).
    Private(File),
    /// A socket, read with `MSG_DONTWAIT`.
    Socket(RawFd),
    /// The shared descriptor, read only when poll(2) says it is readable: the fallback when
    /// it cannot be reopened, and for regular files (which epoll refuses anyway).
    Polled(RawFd),
}

impl InputSource {
    fn new(fd: RawFd) -> Self {
        // SAFETY: the caller of `ConsoleInput::new` keeps `fd` open while the input lives.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        match host_fd::fd_kind(borrowed) {
            Ok(FdKind::Socket) => Self::Socket(fd),
            Ok(FdKind::Stream) => match host_fd::reopen_nonblocking(borrowed, false) {
                Ok(file) => Self::Private(file),
                Err(err) => {
                    log::debug!("console input: cannot reopen it ({err}); polling before reads");
                    Self::Polled(fd)
                }
            },
            Ok(FdKind::Storage) | Err(_) => Self::Polled(fd),
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Self::Private(file) => file.as_raw_fd(),
            Self::Socket(fd) | Self::Polled(fd) => *fd,
        }
    }

    /// One read that never waits: `WouldBlock` when there is nothing (a spurious wake-up).
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: the descriptor is open for as long as this source lives (see `new`).
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd()) };
        match self {
            Self::Private(_) => host_fd::read_fd(fd, buf),
            Self::Socket(_) => host_fd::recv_nowait(fd, buf),
            Self::Polled(_) => {
                if host_fd::poll_fd(fd, libc::POLLIN, Duration::ZERO)? {
                    host_fd::read_fd(fd, buf)
                } else {
                    Err(std::io::ErrorKind::WouldBlock.into())
                }
            }
        }
    }
}

/// Feeds bytes read from Kiln's stdin into the guest's serial port.
pub struct ConsoleInput {
    source: InputSource,
    serial: Arc<Mutex<SerialDevice>>,
    /// Present on an interactive terminal: Ctrl-A x stops the VM.
    escape: Option<EscapeFilter>,
}

impl ConsoleInput {
    /// Reads from `fd` (normally 0, which must stay open) into `serial`, never waiting for
    /// input. With `interactive`, Ctrl-A x stops the VM the way SIGINT does (pipes carry any
    /// byte, so they get no escape).
    pub fn new(fd: RawFd, serial: Arc<Mutex<SerialDevice>>, interactive: bool) -> Self {
        Self {
            source: InputSource::new(fd),
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
        let _ = ops.remove(Events::new_raw(self.source.fd(), EventSet::IN));
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 1024];
        let result = self.source.read(&mut buf);
        let got_bytes = matches!(result, Ok(n) if n > 0);
        match result {
            Ok(0) => {
                log::debug!("console input closed");
                self.stop_watching(ops);
            }
            Ok(n) => self.deliver(&buf[..n]),
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(err) => {
                log::warn!("console input failed, no more input goes to the guest: {err}");
                self.stop_watching(ops);
            }
        }
        // A pipe whose writer left still holds what it wrote: read on until it is empty.
        if events.event_set().contains(EventSet::HANG_UP) && !got_bytes {
            self.stop_watching(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null: then there is simply no input.
        if let Err(err) = ops.add(Events::new_raw(self.source.fd(), EventSet::IN)) {
            log::debug!("console input not watched ({err:?}); the guest gets no input");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::Instant;

    use event_manager::SubscriberOps;
    use kiln_devices::bus::BusDevice;
    use kiln_devices::legacy::serial::EventFdTrigger;

    use super::*;
    use crate::host_fd::tests::pipe;

    fn serial() -> Arc<Mutex<SerialDevice>> {
        let trigger = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        Arc::new(Mutex::new(SerialDevice::new(
            trigger,
            Box::new(std::io::sink()),
        )))
    }

    /// Reads the UART like a guest driver: data while the line status says data ready.
    fn guest_reads(serial: &Mutex<SerialDevice>) -> Vec<u8> {
        let mut serial = serial.lock().unwrap();
        let mut received = Vec::new();
        let mut byte = [0u8];
        loop {
            serial.read(5, &mut byte);
            if byte[0] & 1 == 0 {
                return received;
            }
            serial.read(0, &mut byte);
            received.push(byte[0]);
        }
    }

    /// `source.read` on another thread; a read that blocks fails the test instead of hanging it.
    fn read_within_a_second(source: InputSource) -> std::io::Result<usize> {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            let _ = done.send(source.read(&mut buf));
        });
        result
            .recv_timeout(Duration::from_secs(1))
            .expect("reading console input blocked")
    }

    #[test]
    fn a_spurious_wakeup_never_blocks_the_loop() {
        let (read, _write) = pipe();
        let source = InputSource::new(read.as_raw_fd());
        assert!(
            matches!(source, InputSource::Private(_)),
            "a pipe is reopened"
        );
        let err = read_within_a_second(source).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        // SAFETY: F_GETFL on a live descriptor.
        let flags = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "stdin's own flags are untouched"
        );

        // The fallback, for a descriptor that cannot be reopened, polls first.
        let err = read_within_a_second(InputSource::Polled(read.as_raw_fd())).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn piped_input_reaches_the_guest_whole_even_after_the_writer_left() {
        let (read, write) = pipe();
        let input: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::File::from(write).write_all(&input).unwrap();
        let serial = serial();
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            read.as_fd().as_raw_fd(),
            serial.clone(),
            false,
        ))));
        let mut received = Vec::new();
        let start = Instant::now();
        while received.len() < input.len() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "got {}",
                received.len()
            );
            event_loop.run_with_timeout(100).unwrap();
            received.extend(guest_reads(&serial));
        }
        assert_eq!(received, input);
        // At the end of the input (one more wake-up to see it) the loop stops watching it
        // rather than spinning on EOF.
        event_loop.run_with_timeout(50).unwrap();
        assert_eq!(event_loop.run_with_timeout(50).unwrap(), 0);
    }
}
