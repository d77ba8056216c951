//! The one way anything inside a VM asks for the VM to stop.
//!
//! Devices (ACPI power-off, i8042 reset, pvpanic) and vCPU threads (fatal exits) all
//! hold a clone of the same [`ExitNotifier`]. The first [`StopReason`] reported is the
//! one the VM stops for; the VMM thread polls [`ExitNotifier::eventfd`] to learn that it
//! should tear the VM down.

use std::io;
use std::sync::{Arc, OnceLock};

use log::{debug, error};

use crate::log_limit::{debug_limited, SharedLogLimiter};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register).
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
    /// A vCPU hit an error the VMM cannot recover from.
    VcpuError,
}

/// Shared, clonable "stop this VM" signal.
///
/// Clones share state: the first [`notify`](Self::notify) on any clone decides the
/// reason and makes the eventfd readable.
#[derive(Clone, Debug)]
pub struct ExitNotifier {
    eventfd: Arc<EventFd>,
    reason: Arc<OnceLock<StopReason>>,
    /// Stop requests after the first one: a guest can repeat them until its vCPUs are stopped.
    later_requests: Arc<SharedLogLimiter>,
}

impl ExitNotifier {
    /// Creates a notifier with a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            eventfd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            reason: Arc::new(OnceLock::new()),
            later_requests: Arc::new(SharedLogLimiter::new()),
        })
    }

    /// Asks the VM to stop for `reason`.
    ///
    /// Only the first call records its reason and signals the eventfd; later calls are
    /// logged and otherwise ignored (a guest that panics while powering off still
    /// stopped for the first reason). Never panics and never blocks.
    pub fn notify(&self, reason: StopReason) {
        match self.reason.set(reason) {
            Ok(()) => {
                debug!("VM stop requested: {reason:?}");
                if let Err(err) = self.eventfd.write(1) {
                    // Only possible if the counter would overflow, i.e. never in practice;
                    // the reason is recorded either way.
                    error!("failed to signal VM stop ({reason:?}): {err}");
                }
            }
            Err(_) => {
                if let Some(first) = self.reason() {
                    debug_limited!(
                        self.later_requests,
                        "VM stop",
                        "VM already stopping ({first:?}); ignoring later stop request {reason:?}"
                    );
                }
            }
        }
    }

    /// The reason the VM is stopping, if any has been reported yet.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason.get().copied()
    }

    /// The eventfd that becomes readable when the first stop is requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_limit::BURST;
    use crate::test_logger::capture_logs;

    #[test]
    fn no_reason_and_nothing_to_read_until_notified() {
        let exit = ExitNotifier::new().unwrap();
        assert_eq!(exit.reason(), None);
        let err = exit.eventfd().read().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn first_reason_wins_across_clones() {
        let exit = ExitNotifier::new().unwrap();
        let device_side = exit.clone();
        device_side.notify(StopReason::Panic);
        exit.notify(StopReason::PowerOff);
        device_side.notify(StopReason::Reset);
        assert_eq!(exit.reason(), Some(StopReason::Panic));
        assert_eq!(device_side.reason(), Some(StopReason::Panic));
        // Signalled exactly once.
        assert_eq!(exit.eventfd().read().unwrap(), 1);
        assert_eq!(
            exit.eventfd().read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn concurrent_notifications_record_exactly_one_reason() {
        let exit = ExitNotifier::new().unwrap();
        let reasons = [
            StopReason::PowerOff,
            StopReason::Reset,
            StopReason::Panic,
            StopReason::VcpuError,
        ];
        let threads: Vec<_> = reasons
            .iter()
            .map(|&reason| {
                let exit = exit.clone();
                std::thread::spawn(move || exit.notify(reason))
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(reasons.contains(&exit.reason().unwrap()));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn repeated_stop_requests_are_logged_at_a_limited_rate() {
        let exit = ExitNotifier::new().unwrap();
        let device_side = exit.clone();
        let ((), lines) = capture_logs(|| {
            exit.notify(StopReason::PowerOff);
            for _ in 0..1000 {
                device_side.notify(StopReason::Reset);
            }
        });
        assert_eq!(exit.reason(), Some(StopReason::PowerOff));
        assert_eq!(lines.len(), 1 + BURST as usize, "{lines:?}");
        assert!(lines[0].1.contains("stop requested"), "{lines:?}");
    }
}
