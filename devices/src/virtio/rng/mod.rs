//! virtio-rng (entropy device): fills the guest's buffers with bytes from the host's
//! `getrandom(2)`, so a guest never waits for entropy at boot. An optional rate limit (bytes per
//! second, a token bucket holding one second's worth) keeps one guest from draining the host's
//! pool.
//!
//! It runs on the VMM thread's event loop: a request costs one `getrandom` call of at most
//! [`MAX_REQUEST_BYTES`], which never blocks once the host booted.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Address, Bytes};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use kiln_arch::GuestMemoryMmap;

use crate::log_limit::warn_limited;
use crate::virtio::{
    features as ring_features, next_chain, ActivateError, Activation, Interrupt, LogLimiter,
    PauseError, SharedSubscriber, VirtioDevice,
};
use std::os::fd::AsRawFd;

/// virtio device ID of an entropy device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes given for one request (the device may fill less than the buffer).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Requests served per pass before other events of the loop get their turn.
const PASS_BUDGET: u32 = 64;

/// A token bucket: `rate` bytes per second, at most one second's worth saved up.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: u64,
    tokens: u64,
    refilled: Instant,
}

impl RateLimit {
    /// A full bucket for `bytes_per_second` (at least 1).
    pub fn new(bytes_per_second: u64) -> Self {
        Self::starting_at(bytes_per_second, Instant::now())
    }

    fn starting_at(bytes_per_second: u64, now: Instant) -> Self {
        let rate = bytes_per_second.max(1);
        Self {
            rate,
            tokens: rate,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(self.rate);
            // Keep the remainder: advance by exactly the time the earned tokens took.
            let used = Duration::from_nanos(
                (u128::from(earned) * 1_000_000_000 / u128::from(self.rate)) as u64,
            );
            self.refilled = if self.tokens == self.rate {
                now
            } else {
                self.refilled + used
            };
        }
    }

    /// Takes up to `wanted` bytes' worth of tokens; returns how many it got.
    pub fn take(&mut self, wanted: usize, now: Instant) -> usize {
        self.refill(now);
        let granted = self.tokens.min(wanted as u64);
        self.tokens -= granted;
        granted as usize
    }

    /// How long until `bytes` tokens are there.
    pub fn wait_for(&self, bytes: u64) -> Duration {
        let missing = bytes.min(self.rate).saturating_sub(self.tokens);
        Duration::from_nanos((u128::from(missing) * 1_000_000_000 / u128::from(self.rate)) as u64)
            .max(Duration::from_millis(1))
    }
}

/// The queue of an active device.
#[derive(Debug)]
struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

#[derive(Debug)]
struct Core {
    active: Option<Active>,
    paused: bool,
    limit: Option<RateLimit>,
    timer: TimerFd,
    timer_armed: bool,
    /// Bytes given to the guest so far.
    given: u64,
    warnings: LogLimiter,
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    core: Arc<Mutex<Core>>,
    queue_sizes: [u16; 1],
    wake: EventFd,
    rate: Option<u64>,
}

impl Rng {
    /// A device, rate-limited to `bytes_per_second` if given.
    pub fn new(bytes_per_second: Option<u64>) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(io::Error::from)?;
        set_nonblocking(timer.as_raw_fd())?;
        Ok(Self {
            core: Arc::new(Mutex::new(Core {
                active: None,
                paused: false,
                limit: bytes_per_second.map(RateLimit::new),
                timer,
                timer_armed: false,
                given: 0,
                warnings: LogLimiter::new(),
            })),
            queue_sizes: [QUEUE_SIZE],
            wake: EventFd::new(EFD_NONBLOCK)?,
            rate: bytes_per_second,
        })
    }

    /// The rate limit in bytes per second, if any.
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Bytes given to the guest so far.
    pub fn bytes_given(&self) -> u64 {
        self.core().given
    }

    /// Serves the queue now, as the event handler would (tests).
    pub fn run_pass(&self) {
        self.core().run();
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Core {
    fn run(&mut self) {
        if std::mem::take(&mut self.timer_armed) {
            // EAGAIN: not expired yet; it is re-armed below if still needed.
            if self.timer.wait().is_err() {
                self.timer_armed = true;
            }
        }
        if self.paused {
            return;
        }
        let Some(Active {
            memory,
            queue,
            interrupt,
        }) = &mut self.active
        else {
            return;
        };
        let mut served = 0;
        let mut throttled = false;
        let mut broken = false;
        'passes: loop {
            if queue.disable_notification(&*memory).is_err() {
                break;
            }
            while served < PASS_BUDGET {
                let chain = match next_chain(queue, memory) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(err) => {
                        warn_limited!(
                            self.warnings,
                            "virtio-rng",
                            "virtio-rng: {err}; the device stops until the guest resets it"
                        );
                        interrupt.signal_needs_reset();
                        broken = true;
                        break 'passes;
                    }
                };
                let head = chain.head_index();
                let room: usize = chain
                    .clone()
                    .writable()
                    .map(|descriptor| descriptor.len() as usize)
                    .sum::<usize>()
                    .min(MAX_REQUEST_BYTES);
                let allowed = match &mut self.limit {
                    Some(limit) => limit.take(room, Instant::now()),
                    None => room,
                };
                if room > 0 && allowed == 0 {
                    queue.go_to_previous_position();
                    throttled = true;
                    break 'passes;
                }
                let written = fill(memory, chain, allowed, &mut self.warnings);
                self.given += written as u64;
                // At most MAX_REQUEST_BYTES.
                if queue.add_used(&*memory, head, written as u32).is_err() {
                    break 'passes;
                }
                served += 1;
            }
            if served >= PASS_BUDGET {
                break;
            }
            match queue.enable_notification(&*memory) {
                Ok(true) => continue,
                _ => break,
            }
        }
        if served > 0 && queue.needs_notification(&*memory).unwrap_or(true) {
            interrupt.signal_used_queue();
        }
        if broken {
            // Nothing more until the driver resets the device (activation starts afresh).
            self.active = None;
            return;
        }
        if throttled {
            let wait = self
                .limit
                .as_ref()
                .map_or(Duration::from_millis(1), |limit| limit.wait_for(64));
            match self.timer.reset(wait, None) {
                Ok(()) => self.timer_armed = true,
                Err(err) => log::error!("virtio-rng: cannot arm the rate-limit timer: {err}"),
            }
        } else if served >= PASS_BUDGET {
            // More is waiting: come back after the loop's other events.
            if self.timer.reset(Duration::from_nanos(1), None).is_ok() {
                self.timer_armed = true;
            }
        }
    }
}

/// Writes `amount` random bytes into the chain's writable buffers; returns how many it wrote.
fn fill(
    memory: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    amount: usize,
    warnings: &mut LogLimiter,
) -> usize {
    let mut written = 0;
    let mut random = [0u8; 4096];
    for descriptor in chain.writable() {
        let mut offset = 0u64;
        while written < amount && offset < u64::from(descriptor.len()) {
            let chunk = (amount - written)
                .min(random.len())
                .min((u64::from(descriptor.len()) - offset) as usize);
            if let Err(err) = getrandom(&mut random[..chunk]) {
                log::error!("virtio-rng: getrandom failed: {err}");
                return written;
            }
            let Some(address) = descriptor.addr().checked_add(offset) else {
                return written;
            };
            if let Err(err) = memory.write_slice(&random[..chunk], address) {
                warn_limited!(
                    warnings,
                    "virtio-rng",
                    "virtio-rng: a buffer from the guest is outside its memory: {err}"
                );
                return written;
            }
            written += chunk;
            offset += chunk as u64;
        }
    }
    written
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom(2) writes at most rest.len() bytes into the live buffer `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor the caller owns; it touches only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        1 << ring_features::RING_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn_limited!(
            self.core().warnings,
            "virtio-rng",
            "virtio-rng: the driver wrote {} bytes at configuration offset {offset:#x}; there is no configuration",
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
        let (Some(queue), Some(queue_event)) =
            (queues.into_iter().next(), queue_events.into_iter().next())
        else {
            return Err(ActivateError::QueueNotReady(0));
        };
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(0));
        }
        let handler = RngHandler {
            core: self.core.clone(),
            queue_event,
            timer: self.core().timer.as_raw_fd(),
            wake: self
                .wake
                .try_clone()
                .map_err(|e| ActivateError::Io("clone an eventfd", e))?,
        };
        self.core().active = Some(Active {
            memory,
            queue,
            interrupt,
        });
        // The driver may have given buffers before it set DRIVER_OK.
        let _ = self.wake.write(1);
        log::debug!("virtio-rng: activated");
        Ok(Some(Arc::new(Mutex::new(handler))))
    }

    fn reset(&mut self) {
        let mut core = self.core();
        core.active = None;
        core.paused = false;
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        let mut core = self.core();
        core.paused = true;
        Ok(core
            .active
            .as_ref()
            .map(|active| vec![active.queue.state()])
            .unwrap_or_default())
    }

    fn resume(&mut self) {
        self.core().paused = false;
        let _ = self.wake.write(1);
    }
}

/// The event loop handler of an active device: the queue notification, the rate-limit timer
/// and the wake eventfd each run a pass.
#[derive(Debug)]
struct RngHandler {
    core: Arc<Mutex<Core>>,
    queue_event: EventFd,
    timer: std::os::fd::RawFd,
    wake: EventFd,
}

impl MutEventSubscriber for RngHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_event.as_raw_fd() {
            let _ = self.queue_event.read();
        } else if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
        }
        self.core.lock().unwrap_or_else(|p| p.into_inner()).run();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.queue_event.as_raw_fd(),
            self.timer,
            self.wake.as_raw_fd(),
        ] {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("virtio-rng: cannot watch descriptor {fd}: {err:?}");
            }
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
