//! The pvpanic ISA port: the guest kernel reports a panic with one `outb`.
//!
//! Linux's pvpanic driver reads the port to learn which events the device supports
//! and writes the event bits when they happen. A panic stops the VM with
//! [`StopReason::Panic`] instead of leaving a dead guest spinning until a timeout.

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, StopReason};
use crate::log_limit::{debug_limited, info_limited, LogLimiter};

/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel is loaded and about to run (kdump).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// Number of ports decoded at `PVPANIC_PORT`.
pub const PVPANIC_PORT_LEN: u64 = 1;

/// The pvpanic device, one byte at `PVPANIC_PORT`.
#[derive(Debug)]
pub struct PvPanicDevice {
    exit: ExitNotifier,
    /// The guest can repeat any write on every exit: malformed ones...
    ignored_writes: LogLimiter,
    /// ...and crash reports (apart, so that a flood of the former never hides the latter).
    crash_reports: LogLimiter,
}

impl PvPanicDevice {
    /// Creates the device; a reported panic goes to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            exit,
            ignored_writes: LogLimiter::new(),
            crash_reports: LogLimiter::new(),
        }
    }
}

impl BusDevice for PvPanicDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, &[events]) = (offset, data) else {
            debug_limited!(
                self.ignored_writes,
                "pvpanic",
                "pvpanic: ignoring write {data:x?} at offset {offset}"
            );
            return;
        };
        if events & PVPANIC_CRASH_LOADED != 0 {
            info_limited!(
                self.crash_reports,
                "pvpanic",
                "pvpanic: guest panicked and is starting its crash kernel"
            );
        }
        if events & PVPANIC_PANICKED != 0 {
            self.exit.notify(StopReason::Panic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_limit::BURST;
    use crate::test_logger::capture_logs;

    fn device() -> (PvPanicDevice, ExitNotifier) {
        let exit = ExitNotifier::new().unwrap();
        (PvPanicDevice::new(exit.clone()), exit)
    }

    #[test]
    fn advertises_panicked_and_crash_loaded() {
        let (mut pvpanic, _exit) = device();
        let mut data = [0u8];
        pvpanic.read(0, &mut data);
        assert_eq!(data, [0b11]);
    }

    #[test]
    fn panicked_bit_stops_the_vm() {
        let (mut pvpanic, exit) = device();
        pvpanic.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(exit.reason(), Some(StopReason::Panic));
    }

    #[test]
    fn crash_loaded_alone_lets_kdump_run() {
        let (mut pvpanic, exit) = device();
        pvpanic.write(0, &[PVPANIC_CRASH_LOADED]);
        pvpanic.write(0, &[0]);
        assert_eq!(exit.reason(), None);
        // Both bits at once is still a panic.
        pvpanic.write(0, &[PVPANIC_PANICKED | PVPANIC_CRASH_LOADED]);
        assert_eq!(exit.reason(), Some(StopReason::Panic));
    }

    #[test]
    fn wide_writes_are_ignored() {
        let (mut pvpanic, exit) = device();
        pvpanic.write(0, &[PVPANIC_PANICKED, 0]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn guest_write_floods_are_rate_limited() {
        let (mut pvpanic, exit) = device();
        let ((), lines) = capture_logs(|| {
            for _ in 0..1000 {
                pvpanic.write(0, &[PVPANIC_PANICKED, 0]);
                pvpanic.write(0, &[PVPANIC_CRASH_LOADED]);
            }
        });
        assert_eq!(exit.reason(), None);
        let crash_reports = lines
            .iter()
            .filter(|(_, line)| line.contains("crash kernel"))
            .count();
        assert_eq!(crash_reports, BURST as usize, "{lines:?}");
        assert_eq!(lines.len(), 2 * BURST as usize, "{lines:?}");
    }
}
