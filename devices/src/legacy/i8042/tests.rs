//! The i8042 driven as Linux 6.1's i8042 and atkbd drivers drive it.

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::keyboard::{self, KeyboardError, ACK, BAT_OK, ID_MF2, RESEND};
use super::*;

struct Guest {
    i8042: I8042Device,
    exit: ExitNotifier,
    irq: EventFd,
}

impl Guest {
    fn new() -> Self {
        let exit = ExitNotifier::new().unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let i8042 = I8042Device::new(exit.clone())
            .with_keyboard_interrupt(EventFdTrigger::new(irq.try_clone().unwrap()));
        Self { i8042, exit, irq }
    }

    fn status(&mut self) -> u8 {
        let mut byte = [0u8];
        self.i8042.read(COMMAND_OFFSET, &mut byte);
        byte[0]
    }

    fn read_data(&mut self) -> u8 {
        let mut byte = [0u8];
        self.i8042.read(DATA_OFFSET, &mut byte);
        byte[0]
    }

    fn write_command(&mut self, command: u8) {
        assert_eq!(self.status() & status::INPUT_FULL, 0, "i8042_wait_write");
        self.i8042.write(COMMAND_OFFSET, &[command]);
    }

    fn write_data(&mut self, byte: u8) {
        assert_eq!(self.status() & status::INPUT_FULL, 0, "i8042_wait_write");
        self.i8042.write(DATA_OFFSET, &[byte]);
    }

    /// `i8042_wait_read` + read: the next output byte, which must be there already (a model
    /// that makes the guest wait would cost it 0.5 s per byte).
    fn expect_output(&mut self) -> (u8, u8) {
        let status = self.status();
        assert_ne!(status & status::OUTPUT_FULL, 0, "no output byte");
        (self.read_data(), status)
    }

    /// `i8042_command`: a command, its parameter bytes, its answer bytes.
    fn command(&mut self, command: u8, params: &[u8], answers: usize) -> Vec<u8> {
        self.write_command(command);
        for &param in params {
            self.write_data(param);
        }
        (0..answers).map(|_| self.expect_output().0).collect()
    }

    /// `i8042_flush`: reads until the output buffer is empty.
    fn flush(&mut self) -> Vec<u8> {
        let mut flushed = Vec::new();
        while self.status() & status::OUTPUT_FULL != 0 {
            flushed.push(self.read_data());
            assert!(flushed.len() <= 16, "the output buffer never empties");
        }
        flushed
    }

    /// Keyboard interrupts raised since the last call.
    fn interrupts(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// What the interrupt handler reads after one interrupt per byte: `count` bytes.
    fn keyboard_bytes(&mut self, count: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..count {
            assert_eq!(self.interrupts(), 1, "one IRQ 1 per keyboard byte");
            let (byte, status) = self.expect_output();
            assert_eq!(status & status::AUX_DATA, 0);
            bytes.push(byte);
        }
        assert_eq!(self.interrupts(), 0);
        bytes
    }

    /// `i8042_init` and `i8042_probe` (x86, no quirks), then the keyboard port enabled.
    fn linux_probe(&mut self) {
        // i8042_controller_check: nothing to flush (an absent controller reads 0xff).
        assert_eq!(self.flush(), Vec::<u8>::new());
        // i8042_platform_init: A20 through the output port, then the "null command".
        self.command(command::WRITE_OUTPUT_PORT, &[0xdf], 0);
        self.command(0xff, &[], 0);
        // i8042_controller_init: a stable configuration byte, keyboard off, written back.
        let ctr = self.command(command::READ_CONFIG, &[], 1)[0];
        assert_eq!(self.command(command::READ_CONFIG, &[], 1)[0], ctr);
        assert_ne!(ctr & config::TRANSLATE, 0, "firmware leaves translation on");
        assert_ne!(self.status() & status::UNLOCKED, 0, "no 'Keylock active'");
        let ctr = (ctr | config::KEYBOARD_DISABLED) & !config::KEYBOARD_INTERRUPT;
        self.command(command::WRITE_CONFIG, &[ctr], 0);
        assert_eq!(self.flush(), Vec::<u8>::new());
        // i8042_check_aux: the loopback fails, then the AUX interface test: no AUX port.
        let looped = self.command(command::WRITE_AUX_OUTPUT, &[0x5a], 0);
        assert!(looped.is_empty());
        let (byte, status) = self.expect_output();
        assert_ne!(byte, 0x5a, "loopback must fail");
        assert_eq!(
            status & (status::AUX_DATA | status::TIMEOUT),
            status::AUX_DATA | status::TIMEOUT
        );
        let test = self.command(command::TEST_AUX, &[], 1)[0];
        assert!(
            test != 0 && test != 0xfa && test != 0xff,
            "AUX test {test:#x}"
        );
        // i8042_setup_kbd: keyboard port on, with its interrupt.
        let ctr = (ctr & !config::KEYBOARD_DISABLED) | config::KEYBOARD_INTERRUPT;
        self.command(command::WRITE_CONFIG, &[ctr], 0);
        assert_eq!(self.command(command::READ_CONFIG, &[], 1)[0], ctr);
        assert_eq!(self.interrupts(), 0, "controller answers raise no IRQ");
    }

    /// atkbd_connect: probe (id, disable), set LEDs and rate, enable. Every byte comes through
    /// IRQ 1, at once.
    fn atkbd_connect(&mut self) {
        self.write_data(keyboard::command::GET_ID);
        assert_eq!(
            self.keyboard_bytes(3),
            [ACK, ID_MF2, keyboard::ID_MF2_TRANSLATED]
        );
        self.write_data(keyboard::command::DISABLE);
        assert_eq!(self.keyboard_bytes(1), [ACK]);
        for (command, param) in [
            (keyboard::command::SET_LEDS, 0),
            (keyboard::command::SET_TYPEMATIC, 0),
        ] {
            self.write_data(command);
            assert_eq!(self.keyboard_bytes(1), [ACK]);
            self.write_data(param);
            assert_eq!(self.keyboard_bytes(1), [ACK]);
        }
        self.write_data(keyboard::command::ENABLE);
        assert_eq!(self.keyboard_bytes(1), [ACK]);
    }
}

#[test]
fn linux_probe_gets_every_answer_at_once() {
    let mut guest = Guest::new();
    guest.linux_probe();
    guest.atkbd_connect();
    assert_eq!(guest.exit.reason(), None);
}

#[test]
fn self_test_and_interface_tests_pass() {
    let mut guest = Guest::new();
    assert_eq!(
        guest.command(command::SELF_TEST, &[], 1),
        [SELF_TEST_PASSED]
    );
    assert_ne!(guest.status() & status::SYSTEM, 0);
    assert_eq!(guest.command(command::TEST_KEYBOARD, &[], 1), [0]);
    assert_eq!(
        guest.command(command::TEST_AUX, &[], 1),
        [AUX_TEST_CLOCK_STUCK_LOW]
    );
    assert_eq!(guest.command(command::PASSWORD_INSTALLED, &[], 1), [0xf1]);
    // Output port: the A20 write is read back.
    guest.command(command::WRITE_OUTPUT_PORT, &[0xdf], 0);
    assert_eq!(guest.command(command::READ_OUTPUT_PORT, &[], 1), [0xdf]);
    assert_eq!(guest.exit.reason(), None);
}

#[test]
fn configuration_byte_is_read_back_and_the_aux_bit_toggles() {
    let mut guest = Guest::new();
    guest.command(command::WRITE_CONFIG, &[0x47], 0);
    assert_eq!(guest.command(command::READ_CONFIG, &[], 1), [0x47]);
    // i8042_toggle_aux
    guest.command(command::DISABLE_AUX, &[], 0);
    assert_eq!(guest.command(command::READ_CONFIG, &[], 1), [0x67]);
    guest.command(command::ENABLE_AUX, &[], 0);
    assert_eq!(guest.command(command::READ_CONFIG, &[], 1), [0x47]);
    guest.command(command::DISABLE_KEYBOARD, &[], 0);
    assert_eq!(guest.command(command::READ_CONFIG, &[], 1), [0x57]);
    // System flag off in the configuration byte: off in the status register too.
    guest.command(command::WRITE_CONFIG, &[0x41], 0);
    assert_eq!(guest.status() & status::SYSTEM, 0);
    // Status bit 3 tells which port was written last.
    assert_eq!(guest.status() & status::COMMAND, 0);
    guest.write_command(command::ENABLE_KEYBOARD);
    assert_eq!(guest.status() & status::COMMAND, status::COMMAND);
}

#[test]
fn reset_command_requests_reset() {
    let mut guest = Guest::new();
    // Linux's kb_wait(): poll the status port until the input buffer is empty.
    guest.write_command(command::PULSE_RESET);
    assert_eq!(guest.exit.reason(), Some(StopReason::Reset));
    assert_eq!(guest.exit.eventfd().read().unwrap(), 1);
}

#[test]
fn output_port_reset_line_requests_reset() {
    let mut guest = Guest::new();
    guest.command(command::WRITE_OUTPUT_PORT, &[0xfe], 0);
    assert_eq!(guest.exit.reason(), Some(StopReason::Reset));
}

#[test]
fn commands_that_do_not_pull_the_reset_line_do_not_reset() {
    let mut guest = Guest::new();
    // 0xFE on the data port goes to the keyboard (resend), pulse commands with bit 0 set,
    // unknown commands, a wide write of 0xFE.
    guest.i8042.write(DATA_OFFSET, &[command::PULSE_RESET]);
    for command in [0xff, 0xf1, 0xfd, 0x00, 0xc8] {
        guest.write_command(command);
    }
    guest
        .i8042
        .write(COMMAND_OFFSET, &[command::PULSE_RESET, 0]);
    guest.i8042.write(2, &[command::PULSE_RESET]);
    assert_eq!(guest.exit.reason(), None);
    // The data port's write reached the keyboard, which resent its last byte (none yet: 0).
    assert_eq!(guest.keyboard_bytes(1), [0]);
}

#[test]
fn ctrl_alt_del_sends_set_1_scancodes_through_translation() {
    let mut guest = Guest::new();
    guest.linux_probe();
    guest.atkbd_connect();
    guest.i8042.send_ctrl_alt_del().unwrap();
    assert_eq!(
        guest.keyboard_bytes(8),
        [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
    );
}

#[test]
fn ctrl_alt_del_sends_set_2_scancodes_without_translation() {
    let mut guest = Guest::new();
    guest.command(
        command::WRITE_CONFIG,
        &[config::KEYBOARD_INTERRUPT | config::SYSTEM],
        0,
    );
    guest.write_data(keyboard::command::GET_ID);
    assert_eq!(guest.keyboard_bytes(3), [ACK, ID_MF2, keyboard::ID_MF2_RAW]);
    guest.i8042.send_ctrl_alt_del().unwrap();
    assert_eq!(
        guest.keyboard_bytes(11),
        [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
    );
}

#[test]
fn ctrl_alt_del_is_refused_whole_when_the_guest_does_not_read() {
    let mut guest = Guest::new();
    // The first byte moves to the output buffer; 16 more fit in the keyboard.
    guest.i8042.send_ctrl_alt_del().unwrap();
    guest.i8042.send_ctrl_alt_del().unwrap();
    assert_eq!(
        guest.i8042.send_ctrl_alt_del(),
        Err(KeyboardError::BufferFull)
    );
    let mut bytes = vec![];
    while guest.status() & status::OUTPUT_FULL != 0 {
        bytes.push(guest.read_data());
    }
    assert_eq!(bytes.len(), 16, "two whole sequences, nothing of the third");
    assert_eq!(bytes[..8], bytes[8..]);
}

#[test]
fn ctrl_alt_del_is_refused_while_the_guest_has_the_keyboard_off() {
    let mut guest = Guest::new();
    guest.linux_probe();
    guest.write_data(keyboard::command::DISABLE);
    assert_eq!(guest.keyboard_bytes(1), [ACK]);
    assert_eq!(
        guest.i8042.send_ctrl_alt_del(),
        Err(KeyboardError::Disabled)
    );
    assert_eq!(guest.status() & status::OUTPUT_FULL, 0);
}

#[test]
fn keys_wait_while_the_keyboard_interface_is_disabled() {
    let mut guest = Guest::new();
    guest.command(command::DISABLE_KEYBOARD, &[], 0);
    guest.i8042.send_ctrl_alt_del().unwrap();
    assert_eq!(guest.status() & status::OUTPUT_FULL, 0);
    assert_eq!(guest.interrupts(), 0);
    guest.command(command::ENABLE_KEYBOARD, &[], 0);
    assert_eq!(guest.keyboard_bytes(8)[0], 0x1d);
}

#[test]
fn interrupt_waits_for_the_guest_to_enable_it() {
    let mut guest = Guest::new();
    guest.command(command::WRITE_CONFIG, &[config::TRANSLATE], 0);
    guest.i8042.send_ctrl_alt_del().unwrap();
    assert_eq!(guest.interrupts(), 0);
    assert_ne!(guest.status() & status::OUTPUT_FULL, 0);
    guest.command(
        command::WRITE_CONFIG,
        &[config::TRANSLATE | config::KEYBOARD_INTERRUPT],
        0,
    );
    assert_eq!(guest.keyboard_bytes(8)[0], 0x1d);
}

#[test]
fn keyboard_commands() {
    let mut guest = Guest::new();
    guest.write_data(keyboard::command::RESET);
    assert_eq!(guest.keyboard_bytes(2), [ACK, BAT_OK]);
    guest.write_data(keyboard::command::ECHO);
    assert_eq!(guest.keyboard_bytes(1), [keyboard::command::ECHO]);
    // Resend repeats the last byte.
    guest.write_data(keyboard::command::RESEND);
    assert_eq!(guest.keyboard_bytes(1), [keyboard::command::ECHO]);
    // Scancode set: get answers 2; set 2 is taken, set 3 refused.
    guest.write_data(keyboard::command::SCANCODE_SET);
    guest.write_data(0);
    assert_eq!(guest.keyboard_bytes(3), [ACK, ACK, 2]);
    guest.write_data(keyboard::command::SCANCODE_SET);
    guest.write_data(2);
    assert_eq!(guest.keyboard_bytes(2), [ACK, ACK]);
    guest.write_data(keyboard::command::SCANCODE_SET);
    guest.write_data(3);
    assert_eq!(guest.keyboard_bytes(2), [ACK, RESEND]);
    // LEDs are kept; an unknown command is refused.
    guest.write_data(keyboard::command::SET_LEDS);
    guest.write_data(0x05);
    assert_eq!(guest.keyboard_bytes(2), [ACK, ACK]);
    assert_eq!(guest.i8042.keyboard.leds(), 0x05);
    guest.write_data(0xe8);
    assert_eq!(guest.keyboard_bytes(1), [RESEND]);
}

#[test]
fn loopback_through_the_keyboard_port_raises_its_interrupt() {
    let mut guest = Guest::new();
    guest.command(command::WRITE_KEYBOARD_OUTPUT, &[0x42], 0);
    assert_eq!(guest.keyboard_bytes(1), [0x42]);
}

#[test]
fn bytes_sent_to_the_aux_port_time_out() {
    let mut guest = Guest::new();
    guest.command(command::WRITE_AUX, &[0xf2], 0);
    let (byte, status) = guest.expect_output();
    assert_eq!(byte, AUX_NO_ANSWER);
    assert_ne!(status & status::TIMEOUT, 0);
    assert_eq!(guest.interrupts(), 0);
}

#[test]
fn a_guest_that_never_reads_cannot_grow_the_device() {
    let mut guest = Guest::new();
    for _ in 0..10_000 {
        guest.write_command(command::READ_CONFIG);
        guest.write_data(keyboard::command::RESET);
    }
    assert!(guest.flush().len() <= 16);
}

#[test]
fn empty_output_buffer_reads_the_last_byte_and_other_ports_are_ignored() {
    let mut guest = Guest::new();
    assert_eq!(
        guest.command(command::SELF_TEST, &[], 1),
        [SELF_TEST_PASSED]
    );
    assert_eq!(guest.read_data(), SELF_TEST_PASSED);
    for offset in [1, 2, 3] {
        let mut byte = [0xffu8];
        guest.i8042.read(offset, &mut byte);
        assert_eq!(byte, [0xff]);
    }
    let mut wide = [0xffu8; 2];
    guest.i8042.read(DATA_OFFSET, &mut wide);
    assert_eq!(wide, [0xff, 0xff]);
}

#[test]
fn without_an_interrupt_line_the_keyboard_can_be_polled() {
    let exit = ExitNotifier::new().unwrap();
    let mut i8042 = I8042Device::new(exit);
    i8042.send_ctrl_alt_del().unwrap();
    let mut status_byte = [0u8];
    i8042.read(COMMAND_OFFSET, &mut status_byte);
    assert_ne!(status_byte[0] & status::OUTPUT_FULL, 0);
    let mut data = [0u8];
    i8042.read(DATA_OFFSET, &mut data);
    assert_eq!(data, [0x1d]);
}
