//! Just enough of the i8042 keyboard controller for the guest to reset the machine.
//!
//! Linux's `reboot=k` path (and the fallback of its default ACPI reboot) waits for
//! the controller's input buffer to be empty (status bit 1 clear) and then sends the
//! "pulse reset line" command, 0xFE, to the command port. This model reports both
//! buffers empty forever and turns that command into [`StopReason::Reset`]. It never
//! produces data, so a guest driver that *probes* the controller sees one that does
//! not answer and gives up.

use log::debug;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, StopReason};

/// Number of ports decoded, `I8042_PORT_BASE..=I8042_PORT_BASE + 4`.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60).
const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const COMMAND_OFFSET: u64 = 4;
/// Command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Status: output and input buffers empty, nothing else set.
const STATUS_IDLE: u8 = 0;

/// The i8042 controller at ports 0x60..=0x64.
#[derive(Debug)]
pub struct I8042Device {
    exit: ExitNotifier,
}

impl I8042Device {
    /// Creates the controller; a reset command is reported to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status (offset 4) reads "buffers empty"; the data port has nothing to give;
        // 0x61..=0x63 are not the controller's (KVM's in-kernel PIT owns 0x61).
        data.fill(STATUS_IDLE);
        if offset != COMMAND_OFFSET && offset != DATA_OFFSET {
            debug!("i8042: read of unemulated port offset {offset}");
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (COMMAND_OFFSET, [CMD_RESET_CPU]) => {
                debug!("i8042: CPU reset command");
                self.exit.notify(StopReason::Reset);
            }
            _ => debug!("i8042: ignoring write {data:x?} at offset {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042Device, ExitNotifier) {
        let exit = ExitNotifier::new().unwrap();
        (I8042Device::new(exit.clone()), exit)
    }

    #[test]
    fn reset_command_requests_reset() {
        let (mut i8042, exit) = device();
        // Linux's kb_wait(): poll the status port until the input buffer is empty.
        let mut status = [0xffu8];
        i8042.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 0x02, 0);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(StopReason::Reset));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn other_accesses_are_ignored() {
        let (mut i8042, exit) = device();
        // 0xFE on the data port, other commands, a wide write of 0xFE.
        i8042.write(DATA_OFFSET, &[CMD_RESET_CPU]);
        i8042.write(COMMAND_OFFSET, &[0x20]);
        i8042.write(COMMAND_OFFSET, &[0xaa]);
        i8042.write(COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        assert_eq!(exit.reason(), None);

        let mut data = [0xffu8; 1];
        i8042.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0]);
        let mut data = [0xffu8; 1];
        i8042.read(COMMAND_OFFSET, &mut data);
        assert_eq!(data, [0]);
    }
}
