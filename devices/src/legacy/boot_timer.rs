//! Firecracker-compatible boot timer: measures how long the guest took to boot.
//!
//! A guest init writes the byte 123 to the first byte of the MMIO window (through
//! `/dev/mem`) once userspace is up. The first such write logs the time since the VMM
//! process started, in the same words Firecracker uses, so existing tooling that
//! greps for `Guest-boot-time` keeps working.

use std::time::{Duration, Instant};

use log::info;

use crate::bus::BusDevice;
use crate::log_limit::{debug_limited, LogLimiter};

/// The value a guest writes to say "booted".
pub const BOOT_COMPLETE_MAGIC: u8 = 123;

/// The boot timer MMIO device at `BOOT_TIMER_START`.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    boot_time: Option<Duration>,
    /// The guest can repeat an ignored write on every exit. (The boot time is logged once.)
    ignored_writes: LogLimiter,
}

impl BootTimer {
    /// Creates a timer measuring from `start` (the VMM process start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time: None,
            ignored_writes: LogLimiter::new(),
        }
    }

    /// Time from `start` to the guest's first boot-complete write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a single-byte write of the magic value at offset 0 counts.
        if offset != 0 || data != [BOOT_COMPLETE_MAGIC] {
            debug_limited!(
                self.ignored_writes,
                "boot timer",
                "boot timer: ignoring write {data:x?} at offset {offset:#x}"
            );
            return;
        }
        if self.boot_time.is_some() {
            return;
        }
        let elapsed = self.start.elapsed();
        self.boot_time = Some(elapsed);
        info!(
            "Guest-boot-time = {:>6} us {} ms",
            elapsed.as_micros(),
            elapsed.as_millis()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_limit::BURST;
    use crate::test_logger::capture_logs;

    #[test]
    fn magic_write_records_time_since_start() {
        let start = Instant::now() - Duration::from_millis(250);
        let mut timer = BootTimer::new(start);
        assert_eq!(timer.boot_time(), None);

        let before = start.elapsed();
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let after = start.elapsed();
        let boot_time = timer.boot_time().unwrap();
        assert!(before <= boot_time && boot_time <= after, "{boot_time:?}");
        assert!(boot_time >= Duration::from_millis(250));
    }

    #[test]
    fn only_the_first_magic_write_counts() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let first = timer.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        assert_eq!(timer.boot_time(), Some(first));
    }

    #[test]
    fn other_writes_are_ignored() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[122]);
        timer.write(0, &[124]);
        timer.write(1, &[BOOT_COMPLETE_MAGIC]);
        timer.write(0, &[BOOT_COMPLETE_MAGIC, 0]);
        timer.write(0, &[]);
        assert_eq!(timer.boot_time(), None);
    }

    #[test]
    fn reads_return_zero() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        let mut data = [0xffu8; 4];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn ignored_write_floods_are_rate_limited_and_never_hide_the_boot_time() {
        let mut timer = BootTimer::new(Instant::now());
        let ((), lines) = capture_logs(|| {
            for _ in 0..1000 {
                timer.write(0, &[122]);
            }
            timer.write(0, &[BOOT_COMPLETE_MAGIC]);
        });
        assert_eq!(lines.len(), BURST as usize + 1, "{lines:?}");
        let (level, last) = lines.last().unwrap();
        assert_eq!(*level, log::Level::Info);
        assert!(last.starts_with("Guest-boot-time = "), "{last}");
    }
}
