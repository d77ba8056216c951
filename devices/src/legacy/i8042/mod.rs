//! The i8042 PS/2 controller with an AT keyboard, at ports 0x60 (data) and 0x64 (status and
//! command).
//!
//! Why a full controller: a guest kernel with an i8042 driver probes the controller at boot
//! (flush, read and write the configuration byte, interface tests, then the keyboard's id) and
//! waits ~0.5 s per command nobody answers. Answering every command at once makes that probe
//! free, and a keyboard the guest has set up is how the VMM sends Ctrl-Alt-Del
//! ([`I8042Device::send_ctrl_alt_del`]).
//!
//! What it models: the configuration byte (interrupt and port enables, translation), the
//! controller's self-test and interface tests, the output port (whose reset line, like the
//! pulse command 0xFE, ends the VM with [`StopReason::Reset`]), the keyboard port with its
//! interrupt (IRQ 1, through an eventfd the VMM registers as an irqfd) and the keyboard itself
//! ([`keyboard`]). There is no mouse: the AUX port has no IRQ line (IRQ 12 belongs to virtio
//! here), and every byte sent to it, including the controller's own loopback, ends in a
//! timeout, so drivers decide within two commands that it does not work. With ACPI the DSDT
//! lists only the keyboard (`PNP0303`), and Linux then leaves the AUX port alone.
//!
//! Input is processed at once, so the input buffer is never full (status bit 1 reads 0).

pub mod keyboard;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use log::error;
use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, StopReason};
use crate::legacy::serial::EventFdTrigger;
use crate::log_limit::{debug_limited, LogLimiter};
use keyboard::{Key, KeyAction, Keyboard, KEY_DELETE, KEY_LEFT_ALT, KEY_LEFT_CTRL};

pub use keyboard::KeyboardError;
pub use snapshot::{I8042RestoreError, I8042Snapshot};

/// Number of ports decoded, `I8042_PORT_BASE..=I8042_PORT_BASE + 4`.
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the data port (0x60).
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
pub const COMMAND_OFFSET: u64 = 4;

/// Status register bits.
pub mod status {
    /// Output buffer full: the data port has a byte for the host.
    pub const OUTPUT_FULL: u8 = 0x01;
    /// Input buffer full (never set: input is processed at once).
    pub const INPUT_FULL: u8 = 0x02;
    /// System flag: the controller passed its self-test.
    pub const SYSTEM: u8 = 0x04;
    /// The last byte written went to the command port.
    pub const COMMAND: u8 = 0x08;
    /// Keyboard not inhibited by the keylock switch.
    pub const UNLOCKED: u8 = 0x10;
    /// The output byte came from the AUX port.
    pub const AUX_DATA: u8 = 0x20;
    /// The device on the port did not answer.
    pub const TIMEOUT: u8 = 0x40;
}

/// Configuration byte ("command byte", RAM byte 0) bits.
pub mod config {
    /// Interrupt (IRQ 1) when the output buffer gets a keyboard byte.
    pub const KEYBOARD_INTERRUPT: u8 = 0x01;
    /// Interrupt (IRQ 12) for AUX bytes; this controller has no IRQ 12 line.
    pub const AUX_INTERRUPT: u8 = 0x02;
    /// System flag, mirrored in the status register.
    pub const SYSTEM: u8 = 0x04;
    /// Keyboard interface disabled (its bytes wait in the keyboard).
    pub const KEYBOARD_DISABLED: u8 = 0x10;
    /// AUX interface disabled.
    pub const AUX_DISABLED: u8 = 0x20;
    /// Translate the keyboard's scancode set 2 to set 1.
    pub const TRANSLATE: u8 = 0x40;
}

/// Controller commands (written to the command port).
pub mod command {
    /// Read RAM byte 0 (the configuration byte); 0x21..=0x3F read the others.
    pub const READ_CONFIG: u8 = 0x20;
    /// Write RAM byte 0 (the configuration byte); 0x61..=0x7F write the others.
    pub const WRITE_CONFIG: u8 = 0x60;
    /// Is a password installed? (0xF1: no.)
    pub const PASSWORD_INSTALLED: u8 = 0xa4;
    /// Disable the AUX interface.
    pub const DISABLE_AUX: u8 = 0xa7;
    /// Enable the AUX interface.
    pub const ENABLE_AUX: u8 = 0xa8;
    /// Test the AUX interface (0: passed).
    pub const TEST_AUX: u8 = 0xa9;
    /// Controller self-test (0x55: passed).
    pub const SELF_TEST: u8 = 0xaa;
    /// Test the keyboard interface (0: passed).
    pub const TEST_KEYBOARD: u8 = 0xab;
    /// Disable the keyboard interface.
    pub const DISABLE_KEYBOARD: u8 = 0xad;
    /// Enable the keyboard interface.
    pub const ENABLE_KEYBOARD: u8 = 0xae;
    /// Read the input port.
    pub const READ_INPUT_PORT: u8 = 0xc0;
    /// Read the output port.
    pub const READ_OUTPUT_PORT: u8 = 0xd0;
    /// Write the output port (bit 0 low resets the CPU); a data byte follows.
    pub const WRITE_OUTPUT_PORT: u8 = 0xd1;
    /// Put the next data byte in the output buffer as if the keyboard sent it.
    pub const WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
    /// Put the next data byte in the output buffer as if the AUX device sent it (loopback).
    pub const WRITE_AUX_OUTPUT: u8 = 0xd3;
    /// Send the next data byte to the AUX device.
    pub const WRITE_AUX: u8 = 0xd4;
    /// Read the test inputs.
    pub const READ_TEST_INPUTS: u8 = 0xe0;
    /// Pulse the output port's reset line (0xF0..=0xFF pulse the lines whose bit is clear).
    pub const PULSE_RESET: u8 = 0xfe;
}

/// The self-test's "passed" answer.
pub const SELF_TEST_PASSED: u8 = 0x55;
/// The AUX interface test's "clock line stuck low" answer.
pub const AUX_TEST_CLOCK_STUCK_LOW: u8 = 0x01;
/// What a byte sent to the absent AUX device comes back as (with `TIMEOUT`).
pub const AUX_NO_ANSWER: u8 = 0xfe;
/// Output-port bit 0: the CPU reset line (low = reset).
const OUTPUT_PORT_NOT_RESET: u8 = 0x01;
/// Output-port bit 1: the A20 gate.
const OUTPUT_PORT_A20: u8 = 0x02;
/// Input-port bit 7: keyboard not inhibited.
const INPUT_PORT_UNLOCKED: u8 = 0x80;
/// As firmware leaves it: keyboard interrupt, system flag, translation; AUX off.
const INITIAL_CONFIG: u8 =
    config::KEYBOARD_INTERRUPT | config::SYSTEM | config::AUX_DISABLED | config::TRANSLATE;

/// Controller answers kept when the guest does not read them: it asks one question at a time,
/// so a few are all that can pile up.
const MAX_ANSWERS: usize = 4;

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Source {
    /// An answer to a controller command.
    Controller,
    /// The keyboard (or a 0xD2 loopback).
    Keyboard,
    /// The AUX port: always a timeout here.
    AuxTimeout,
}

/// The i8042 controller and its keyboard.
#[derive(Debug)]
pub struct I8042Device {
    exit: ExitNotifier,
    /// IRQ 1, when the VMM connected one.
    keyboard_interrupt: Option<EventFdTrigger>,
    config: u8,
    output_port: u8,
    /// The output buffer (what the data port reads).
    output: Option<(u8, Source)>,
    /// What the data port reads while the output buffer is empty: the last byte read.
    last_output: u8,
    /// Answers of the controller itself (and AUX timeouts), ahead of keyboard bytes.
    controller_output: VecDeque<(u8, Source)>,
    /// A command waiting for its data byte.
    awaiting_data: Option<u8>,
    /// The last write went to the command port (status bit 3).
    last_write_was_command: bool,
    keyboard: Keyboard,
    log_limit: LogLimiter,
    interrupt_error_logged: bool,
}

impl I8042Device {
    /// A controller in the state firmware leaves it, without a keyboard interrupt (the guest
    /// can still poll it); a reset command is reported to `exit`.
    pub fn new(exit: ExitNotifier) -> Self {
        Self {
            exit,
            keyboard_interrupt: None,
            config: INITIAL_CONFIG,
            output_port: OUTPUT_PORT_NOT_RESET | OUTPUT_PORT_A20,
            output: None,
            last_output: 0,
            controller_output: VecDeque::new(),
            awaiting_data: None,
            last_write_was_command: false,
            keyboard: Keyboard::new(),
            log_limit: LogLimiter::new(),
            interrupt_error_logged: false,
        }
    }

    /// Raises `interrupt` (IRQ 1) when a keyboard byte arrives and the guest enabled it.
    pub fn with_keyboard_interrupt(mut self, interrupt: EventFdTrigger) -> Self {
        self.keyboard_interrupt = Some(interrupt);
        self
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard (what Firecracker's `SendCtrlAltDel`
    /// does). A Linux guest with a keyboard driver then reboots (or signals its init, as
    /// `kernel.ctrl-alt-del` says). Fails, queueing nothing, when the guest has turned the
    /// keyboard off or has not read the keys sent before.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), KeyboardError> {
        self.send_keys(&[
            (KEY_LEFT_CTRL, KeyAction::Press),
            (KEY_LEFT_ALT, KeyAction::Press),
            (KEY_DELETE, KeyAction::Press),
            (KEY_DELETE, KeyAction::Release),
            (KEY_LEFT_ALT, KeyAction::Release),
            (KEY_LEFT_CTRL, KeyAction::Release),
        ])
    }

    /// Sends key events through the keyboard, all or none.
    pub fn send_keys(&mut self, events: &[(Key, KeyAction)]) -> Result<(), KeyboardError> {
        let translated = self.config & config::TRANSLATE != 0;
        self.keyboard.send_keys(events, translated)?;
        self.refill_output();
        Ok(())
    }

    /// The status register.
    fn status(&self) -> u8 {
        let mut status = status::UNLOCKED;
        if self.config & config::SYSTEM != 0 {
            status |= status::SYSTEM;
        }
        if self.last_write_was_command {
            status |= status::COMMAND;
        }
        match self.output {
            Some((_, Source::AuxTimeout)) => {
                status |= status::OUTPUT_FULL | status::AUX_DATA | status::TIMEOUT
            }
            Some(_) => status |= status::OUTPUT_FULL,
            None => {}
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.output.take() {
            self.last_output = byte;
            self.refill_output();
        }
        self.last_output
    }

    /// Moves the next byte into an empty output buffer: controller answers first, then the
    /// keyboard's bytes while its interface is enabled. A keyboard byte raises IRQ 1 if the
    /// guest enabled it.
    fn refill_output(&mut self) {
        if self.output.is_some() {
            return;
        }
        let keyboard_enabled = self.config & config::KEYBOARD_DISABLED == 0;
        let next = self.controller_output.pop_front().or_else(|| {
            keyboard_enabled
                .then(|| self.keyboard.pop())
                .flatten()
                .map(|byte| (byte, Source::Keyboard))
        });
        if let Some((byte, source)) = next {
            self.output = Some((byte, source));
            if source == Source::Keyboard {
                self.raise_keyboard_interrupt();
            }
        }
    }

    fn raise_keyboard_interrupt(&mut self) {
        if self.config & config::KEYBOARD_INTERRUPT == 0 {
            return;
        }
        if let Some(interrupt) = &self.keyboard_interrupt {
            if let Err(err) = interrupt.trigger() {
                if !self.interrupt_error_logged {
                    self.interrupt_error_logged = true;
                    error!("i8042: failed to signal the keyboard interrupt: {err}");
                }
            }
        }
    }

    /// Queues an answer of the controller itself.
    fn answer(&mut self, byte: u8, source: Source) {
        if self.controller_output.len() < MAX_ANSWERS {
            self.controller_output.push_back((byte, source));
        }
        self.refill_output();
    }

    fn set_config(&mut self, value: u8) {
        let keyboard_interrupt_enabled = value & config::KEYBOARD_INTERRUPT != 0
            && self.config & config::KEYBOARD_INTERRUPT == 0;
        self.config = value;
        if keyboard_interrupt_enabled && matches!(self.output, Some((_, Source::Keyboard))) {
            self.raise_keyboard_interrupt();
        }
        self.refill_output();
    }

    fn reset(&self) {
        self.exit.notify(StopReason::Reset);
    }

    fn write_command(&mut self, command: u8) {
        self.awaiting_data = None;
        match command {
            command::READ_CONFIG => self.answer(self.config, Source::Controller),
            // Other RAM bytes: nothing stored there.
            0x21..=0x3f => self.answer(0, Source::Controller),
            command::WRITE_CONFIG..=0x7f
            | command::WRITE_OUTPUT_PORT
            | command::WRITE_KEYBOARD_OUTPUT
            | command::WRITE_AUX_OUTPUT
            | command::WRITE_AUX => self.awaiting_data = Some(command),
            command::PASSWORD_INSTALLED => self.answer(0xf1, Source::Controller),
            command::DISABLE_AUX => self.set_config(self.config | config::AUX_DISABLED),
            command::ENABLE_AUX => self.set_config(self.config & !config::AUX_DISABLED),
            command::TEST_AUX => self.answer(AUX_TEST_CLOCK_STUCK_LOW, Source::Controller),
            command::SELF_TEST => {
                self.config |= config::SYSTEM;
                self.answer(SELF_TEST_PASSED, Source::Controller);
            }
            command::TEST_KEYBOARD => self.answer(0, Source::Controller),
            command::DISABLE_KEYBOARD => self.set_config(self.config | config::KEYBOARD_DISABLED),
            command::ENABLE_KEYBOARD => self.set_config(self.config & !config::KEYBOARD_DISABLED),
            command::READ_INPUT_PORT => self.answer(INPUT_PORT_UNLOCKED, Source::Controller),
            command::READ_OUTPUT_PORT => self.answer(self.output_port, Source::Controller),
            command::READ_TEST_INPUTS => self.answer(0, Source::Controller),
            // Pulse output lines for 6 µs; bit 0 clear pulses the reset line.
            0xf0..=0xff if command & OUTPUT_PORT_NOT_RESET == 0 => {
                debug_limited!(
                    self.log_limit,
                    "i8042",
                    "i8042: pulse command {command:#04x}: CPU reset"
                );
                self.reset();
            }
            0xf0..=0xff => {}
            _ => {
                debug_limited!(
                    self.log_limit,
                    "i8042",
                    "i8042: ignoring unknown controller command {command:#04x}"
                );
            }
        }
    }

    fn write_data(&mut self, byte: u8) {
        match self.awaiting_data.take() {
            Some(command::WRITE_CONFIG) => self.set_config(byte),
            // Other RAM bytes: nothing stored there.
            Some(0x61..=0x7f) => {}
            Some(command::WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_NOT_RESET == 0 {
                    debug_limited!(
                        self.log_limit,
                        "i8042",
                        "i8042: output port {byte:#04x} pulls the reset line: CPU reset"
                    );
                    self.reset();
                }
            }
            // Ahead of the keyboard's own bytes: the controller puts it in its buffer.
            Some(command::WRITE_KEYBOARD_OUTPUT) => self.answer(byte, Source::Keyboard),
            // No AUX device (and no loopback): the port times out.
            Some(command::WRITE_AUX_OUTPUT) | Some(command::WRITE_AUX) => {
                self.answer(AUX_NO_ANSWER, Source::AuxTimeout)
            }
            Some(other) => {
                debug_limited!(
                    self.log_limit,
                    "i8042",
                    "i8042: data byte {byte:#04x} for command {other:#04x} ignored"
                );
            }
            None => {
                let translated = self.config & config::TRANSLATE != 0;
                self.keyboard.receive(byte, translated);
                self.refill_output();
            }
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // 0x61..=0x63 are not the controller's (KVM's in-kernel PIT owns 0x61); wide
        // accesses are not the controller's either. Untouched bytes read as 0xff.
        let [byte] = data else {
            debug_limited!(
                self.log_limit,
                "i8042",
                "i8042: ignoring {}-byte read at offset {offset}",
                data.len()
            );
            return;
        };
        match offset {
            DATA_OFFSET => *byte = self.read_data(),
            COMMAND_OFFSET => *byte = self.status(),
            _ => {
                debug_limited!(
                    self.log_limit,
                    "i8042",
                    "i8042: read of unemulated port offset {offset}"
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else {
            debug_limited!(
                self.log_limit,
                "i8042",
                "i8042: ignoring write {data:x?} at offset {offset}"
            );
            return;
        };
        match offset {
            DATA_OFFSET => {
                self.last_write_was_command = false;
                self.write_data(*byte);
            }
            COMMAND_OFFSET => {
                self.last_write_was_command = true;
                self.write_command(*byte);
            }
            _ => {
                debug_limited!(
                    self.log_limit,
                    "i8042",
                    "i8042: ignoring write {byte:#04x} at offset {offset}"
                );
            }
        }
    }
}
