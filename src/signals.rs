//! SIGINT/SIGTERM/SIGHUP end the VM cleanly instead of killing Kiln mid-flight.
//!
//! The handler only stores the signal number and writes the VM's stop eventfd
//! ([`VmHandle::stop_fd`](kiln_vmm::VmHandle::stop_fd)), both async-signal-safe; the VMM thread
//! sees the eventfd in its event loop and stops the VM on the normal path, so vCPU threads are
//! joined and the terminal is restored. Signal handlers are per process, so this lives in the
//! CLI (one VM per process), not in the library.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// Signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

static SIGNAL_EVENTFD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(signum: libc::c_int) {
    LAST_SIGNAL.store(signum, Ordering::SeqCst);
    let fd = SIGNAL_EVENTFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 on this stack frame and
        // a failed write (fd closed) only loses the wake-up, never memory safety.
        unsafe { libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
    }
}

/// Routes the stop signals to a VM's stop eventfd for as long as the guard lives.
pub struct StopSignals {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    /// Installs the handlers; `stop_fd` must stay open while the guard lives.
    pub fn install(stop_fd: RawFd) -> std::io::Result<Self> {
        LAST_SIGNAL.store(0, Ordering::SeqCst);
        SIGNAL_EVENTFD.store(stop_fd, Ordering::SeqCst);
        let mut guard = Self {
            previous: Vec::new(),
        };
        for signum in STOP_SIGNALS {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_stop_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: zeroed is a valid sigaction to receive the old handler.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are valid for the call; the handler only does
            // async-signal-safe work.
            if unsafe { libc::sigaction(signum, &action, &mut old) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            guard.previous.push((signum, old));
        }
        Ok(guard)
    }

    /// The last stop signal received, if any.
    pub fn received(&self) -> Option<i32> {
        match LAST_SIGNAL.load(Ordering::SeqCst) {
            0 => None,
            signum => Some(signum),
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (signum, old) in self.previous.drain(..) {
            // SAFETY: restores the handler that was there before; `old` came from sigaction.
            unsafe { libc::sigaction(signum, &old, std::ptr::null_mut()) };
        }
        SIGNAL_EVENTFD.store(-1, Ordering::SeqCst);
    }
}
