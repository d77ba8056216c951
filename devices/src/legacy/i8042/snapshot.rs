//! The controller's and keyboard's state in a VM snapshot: every register the guest can read
//! back and every byte still queued for it, so a restored guest finds the controller exactly
//! as it left it (mid-command, with unread answers or keys).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::keyboard::{Keyboard, KEYBOARD_BUFFER_SIZE};
use super::{I8042Device, Source, MAX_ANSWERS};
use crate::exit::ExitNotifier;
use crate::log_limit::LogLimiter;

/// The i8042 controller's state as a snapshot carries it (opaque: only this module reads it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042Snapshot {
    config: u8,
    output_port: u8,
    output: Option<(u8, Source)>,
    last_output: u8,
    controller_output: Vec<(u8, Source)>,
    awaiting_data: Option<u8>,
    last_write_was_command: bool,
    keyboard: KeyboardSnapshot,
}

/// The keyboard's part of [`I8042Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyboardSnapshot {
    output: Vec<u8>,
    awaiting_parameter: Option<u8>,
    scanning: bool,
    leds: u8,
    last_sent: u8,
}

/// A snapshot's i8042 state that this controller could never have been in.
#[derive(Debug, thiserror::Error)]
pub enum I8042RestoreError {
    /// More queued controller answers than the controller keeps.
    #[error("the i8042 controller has {0} queued answers, more than the {MAX_ANSWERS} it keeps")]
    TooManyAnswers(usize),
    /// More queued keyboard bytes than the keyboard's buffer holds.
    #[error("the keyboard has {0} queued bytes, more than its {KEYBOARD_BUFFER_SIZE}-byte buffer")]
    KeyboardBufferTooLong(usize),
}

impl I8042Device {
    /// The controller's and keyboard's state, for a snapshot.
    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            config: self.config,
            output_port: self.output_port,
            output: self.output,
            last_output: self.last_output,
            controller_output: self.controller_output.iter().copied().collect(),
            awaiting_data: self.awaiting_data,
            last_write_was_command: self.last_write_was_command,
            keyboard: KeyboardSnapshot {
                output: self.keyboard.output.iter().copied().collect(),
                awaiting_parameter: self.keyboard.awaiting_parameter,
                scanning: self.keyboard.scanning,
                leds: self.keyboard.leds,
                last_sent: self.keyboard.last_sent,
            },
        }
    }

    /// A controller in the state of `snapshot`, without a keyboard interrupt (add it with
    /// [`I8042Device::with_keyboard_interrupt`]). No interrupt is raised for a byte already in
    /// the output buffer: the restored interrupt controllers hold whatever was pending.
    pub fn restore(
        snapshot: &I8042Snapshot,
        exit: ExitNotifier,
    ) -> Result<Self, I8042RestoreError> {
        if snapshot.controller_output.len() > MAX_ANSWERS {
            return Err(I8042RestoreError::TooManyAnswers(
                snapshot.controller_output.len(),
            ));
        }
        let keyboard = &snapshot.keyboard;
        if keyboard.output.len() > KEYBOARD_BUFFER_SIZE {
            return Err(I8042RestoreError::KeyboardBufferTooLong(
                keyboard.output.len(),
            ));
        }
        let mut restored_keyboard = Keyboard::new();
        restored_keyboard.output = keyboard.output.iter().copied().collect();
        restored_keyboard.awaiting_parameter = keyboard.awaiting_parameter;
        restored_keyboard.scanning = keyboard.scanning;
        restored_keyboard.leds = keyboard.leds;
        restored_keyboard.last_sent = keyboard.last_sent;
        Ok(Self {
            exit,
            keyboard_interrupt: None,
            config: snapshot.config,
            output_port: snapshot.output_port,
            output: snapshot.output,
            last_output: snapshot.last_output,
            controller_output: snapshot
                .controller_output
                .iter()
                .copied()
                .collect::<VecDeque<_>>(),
            awaiting_data: snapshot.awaiting_data,
            last_write_was_command: snapshot.last_write_was_command,
            keyboard: restored_keyboard,
            log_limit: LogLimiter::new(),
            interrupt_error_logged: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;
    use crate::bus::BusDevice;
    use crate::legacy::i8042::keyboard::{command as kbd, ACK};
    use crate::legacy::i8042::{command, config, COMMAND_OFFSET, DATA_OFFSET};
    use crate::legacy::serial::EventFdTrigger;

    fn read(device: &mut I8042Device, offset: u64) -> u8 {
        let mut byte = [0u8];
        device.read(offset, &mut byte);
        byte[0]
    }

    /// Status and data bytes until the output buffer stays empty (at most 32).
    fn drain(device: &mut I8042Device) -> Vec<(u8, u8)> {
        let mut bytes = Vec::new();
        for _ in 0..32 {
            let status = read(device, COMMAND_OFFSET);
            if status & 0x01 == 0 {
                break;
            }
            bytes.push((status, read(device, DATA_OFFSET)));
        }
        bytes
    }

    /// A controller caught mid-conversation: keys queued behind an unread controller answer,
    /// the keyboard waiting for a LED parameter, the controller waiting for a data byte.
    fn busy_controller() -> I8042Device {
        let mut device = I8042Device::new(ExitNotifier::new().unwrap());
        device.write(COMMAND_OFFSET, &[command::WRITE_CONFIG]);
        device.write(
            DATA_OFFSET,
            &[config::KEYBOARD_INTERRUPT | config::SYSTEM | config::TRANSLATE],
        );
        device.write(DATA_OFFSET, &[kbd::SET_LEDS]);
        assert_eq!(read(&mut device, DATA_OFFSET), ACK);
        device.send_ctrl_alt_del().unwrap();
        device.write(COMMAND_OFFSET, &[command::READ_CONFIG]);
        device.write(COMMAND_OFFSET, &[command::WRITE_OUTPUT_PORT]);
        device
    }

    #[test]
    fn state_round_trips_and_the_restored_controller_behaves_the_same() {
        let mut original = busy_controller();
        let saved = original.snapshot();
        let json = serde_json::to_string(&saved).unwrap();
        let back: I8042Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut restored = I8042Device::restore(&back, ExitNotifier::new().unwrap())
            .unwrap()
            .with_keyboard_interrupt(EventFdTrigger::new(irq.try_clone().unwrap()));
        assert_eq!(restored.snapshot(), saved);
        // No interrupt of its own on restore: the restored PIC/IOAPIC hold what was pending.
        assert!(irq.read().is_err());

        // The same conversation goes on in both: the pending data byte, the LED parameter,
        // then every queued byte in the same order with the same status.
        for device in [&mut original, &mut restored] {
            device.write(DATA_OFFSET, &[0x03]);
        }
        assert_eq!(drain(&mut restored), drain(&mut original));
        for device in [&mut original, &mut restored] {
            device.write(DATA_OFFSET, &[0x07]);
        }
        let answers = drain(&mut restored);
        assert_eq!(answers, drain(&mut original));
        assert_eq!(answers.last().map(|&(_, byte)| byte), Some(ACK));
        assert_eq!(restored.keyboard.leds(), 0x07);
        assert!(
            irq.read().unwrap() > 0,
            "keyboard bytes raise IRQ 1 after restore"
        );
    }

    #[test]
    fn impossible_queue_lengths_are_refused() {
        let saved = serde_json::to_value(busy_controller().snapshot()).unwrap();
        let mut answers = saved.clone();
        answers["controller_output"] =
            serde_json::json!(vec![serde_json::json!([0, "Controller"]); 5]);
        let answers: I8042Snapshot = serde_json::from_value(answers).unwrap();
        let err = I8042Device::restore(&answers, ExitNotifier::new().unwrap()).unwrap_err();
        assert!(matches!(err, I8042RestoreError::TooManyAnswers(5)), "{err}");

        let mut keys = saved;
        keys["keyboard"]["output"] = serde_json::json!(vec![0x1d; 17]);
        let keys: I8042Snapshot = serde_json::from_value(keys).unwrap();
        let err = I8042Device::restore(&keys, ExitNotifier::new().unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the keyboard has 17 queued bytes, more than its 16-byte buffer"
        );
    }
}
