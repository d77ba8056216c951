//! Guest console output that never blocks a vCPU.
//!
//! The UART's writer runs on a vCPU thread, under the serial mutex that console input also
//! takes on the VMM thread. Writing to stdout there would let a reader that stops reading (a
//! paused pager, a full pipe, a stopped process) freeze the vCPU, then the event loop behind it,
//! and with it every way to stop the VM. So the writer ([`ConsoleWriter`]) only appends to a
//! bounded buffer, and the [`ConsoleDrain`], an event-loop subscriber on the VMM thread, writes
//! the buffer out without ever waiting: through a private non-blocking description for pipes
//! and terminals, with `MSG_DONTWAIT` for sockets, with plain writes for files. A reader that
//! does not keep up loses the oldest output, and the stream says where and how much
//! ([`dropped_note`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::config::ConsoleConfig;
use crate::host_fd::{self, FdKind, SharedNonBlocking};
use crate::Error;

/// Guest output held for a slow reader before the oldest bytes go.
pub const DEFAULT_CAPACITY: usize = 1 << 20;
/// The longest [`ConsoleDrain::finish`] spends writing out what is left when the VM ends.
pub const FINISH_DEADLINE: Duration = Duration::from_secs(1);
/// [`ConsoleDrain::finish`] gives up earlier when the reader takes nothing for this long.
pub const FINISH_STALL_LIMIT: Duration = Duration::from_millis(250);
/// Bytes the drain takes from the buffer at a time (what it holds beyond the buffer).
const CHUNK: usize = 64 * 1024;
/// Bytes written per wake-up before the drain lets the loop serve other events.
const BYTES_PER_WAKE: usize = 256 * 1024;
/// At most one warning about dropped output per interval.
const DROP_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// What the output stream shows where `count` bytes were dropped.
pub fn dropped_note(count: u64) -> String {
    format!("\r\n[kiln: {count} bytes of console output dropped: the reader is not keeping up]\r\n")
}

/// The two halves of the console output for `config`: the writer for the UART and the drain
/// for the event loop. A console file that cannot be created is an error naming it.
pub fn open(config: &ConsoleConfig) -> Result<(ConsoleWriter, ConsoleDrain), Error> {
    let sink = match config {
        ConsoleConfig::Stdio => Sink::for_fd(io::stdout().as_fd()),
        ConsoleConfig::None => Sink::Discard,
        ConsoleConfig::File(path) => {
            Sink::Storage(File::create(path).map_err(|source| Error::ConsoleFile {
                path: path.clone(),
                source,
            })?)
        }
    };
    channel(sink, DEFAULT_CAPACITY).map_err(|err| Error::Io("create the console eventfd", err))
}

/// Writer and drain around one buffer of `capacity` bytes.
fn channel(sink: Sink, capacity: usize) -> io::Result<(ConsoleWriter, ConsoleDrain)> {
    let shared = Arc::new(Shared {
        ring: Mutex::new(Ring::new(capacity)),
        wake: EventFd::new(libc::EFD_NONBLOCK)?,
    });
    let writer = ConsoleWriter {
        shared: shared.clone(),
    };
    let drain = ConsoleDrain {
        shared,
        sink,
        pending: Vec::new(),
        written: 0,
        waiting_for_writable: false,
        failed: false,
        delivered: 0,
        lost_to_errors: 0,
        dropped_warned: 0,
        last_drop_warning: None,
    };
    Ok((writer, drain))
}

/// Where the drain writes.
enum Sink {
    /// `--console none`.
    Discard,
    /// A regular file or block device: writes never wait for a reader.
    Storage(File),
    /// A pipe, terminal or character device, through a private non-blocking description.
    Stream(File),
    /// The same, when it could not be reopened: `O_NONBLOCK` on the shared description until
    /// the drain is dropped.
    SharedStream(SharedNonBlocking),
    /// A socket, written with `MSG_DONTWAIT`.
    Socket(OwnedFd),
}

impl Sink {
    /// The right way to write to `fd` (stdout) without waiting; guest output is discarded, with
    /// a warning, when `fd` is unusable.
    fn for_fd(fd: BorrowedFd<'_>) -> Sink {
        let sink = host_fd::fd_kind(fd).and_then(|kind| match kind {
            FdKind::Storage => fd
                .try_clone_to_owned()
                .map(|fd| Sink::Storage(File::from(fd))),
            FdKind::Socket => fd.try_clone_to_owned().map(Sink::Socket),
            FdKind::Stream => host_fd::reopen_nonblocking(fd, true)
                .map(Sink::Stream)
                .or_else(|err| {
                    log::debug!(
                        "console: cannot reopen the output ({err}); it is non-blocking until \
                         the VM ends"
                    );
                    SharedNonBlocking::new(fd).map(Sink::SharedStream)
                }),
        });
        sink.unwrap_or_else(|err| {
            log::warn!("console: cannot use the output ({err}); guest output is discarded");
            Sink::Discard
        })
    }

    /// One write that never waits; `WouldBlock` when the reader is behind.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Discard => Ok(buf.len()),
            Sink::Storage(file) => file.write(buf),
            Sink::Stream(file) => host_fd::write_fd(file.as_fd(), buf),
            Sink::SharedStream(shared) => host_fd::write_fd(shared.as_fd(), buf),
            Sink::Socket(fd) => host_fd::send_nowait(fd.as_fd(), buf),
        }
    }

    /// The descriptor that signals room again after `WouldBlock`.
    fn pollable(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Sink::Stream(file) => Some(file.as_fd()),
            Sink::SharedStream(shared) => Some(shared.as_fd()),
            Sink::Socket(fd) => Some(fd.as_fd()),
            Sink::Discard | Sink::Storage(_) => None,
        }
    }
}

/// The buffer between the vCPU threads and the drain.
struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes dropped just before the oldest byte held, not yet noted in the stream.
    gap: u64,
    /// Bytes dropped since the start.
    dropped_total: u64,
    /// The drain found nothing to write: the next byte must wake it.
    wake_on_data: bool,
    /// When a drop may wake the drain (to warn about it); `None` while a wake-up is pending.
    drop_wake_after: Option<Instant>,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            capacity: capacity.max(1),
            gap: 0,
            dropped_total: 0,
            wake_on_data: true,
            drop_wake_after: Some(Instant::now()),
        }
    }

    /// Appends `buf`, dropping the oldest bytes beyond the capacity; true when the drain must
    /// be woken.
    fn push(&mut self, buf: &[u8]) -> bool {
        let mut wake = false;
        let overflow = (self.bytes.len() + buf.len()).saturating_sub(self.capacity);
        let mut buf = buf;
        if overflow > 0 {
            let from_held = overflow.min(self.bytes.len());
            self.bytes.drain(..from_held);
            buf = &buf[overflow - from_held..];
            self.gap += overflow as u64;
            self.dropped_total += overflow as u64;
            if let Some(after) = self.drop_wake_after {
                if Instant::now() >= after {
                    self.drop_wake_after = None;
                    wake = true;
                }
            }
        }
        self.bytes.extend(buf);
        if self.wake_on_data && !buf.is_empty() {
            self.wake_on_data = false;
            wake = true;
        }
        wake
    }

    /// Moves up to `max` bytes into `out`, after the note for a gap before them; when there is
    /// nothing at all, asks the writer to wake the drain on the next byte.
    fn take(&mut self, out: &mut Vec<u8>, max: usize) {
        if self.gap > 0 {
            out.extend_from_slice(dropped_note(self.gap).as_bytes());
            self.gap = 0;
        }
        let count = max.min(self.bytes.len());
        let (front, back) = self.bytes.as_slices();
        let from_front = count.min(front.len());
        out.extend_from_slice(&front[..from_front]);
        out.extend_from_slice(&back[..count - from_front]);
        self.bytes.drain(..count);
        if out.is_empty() {
            self.wake_on_data = true;
        }
    }
}

struct Shared {
    ring: Mutex<Ring>,
    /// Wakes the drain.
    wake: EventFd,
}

impl Shared {
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake_drain(&self) {
        // Cannot fail in practice: a handful of wake-ups at most are ever outstanding, far
        // below the counter's limit, and the drain reads them before it writes anything.
        let _ = self.wake.write(1);
    }
}

/// The UART's output: appends guest bytes to the buffer and never blocks or fails. The drain
/// is woken only when the buffer stops being empty, not per byte.
pub struct ConsoleWriter {
    shared: Arc<Shared>,
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let wake = self.shared.ring().push(buf);
        if wake {
            self.shared.wake_drain();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        // The drain writes as soon as the loop runs; waiting for it here would block the vCPU.
        Ok(())
    }
}

/// What became of the guest's output, as [`ConsoleDrain::finish`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleTotals {
    /// Bytes written to the output (notes included).
    pub delivered: u64,
    /// Guest bytes dropped because the reader did not keep up.
    pub dropped: u64,
    /// Bytes still buffered when the finish deadline passed.
    pub unwritten: u64,
    /// Bytes discarded because the output failed (closed pipe, hung-up terminal).
    pub lost_to_errors: u64,
}

/// Why [`ConsoleDrain::pump`] stopped.
#[derive(Debug, PartialEq, Eq)]
enum Pump {
    /// Everything is written.
    Idle,
    /// The output is full; wait until it has room.
    WouldBlock,
    /// The budget for this wake-up is spent; more is waiting.
    BudgetSpent,
}

/// Writes the buffered output on the VMM thread's event loop, never waiting for the reader.
pub struct ConsoleDrain {
    shared: Arc<Shared>,
    sink: Sink,
    /// Taken from the buffer, written up to `written`.
    pending: Vec<u8>,
    written: usize,
    /// Interest in the sink's EPOLLOUT is registered.
    waiting_for_writable: bool,
    /// The output failed for good: everything is discarded (and counted) from now on.
    failed: bool,
    delivered: u64,
    lost_to_errors: u64,
    /// `dropped_total` at the last warning.
    dropped_warned: u64,
    last_drop_warning: Option<Instant>,
}

impl ConsoleDrain {
    /// Writes what is buffered until the output is full or `budget` bytes went out. An `Err`
    /// is a hard write error; the bytes it concerns are still pending.
    fn pump(&mut self, budget: usize) -> io::Result<Pump> {
        let mut moved = 0;
        loop {
            if self.written == self.pending.len() {
                self.pending.clear();
                self.written = 0;
                if moved >= budget {
                    return Ok(Pump::BudgetSpent);
                }
                self.shared.ring().take(&mut self.pending, CHUNK);
                if self.pending.is_empty() {
                    return Ok(Pump::Idle);
                }
            }
            let rest = &self.pending[self.written..];
            let result = if self.failed {
                self.lost_to_errors += rest.len() as u64;
                Ok(rest.len())
            } else {
                self.sink
                    .write(rest)
                    .inspect(|&n| self.delivered += n as u64)
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.written += n;
                    moved += n;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Pump::WouldBlock),
                Err(err) => return Err(err),
            }
        }
    }

    /// The output failed: say so once, discard from now on.
    fn give_up(&mut self, err: &io::Error) {
        log::warn!("console: cannot write guest output ({err}); discarding it from now on");
        self.failed = true;
        self.lost_to_errors += (self.pending.len() - self.written) as u64;
        self.written = self.pending.len();
    }

    fn wait_for_writable(&mut self, ops: &mut EventOps) {
        if self.waiting_for_writable {
            return;
        }
        let registered = match self.sink.pollable() {
            Some(fd) => ops
                .add(Events::new_raw(fd.as_raw_fd(), EventSet::OUT))
                .map_err(|err| io::Error::other(format!("cannot wait for room: {err:?}"))),
            None => Err(io::Error::other("a file that would block")),
        };
        match registered {
            Ok(()) => self.waiting_for_writable = true,
            Err(err) => self.give_up(&err),
        }
    }

    fn stop_waiting(&mut self, ops: &mut EventOps) {
        if !std::mem::take(&mut self.waiting_for_writable) {
            return;
        }
        if let Some(fd) = self.sink.pollable() {
            if let Err(err) = ops.remove(Events::new_raw(fd.as_raw_fd(), EventSet::OUT)) {
                log::debug!("console: cannot stop watching the output: {err:?}");
            }
        }
    }

    /// Warns about output dropped since the last warning, at most once per interval; re-arms
    /// the writer's wake-up for the next drop after the interval.
    fn warn_about_drops(&mut self) {
        let now = Instant::now();
        let mut ring = self.shared.ring();
        let due = self
            .last_drop_warning
            .is_none_or(|at| now.duration_since(at) >= DROP_WARNING_INTERVAL);
        if due && ring.dropped_total > self.dropped_warned {
            log::warn!(
                "console: the reader is not keeping up: {} bytes of guest output dropped, \
                 oldest first ({} in all)",
                ring.dropped_total - self.dropped_warned,
                ring.dropped_total
            );
            self.dropped_warned = ring.dropped_total;
            self.last_drop_warning = Some(now);
        }
        ring.drop_wake_after = Some(
            self.last_drop_warning
                .map_or(now, |at| at + DROP_WARNING_INTERVAL),
        );
    }

    /// Writes out what is left once the vCPUs stopped, for at most [`FINISH_DEADLINE`] (less
    /// when the reader takes nothing for [`FINISH_STALL_LIMIT`]), and logs what was lost.
    pub fn finish(&mut self) -> ConsoleTotals {
        self.finish_within(FINISH_DEADLINE, FINISH_STALL_LIMIT)
    }

    fn finish_within(&mut self, deadline: Duration, stall_limit: Duration) -> ConsoleTotals {
        let start = Instant::now();
        let mut last_progress = start;
        loop {
            let delivered_before = self.delivered;
            match self.pump(usize::MAX) {
                Ok(Pump::Idle) => break,
                Ok(Pump::BudgetSpent) => continue,
                Ok(Pump::WouldBlock) => {}
                Err(err) => {
                    self.give_up(&err);
                    continue;
                }
            }
            let now = Instant::now();
            if self.delivered != delivered_before {
                last_progress = now;
            }
            let wait = deadline
                .saturating_sub(now - start)
                .min(stall_limit.saturating_sub(now - last_progress));
            let Some(fd) = self.sink.pollable() else {
                break;
            };
            if wait.is_zero() {
                break;
            }
            if let Err(err) = host_fd::poll_fd(fd, libc::POLLOUT, wait) {
                if err.kind() != io::ErrorKind::Interrupted {
                    log::debug!("console: cannot wait for the output: {err}");
                    break;
                }
            }
        }
        let totals = {
            let ring = self.shared.ring();
            ConsoleTotals {
                delivered: self.delivered,
                dropped: ring.dropped_total,
                unwritten: (self.pending.len() - self.written + ring.bytes.len()) as u64,
                lost_to_errors: self.lost_to_errors,
            }
        };
        report(&totals, start.elapsed());
        totals
    }
}

/// Logs what did not reach the reader.
fn report(totals: &ConsoleTotals, waited: Duration) {
    if totals.dropped > 0 {
        log::warn!(
            "console: {} bytes of guest output were dropped because the reader did not keep up",
            totals.dropped
        );
    }
    if totals.unwritten > 0 {
        log::warn!(
            "console: {} bytes of guest output are lost: the reader took no more of them in \
             the {} ms after the VM ended",
            totals.unwritten,
            waited.as_millis()
        );
    }
    if totals.lost_to_errors > 0 {
        log::warn!(
            "console: {} bytes of guest output were discarded after the output failed",
            totals.lost_to_errors
        );
    }
}

impl MutEventSubscriber for ConsoleDrain {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let from_sink = events.fd() != self.shared.wake.as_raw_fd();
        if !from_sink {
            // Clears the level; EAGAIN only means another wake-up already did.
            let _ = self.shared.wake.read();
        }
        let outcome = match self.pump(BYTES_PER_WAKE) {
            Ok(outcome) => outcome,
            Err(err) => {
                self.stop_waiting(ops);
                self.give_up(&err);
                self.pump(BYTES_PER_WAKE).unwrap_or(Pump::Idle)
            }
        };
        match outcome {
            Pump::Idle => self.stop_waiting(ops),
            Pump::BudgetSpent => {
                // Come back after the loop served everyone else.
                self.stop_waiting(ops);
                self.shared.wake_drain();
            }
            Pump::WouldBlock
                if from_sink
                    && events
                        .event_set()
                        .intersects(EventSet::ERROR | EventSet::HANG_UP) =>
            {
                // An error or hang-up that still leaves writes pending would wake the loop
                // forever.
                self.stop_waiting(ops);
                self.give_up(&io::Error::other("the output reported an error or hang-up"));
                self.shared.wake_drain();
            }
            Pump::WouldBlock => self.wait_for_writable(ops),
        }
        self.warn_about_drops();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.shared.wake, EventSet::IN)) {
            log::error!(
                "console: cannot watch the output eventfd, guest output stays buffered: {err:?}"
            );
        }
    }
}

#[cfg(test)]
#[path = "console_output_tests.rs"]
mod tests;
