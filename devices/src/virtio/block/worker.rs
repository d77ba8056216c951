//! The per-disk I/O thread, and the event loop handler that wakes it.
//!
//! Disk I/O can take milliseconds (or seconds on a busy host); the VMM thread's event loop must
//! not wait for it. So each activated disk gets one thread that owns its queue: the ioeventfd
//! handler on the event loop only reads the eventfd and kicks the thread, which then drains the
//! queue, doing `pread`/`pwrite` directly between the image and guest memory, and raises the
//! interrupt (see docs/architecture.md for the measurements behind this choice).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use kiln_arch::GuestMemoryMmap;

use super::disk::DiskImage;
use super::request::{handle_chain, Outcome};
use crate::virtio::log_limit::warn_limited;
use crate::virtio::{Interrupt, LogLimiter};

/// Processes the requests of one queue.
#[derive(Debug)]
pub struct QueueWorker {
    queue: Queue,
    memory: GuestMemoryMmap,
    disk: Arc<DiskImage>,
    interrupt: Arc<Interrupt>,
    warnings: LogLimiter,
    /// The available ring is corrupt: nothing more is taken from it until the driver resets
    /// the device.
    broken: bool,
}

/// What one pass over the queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassStats {
    /// Chains returned to the driver through the used ring.
    pub completed: u32,
    /// Chains that got an error status (or none at all).
    pub failed: u32,
}

impl QueueWorker {
    /// A worker for `queue`, which must already be validated and ready.
    pub fn new(
        queue: Queue,
        memory: GuestMemoryMmap,
        disk: Arc<DiskImage>,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        Self {
            queue,
            memory,
            disk,
            interrupt,
            warnings: LogLimiter::new(),
            broken: false,
        }
    }

    /// The queue (tests look at its indices).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Whether the queue was given up on.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn what(&self) -> String {
        format!("virtio-blk '{}'", self.disk.path().display())
    }

    fn give_up(&mut self, reason: &dyn std::fmt::Display) {
        let what = self.what();
        warn_limited!(
            self.warnings,
            &what,
            "{what}: {reason}; the queue stops until the guest resets the device"
        );
        self.broken = true;
        self.interrupt.signal_needs_reset();
    }

    /// Handles every available request, then interrupts the driver if it wants to know.
    pub fn process_queue(&mut self) -> PassStats {
        let mut stats = PassStats::default();
        if self.broken {
            return stats;
        }
        loop {
            if let Err(err) = self.queue.disable_notification(&self.memory) {
                self.give_up(&err);
                break;
            }
            loop {
                let next = match self.queue.iter(&self.memory) {
                    Ok(mut available) => Ok(available.next()),
                    Err(err) => Err(err),
                };
                let chain = match next {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(err) => {
                        self.give_up(&err);
                        break;
                    }
                };
                let head = chain.head_index();
                let outcome = handle_chain(chain, &self.memory, &self.disk);
                let used_len = self.report(outcome, &mut stats);
                if head >= self.queue.size() {
                    // The driver put a descriptor index that does not exist in the available
                    // ring: there is nothing to give back. Other requests go on.
                    let what = self.what();
                    warn_limited!(
                        self.warnings,
                        &what,
                        "{what}: available ring entry names descriptor {head}, past the queue size {}",
                        self.queue.size()
                    );
                    self.interrupt.signal_needs_reset();
                    continue;
                }
                if let Err(err) = self.queue.add_used(&self.memory, head, used_len) {
                    self.give_up(&err);
                    break;
                }
                stats.completed += 1;
            }
            if self.broken {
                break;
            }
            match self.queue.enable_notification(&self.memory) {
                // More requests arrived while notifications were off.
                Ok(true) => continue,
                Ok(false) => break,
                Err(err) => {
                    self.give_up(&err);
                    break;
                }
            }
        }
        if stats.completed > 0 {
            match self.queue.needs_notification(&self.memory) {
                Ok(true) => self.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(err) => {
                    // Interrupt anyway: a spurious interrupt is harmless, a lost one hangs I/O.
                    self.interrupt.signal_used_queue();
                    self.give_up(&err);
                }
            }
        }
        stats
    }

    /// Logs a failed request and returns the used length for it.
    fn report(&mut self, outcome: Outcome, stats: &mut PassStats) -> u32 {
        let what = self.what();
        match outcome {
            Outcome::Completed {
                used_len, failure, ..
            } => {
                if let Some(failure) = failure {
                    stats.failed += 1;
                    warn_limited!(self.warnings, &what, "{what}: request failed: {failure}");
                }
                used_len
            }
            Outcome::Unanswerable(err) => {
                stats.failed += 1;
                warn_limited!(
                    self.warnings,
                    &what,
                    "{what}: malformed request returned unanswered: {err}"
                );
                self.interrupt.signal_needs_reset();
                0
            }
        }
    }
}

/// Messages from the event loop (and the device) to the worker thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Message {
    /// The driver notified the queue.
    Kick,
    /// The device is being reset: stop.
    Stop,
}

/// A running worker thread.
#[derive(Debug)]
pub struct WorkerThread {
    sender: Sender<Message>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerThread {
    /// Starts a thread running `worker`; it processes the queue once at start (the driver may
    /// have notified before the device went live) and again on every kick.
    pub fn spawn(worker: QueueWorker) -> std::io::Result<Self> {
        let (sender, receiver) = channel();
        let thread = std::thread::Builder::new()
            .name("kiln-blk".into())
            .spawn(move || run(worker, receiver))?;
        Ok(Self {
            sender,
            thread: Some(thread),
        })
    }

    /// The event loop handler that kicks this thread when `queue_event` fires.
    pub fn notifier(&self, queue_event: EventFd) -> QueueNotifier {
        QueueNotifier {
            queue_event,
            worker: self.sender.clone(),
        }
    }

    /// Stops the thread after the request it is working on and waits for it.
    pub fn stop(&mut self) {
        // The thread may already be gone; then there is nothing to stop.
        let _ = self.sender.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("virtio-blk worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(mut worker: QueueWorker, receiver: Receiver<Message>) {
    worker.process_queue();
    while let Ok(Message::Kick) = receiver.recv() {
        // Several notifications may be waiting: one pass serves them all.
        let mut stop = false;
        while let Ok(message) = receiver.try_recv() {
            if message == Message::Stop {
                stop = true;
                break;
            }
        }
        if stop {
            break;
        }
        worker.process_queue();
    }
}

/// Event loop subscriber for a queue's ioeventfd: hands the work to the worker thread.
#[derive(Debug)]
pub struct QueueNotifier {
    queue_event: EventFd,
    worker: Sender<Message>,
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Clear the eventfd; EAGAIN only means another handler already consumed it.
        let _ = self.queue_event.read();
        if self.worker.send(Message::Kick).is_err() {
            // The device was reset and this handler's removal is still on its way to the loop,
            // while the driver may already have brought the device up again: the notification
            // belongs to the next worker, whose handler watches the same eventfd. Put it back.
            if let Err(err) = self.queue_event.write(1) {
                log::error!("virtio-blk: cannot pass a queue notification on: {err}");
            }
            let _ = ops.remove(Events::new(&self.queue_event, EventSet::IN));
        } else if events
            .event_set()
            .intersects(EventSet::ERROR | EventSet::HANG_UP)
        {
            let _ = ops.remove(Events::new(&self.queue_event, EventSet::IN));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.queue_event, EventSet::IN)) {
            log::error!("virtio-blk: cannot watch the queue notification eventfd: {err:?}");
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
