//! The per-disk I/O thread, and the event loop handler that wakes it.
//!
//! Disk I/O can take milliseconds (or seconds on a busy host); the VMM thread's event loop must
//! not wait for it. So each activated disk gets one thread that owns its queue: the ioeventfd
//! handler on the event loop only reads the eventfd and kicks the thread, which then drains the
//! queue, doing `pread`/`pwrite` directly between the image and guest memory, and raises the
//! interrupt (see docs/architecture.md for the measurements behind this choice).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use kiln_arch::GuestMemoryMmap;

use super::disk::DiskImage;
use super::request::{handle_chain, Outcome};
use crate::virtio::log_limit::warn_limited;
use crate::virtio::{Interrupt, LogLimiter, PauseError};

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
enum Message {
    /// The device was activated: serve this queue.
    Activate(Box<QueueWorker>),
    /// The driver notified the queue.
    Kick,
    /// Quiesce: finish the pass in hand, take nothing more until `Resume`, answer with the
    /// queue's position (None when no queue is being served).
    Pause(Sender<Option<QueueState>>),
    /// Serve the queue again, including whatever was notified while paused.
    Resume,
    /// The device was reset: drop the queue, stay parked; answers once done.
    Deactivate(Sender<()>),
    /// Serve the queue from this image from now on; answers once the old one is let go.
    ReplaceDisk(Arc<DiskImage>, Sender<()>),
    /// The device is going away: end the thread.
    Shutdown,
}

/// A disk's I/O thread. It is created with the device, when the VM is built, and parks until
/// the driver activates the device: a guest that resets its driver in a loop never makes Kiln
/// create threads, and no thread is created on a vCPU thread.
#[derive(Debug)]
pub struct WorkerThread {
    sender: Sender<Message>,
    /// Set by the notifier when it sent a kick the thread has not picked up yet: one pass
    /// serves any number of notifications, so later ones send nothing.
    kick_pending: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Message::Activate(_) => "Activate",
            Message::Kick => "Kick",
            Message::Pause(_) => "Pause",
            Message::Resume => "Resume",
            Message::Deactivate(_) => "Deactivate",
            Message::ReplaceDisk(..) => "ReplaceDisk",
            Message::Shutdown => "Shutdown",
        })
    }
}

impl WorkerThread {
    /// Starts a parked thread, with no queue to serve yet.
    pub fn parked() -> std::io::Result<Self> {
        let (sender, receiver) = channel();
        let kick_pending = Arc::new(AtomicBool::new(false));
        let pending = kick_pending.clone();
        let thread = std::thread::Builder::new()
            .name("kiln-blk".into())
            .spawn(move || run(receiver, &pending))?;
        Ok(Self {
            sender,
            kick_pending,
            thread: Some(thread),
        })
    }

    /// Starts a thread already serving `worker` (tests and benchmarks).
    pub fn spawn(worker: QueueWorker) -> std::io::Result<Self> {
        let thread = Self::parked()?;
        thread.activate(worker);
        Ok(thread)
    }

    /// Hands the thread its queue; it processes the queue once at once (the driver may have
    /// notified before the device went live) and again on every kick.
    pub fn activate(&self, worker: QueueWorker) {
        if self
            .sender
            .send(Message::Activate(Box::new(worker)))
            .is_err()
        {
            log::error!("virtio-blk: the I/O thread is gone; the disk will not answer");
        }
    }

    /// Drops the queue (device reset) and waits until the thread no longer touches it.
    pub fn deactivate(&self) {
        let (reply, answer) = channel();
        if self.sender.send(Message::Deactivate(reply)).is_ok() {
            // An error means the thread is gone, which also leaves the queue alone.
            let _ = answer.recv();
        }
    }

    /// Makes the thread serve its queue from `disk`; returns once it no longer uses the old
    /// image (between requests: pause the thread first).
    pub fn replace_disk(&self, disk: Arc<DiskImage>) {
        let (reply, answer) = channel();
        if self.sender.send(Message::ReplaceDisk(disk, reply)).is_ok() {
            // An error means the thread is gone, which also leaves the old image alone.
            let _ = answer.recv();
        }
    }

    /// Quiesces the thread: returns once it is between requests and will start no more until
    /// [`resume`](Self::resume); hands back the queue's position if it serves one.
    pub fn pause(&self) -> Result<Option<QueueState>, PauseError> {
        let (reply, answer) = channel();
        self.sender
            .send(Message::Pause(reply))
            .map_err(|_| PauseError::WorkerGone)?;
        answer.recv().map_err(|_| PauseError::WorkerGone)
    }

    /// Lets a paused thread serve its queue again.
    pub fn resume(&self) {
        if self.sender.send(Message::Resume).is_err() {
            log::error!("virtio-blk: the I/O thread is gone; the disk will not answer");
        }
    }

    /// The event loop handler that kicks this thread when `queue_event` fires.
    pub fn notifier(&self, queue_event: EventFd) -> QueueNotifier {
        QueueNotifier {
            queue_event,
            worker: self.sender.clone(),
            kick_pending: self.kick_pending.clone(),
        }
    }

    /// The OS thread's identity (tests check that resets reuse it).
    #[cfg(test)]
    pub(crate) fn thread_id(&self) -> Option<std::thread::ThreadId> {
        self.thread.as_ref().map(|thread| thread.thread().id())
    }

    /// Ends the thread after the request it is working on and waits for it.
    pub fn stop(&mut self) {
        // The thread may already be gone; then there is nothing to stop.
        let _ = self.sender.send(Message::Shutdown);
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

fn run(receiver: Receiver<Message>, kick_pending: &AtomicBool) {
    let mut worker: Option<Box<QueueWorker>> = None;
    let mut paused = false;
    // A kick arrived while paused: serve it on resume.
    let mut deferred = false;
    while let Ok(message) = receiver.recv() {
        match message {
            Message::Activate(new) => {
                let worker = worker.insert(new);
                // Activated while paused (a snapshot restore): serve the queue on resume.
                deferred = paused;
                if !paused {
                    worker.process_queue();
                }
            }
            Message::Kick => {
                kick_pending.store(false, Ordering::Release);
                match (&mut worker, paused) {
                    (Some(_), true) => deferred = true,
                    (Some(worker), false) => {
                        worker.process_queue();
                    }
                    (None, _) => {}
                }
            }
            Message::Pause(reply) => {
                paused = true;
                // The caller may have given up waiting; the thread is paused all the same.
                let _ = reply.send(worker.as_ref().map(|worker| worker.queue().state()));
            }
            Message::Resume => {
                paused = false;
                if std::mem::take(&mut deferred) {
                    if let Some(worker) = &mut worker {
                        worker.process_queue();
                    }
                }
            }
            Message::ReplaceDisk(disk, reply) => {
                if let Some(worker) = &mut worker {
                    worker.disk = disk;
                }
                let _ = reply.send(());
            }
            Message::Deactivate(reply) => {
                worker = None;
                paused = false;
                deferred = false;
                let _ = reply.send(());
            }
            Message::Shutdown => break,
        }
    }
}

/// Event loop subscriber for a queue's ioeventfd: hands the work to the worker thread.
#[derive(Debug)]
pub struct QueueNotifier {
    queue_event: EventFd,
    worker: Sender<Message>,
    kick_pending: Arc<AtomicBool>,
}

impl MutEventSubscriber for QueueNotifier {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Clear the eventfd; EAGAIN only means another handler already consumed it.
        let _ = self.queue_event.read();
        if self.kick_pending.swap(true, Ordering::AcqRel) {
            // The thread has a kick it has not picked up yet; its pass will see this request.
            return;
        }
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
