//! ACPI hardware-reduced power management: sleep control/status and reset registers.
//!
//! The FADT points the guest's sleep control, sleep status and reset registers at
//! three one-byte ports. Linux powers off by writing `(SLP_TYP << 2) | SLP_EN` to the
//! sleep control register with the `_S5_` sleep type, and resets by writing the
//! FADT's reset value to the reset register.

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, StopReason};
use crate::log_limit::{debug_limited, info_limited, warn_limited, LogLimiter};

use kiln_arch::layout::{
    ACPI_PM_PORT_LEN, ACPI_RESET_OFFSET, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE,
    ACPI_SLEEP_CONTROL_OFFSET, ACPI_SLEEP_ENABLE_BIT, ACPI_SLEEP_STATUS_OFFSET,
};

// Register offsets as bus offsets (the layout states them as port offsets).
const SLEEP_CONTROL_OFFSET: u64 = ACPI_SLEEP_CONTROL_OFFSET as u64;
const SLEEP_STATUS_OFFSET: u64 = ACPI_SLEEP_STATUS_OFFSET as u64;
const RESET_OFFSET: u64 = ACPI_RESET_OFFSET as u64;
/// Ports decoded at `ACPI_PM_PORT` (the layout's `ACPI_PM_PORT_LEN`, as a bus length).
pub const ACPI_PM_LEN: u64 = ACPI_PM_PORT_LEN as u64;

/// SLP_TYP field of the sleep control register: bits 2..=4 (ACPI 6.x, 4.8.3.7).
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;
/// WAK_STS in the sleep status register: set when the platform has woken up.
const WAKE_STATUS: u8 = 1 << 7;

/// The ACPI PM register block at `ACPI_PM_PORT`.
#[derive(Debug)]
pub struct AcpiPmDevice {
    exit: ExitNotifier,
    /// Sleep status register; only WAK_STS is ever set.
    sleep_status: u8,
    /// The guest can repeat any write on every exit: writes that do nothing...
    ignored_writes: LogLimiter,
    /// ...and power-off or reset requests until its vCPUs are stopped (apart, so that a flood
    /// of the former never hides the latter).
    stop_requests: LogLimiter,
}

impl AcpiPmDevice {
    /// Creates the register block; power-off and reset requests go to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            exit,
            sleep_status: 0,
            ignored_writes: LogLimiter::new(),
            stop_requests: LogLimiter::new(),
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & ACPI_SLEEP_ENABLE_BIT == 0 {
            debug_limited!(
                self.ignored_writes,
                "acpi",
                "acpi: sleep control write {value:#x} without SLP_EN"
            );
            return;
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if sleep_type == ACPI_S5_SLEEP_TYPE {
            info_limited!(
                self.stop_requests,
                "acpi",
                "acpi: guest requested power off (S5)"
            );
            self.exit.notify(StopReason::PowerOff);
        } else {
            // No suspend support: "wake up" at once. Linux spins on WAK_STS after
            // entering a sleep state, so leaving it clear would hang the vCPU.
            warn_limited!(
                self.ignored_writes,
                "acpi",
                "acpi: ignoring request for unsupported sleep type {sleep_type}"
            );
            self.sleep_status |= WAKE_STATUS;
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            // Status bits are write-one-to-clear.
            SLEEP_STATUS_OFFSET => self.sleep_status &= !value,
            RESET_OFFSET if value == ACPI_RESET_VALUE => {
                info_limited!(self.stop_requests, "acpi", "acpi: guest requested reset");
                self.exit.notify(StopReason::Reset);
            }
            _ => debug_limited!(
                self.ignored_writes,
                "acpi",
                "acpi: ignoring write {value:#x} at offset {offset}"
            ),
        }
    }

    fn read_register(&self, offset: u64) -> u8 {
        match offset {
            SLEEP_STATUS_OFFSET => self.sleep_status,
            // Sleep control and reset are write-only and read as zero.
            SLEEP_CONTROL_OFFSET | RESET_OFFSET => 0,
            _ => 0xff,
        }
    }
}

impl BusDevice for AcpiPmDevice {
    /// One-byte registers; a wider access touches consecutive registers.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (register, byte) in (offset..).zip(data.iter_mut()) {
            *byte = self.read_register(register);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (register, &value) in (offset..).zip(data) {
            self.write_register(register, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_limit::BURST;
    use crate::test_logger::capture_logs;

    fn device() -> (AcpiPmDevice, ExitNotifier) {
        let exit = ExitNotifier::new().unwrap();
        (AcpiPmDevice::new(exit.clone()), exit)
    }

    fn sleep_control(sleep_type: u8) -> u8 {
        (sleep_type << 2) | (1 << 5)
    }

    fn read_status(acpi: &mut AcpiPmDevice) -> u8 {
        let mut data = [0u8];
        acpi.read(SLEEP_STATUS_OFFSET, &mut data);
        data[0]
    }

    #[test]
    fn constants_match_the_layout_contract() {
        // What layout.rs documents: Linux writes (5 << 2) | 0x20 = 0x34 to power off.
        assert_eq!(sleep_control(ACPI_S5_SLEEP_TYPE), 0x34);
        assert_eq!(
            (
                SLEEP_CONTROL_OFFSET,
                SLEEP_STATUS_OFFSET,
                RESET_OFFSET,
                ACPI_PM_LEN
            ),
            (0, 1, 2, 3)
        );
    }

    #[test]
    fn s5_powers_off() {
        let (mut acpi, exit) = device();
        // Linux clears WAK_STS first, then writes the sleep control register.
        acpi.write(SLEEP_STATUS_OFFSET, &[WAKE_STATUS]);
        acpi.write(SLEEP_CONTROL_OFFSET, &[0x34]);
        assert_eq!(exit.reason(), Some(StopReason::PowerOff));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn s5_type_without_sleep_enable_does_nothing() {
        let (mut acpi, exit) = device();
        acpi.write(SLEEP_CONTROL_OFFSET, &[ACPI_S5_SLEEP_TYPE << 2]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn other_sleep_types_wake_immediately() {
        let (mut acpi, exit) = device();
        assert_eq!(read_status(&mut acpi), 0);
        for sleep_type in (0..8).filter(|&t| t != ACPI_S5_SLEEP_TYPE) {
            acpi.write(SLEEP_CONTROL_OFFSET, &[sleep_control(sleep_type)]);
            assert_eq!(exit.reason(), None, "sleep type {sleep_type}");
            assert_eq!(read_status(&mut acpi), WAKE_STATUS);
            acpi.write(SLEEP_STATUS_OFFSET, &[WAKE_STATUS]);
            assert_eq!(read_status(&mut acpi), 0);
        }
    }

    #[test]
    fn reset_register_resets() {
        let (mut acpi, exit) = device();
        acpi.write(RESET_OFFSET, &[0x06]);
        assert_eq!(exit.reason(), None, "only the FADT's reset value counts");
        acpi.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn write_only_registers_read_zero() {
        let (mut acpi, _exit) = device();
        acpi.write(SLEEP_CONTROL_OFFSET, &[0x03]);
        let mut data = [0xffu8; 3];
        acpi.read(0, &mut data);
        assert_eq!(data, [0, 0, 0]);
    }

    #[test]
    fn guest_write_floods_are_rate_limited() {
        let (mut acpi, exit) = device();
        let ((), lines) = capture_logs(|| {
            for _ in 0..1000 {
                acpi.write(SLEEP_CONTROL_OFFSET, &[0x03]);
                acpi.write(SLEEP_CONTROL_OFFSET, &[sleep_control(1)]);
                acpi.write(RESET_OFFSET, &[0x06]);
            }
            for _ in 0..1000 {
                acpi.write(RESET_OFFSET, &[ACPI_RESET_VALUE]);
            }
        });
        assert_eq!(exit.reason(), Some(StopReason::Reset));
        // 3000 ignored writes share one budget; the reset requests have their own (and so
        // do the exit notifier's lines about them).
        let count = |text: &str| lines.iter().filter(|(_, line)| line.contains(text)).count();
        assert_eq!(
            count("acpi: guest requested reset"),
            BURST as usize,
            "{lines:?}"
        );
        assert_eq!(count("acpi: "), 2 * BURST as usize, "{lines:?}");
        assert_eq!(count("VM "), 1 + BURST as usize, "{lines:?}");
        assert_eq!(lines.len(), 3 * BURST as usize + 1, "{lines:?}");
    }
}
