//! The AT keyboard behind the i8042's keyboard port: the PS/2 command set a driver uses to find
//! and set up a keyboard, and the scancodes of keys the VMM presses for the user.
//!
//! The keyboard speaks scancode set 2, the power-on default. When the controller translates
//! (its configuration byte has `XLATE` set, as firmware leaves it), the guest sees set 1; the
//! keyboard then produces the set-1 bytes of the keys it sends directly, which is what the
//! controller's translation would turn the set-2 bytes into.

use std::collections::VecDeque;

/// Bytes the keyboard holds for the controller; a real keyboard buffers 16.
pub const KEYBOARD_BUFFER_SIZE: usize = 16;

/// Acknowledge: the keyboard took a command or parameter.
pub const ACK: u8 = 0xfa;
/// Resend: the keyboard did not accept the byte (Kiln: an unsupported command or value).
pub const RESEND: u8 = 0xfe;
/// Basic assurance test passed (sent after a reset).
pub const BAT_OK: u8 = 0xaa;
/// First byte of an MF2 keyboard's id.
pub const ID_MF2: u8 = 0xab;
/// Second id byte of an MF2 keyboard as the keyboard sends it.
pub const ID_MF2_RAW: u8 = 0x83;
/// The same byte after the controller's set-2 to set-1 translation.
pub const ID_MF2_TRANSLATED: u8 = 0x41;

/// Host-to-keyboard commands (written to the controller's data port).
pub mod command {
    /// Set the LEDs; a parameter byte follows.
    pub const SET_LEDS: u8 = 0xed;
    /// Echo: the keyboard answers 0xEE.
    pub const ECHO: u8 = 0xee;
    /// Get or set the scancode set; a parameter byte follows (0: get).
    pub const SCANCODE_SET: u8 = 0xf0;
    /// Identify: ACK and the two id bytes.
    pub const GET_ID: u8 = 0xf2;
    /// Set the typematic rate and delay; a parameter byte follows.
    pub const SET_TYPEMATIC: u8 = 0xf3;
    /// Start scanning (sending keys).
    pub const ENABLE: u8 = 0xf4;
    /// Restore defaults and stop scanning.
    pub const DISABLE: u8 = 0xf5;
    /// Restore defaults.
    pub const SET_DEFAULTS: u8 = 0xf6;
    /// Send the last byte again.
    pub const RESEND: u8 = 0xfe;
    /// Reset and self-test: ACK, then 0xAA.
    pub const RESET: u8 = 0xff;
}

/// The only scancode set the keyboard speaks.
const SCANCODE_SET_2: u8 = 2;
/// Prefix of an extended key's scancodes, in both sets.
const EXTENDED_PREFIX: u8 = 0xe0;
/// Set 2: the byte before a key's make code that turns it into its break code.
const SET2_BREAK_PREFIX: u8 = 0xf0;
/// Set 1: the bit that turns a make code into its break code.
const SET1_BREAK_BIT: u8 = 0x80;

/// One key on the keyboard, by its make code in each set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// Sent with the 0xE0 prefix.
    pub extended: bool,
    /// Make code in scancode set 1 (what the guest sees through translation).
    pub set1: u8,
    /// Make code in scancode set 2.
    pub set2: u8,
}

/// Left Ctrl.
pub const KEY_LEFT_CTRL: Key = Key {
    extended: false,
    set1: 0x1d,
    set2: 0x14,
};
/// Left Alt.
pub const KEY_LEFT_ALT: Key = Key {
    extended: false,
    set1: 0x38,
    set2: 0x11,
};
/// Delete (the extended key, not keypad '.').
pub const KEY_DELETE: Key = Key {
    extended: true,
    set1: 0x53,
    set2: 0x71,
};

/// Whether a key goes down or comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAction {
    /// Pressed: its make code.
    Press,
    /// Released: its break code.
    Release,
}

/// The bytes for one key event: set 1 when `translated`, else set 2.
pub fn scancode(key: Key, action: KeyAction, translated: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(3);
    if key.extended {
        bytes.push(EXTENDED_PREFIX);
    }
    match (translated, action) {
        (true, KeyAction::Press) => bytes.push(key.set1),
        (true, KeyAction::Release) => bytes.push(key.set1 | SET1_BREAK_BIT),
        (false, KeyAction::Press) => bytes.push(key.set2),
        (false, KeyAction::Release) => bytes.extend([SET2_BREAK_PREFIX, key.set2]),
    }
    bytes
}

/// Why the keyboard did not take keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyboardError {
    /// The guest's driver turned scanning off (command 0xF5) and has not turned it back on.
    #[error("the guest has disabled its keyboard")]
    Disabled,
    /// The guest has not read earlier keys yet (it may have no keyboard driver).
    #[error("the keyboard buffer is full: the guest is not reading its keyboard")]
    BufferFull,
}

/// The keyboard's state.
#[derive(Debug)]
pub struct Keyboard {
    /// Bytes for the controller, oldest first.
    pub(super) output: VecDeque<u8>,
    /// A command that waits for its parameter byte.
    pub(super) awaiting_parameter: Option<u8>,
    /// Sending keys (on at power-on, off after 0xF5, on after 0xF4 or a reset).
    pub(super) scanning: bool,
    /// LED state from the last 0xED (kept for the guest, not shown anywhere).
    pub(super) leds: u8,
    /// The last byte sent, for the 0xFE resend command.
    pub(super) last_sent: u8,
}

impl Default for Keyboard {
    fn default() -> Self {
        Self::new()
    }
}

impl Keyboard {
    /// A keyboard after power-on: scanning, nothing to send.
    pub fn new() -> Self {
        Self {
            output: VecDeque::with_capacity(KEYBOARD_BUFFER_SIZE),
            awaiting_parameter: None,
            scanning: true,
            leds: 0,
            last_sent: 0,
        }
    }

    /// The next byte for the controller.
    pub fn pop(&mut self) -> Option<u8> {
        let byte = self.output.pop_front()?;
        self.last_sent = byte;
        Some(byte)
    }

    /// True when the keyboard has a byte for the controller.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// LED bits last set by the guest (bit 0 Scroll Lock, 1 Num Lock, 2 Caps Lock).
    pub fn leds(&self) -> u8 {
        self.leds
    }

    /// True while the keyboard sends keys.
    pub fn scanning(&self) -> bool {
        self.scanning
    }

    /// Queues the scancodes of `events`, all or none. `translated`: the controller translates
    /// to set 1, so the set-1 bytes are queued.
    pub fn send_keys(
        &mut self,
        events: &[(Key, KeyAction)],
        translated: bool,
    ) -> Result<(), KeyboardError> {
        if !self.scanning {
            return Err(KeyboardError::Disabled);
        }
        let bytes: Vec<u8> = events
            .iter()
            .flat_map(|&(key, action)| scancode(key, action, translated))
            .collect();
        if self.output.len() + bytes.len() > KEYBOARD_BUFFER_SIZE {
            return Err(KeyboardError::BufferFull);
        }
        self.output.extend(bytes);
        Ok(())
    }

    /// Takes one byte the host sent to the keyboard and queues the keyboard's answer.
    /// `translated` is whether the controller translates (it changes the id's second byte).
    pub fn receive(&mut self, byte: u8, translated: bool) {
        if let Some(command) = self.awaiting_parameter.take() {
            if self.parameter(command, byte) {
                return;
            }
            // Not a valid parameter: a new command (as keyboards treat any byte >= 0xED).
        }
        if byte == command::RESEND {
            let last = self.last_sent;
            self.reply(&[last]);
            return;
        }
        // A command discards whatever the keyboard had not sent yet.
        self.output.clear();
        match byte {
            command::SET_LEDS | command::SET_TYPEMATIC | command::SCANCODE_SET => {
                self.awaiting_parameter = Some(byte);
                self.reply(&[ACK]);
            }
            command::ECHO => self.reply(&[command::ECHO]),
            command::GET_ID => {
                let second = if translated {
                    ID_MF2_TRANSLATED
                } else {
                    ID_MF2_RAW
                };
                self.reply(&[ACK, ID_MF2, second]);
            }
            command::ENABLE => {
                self.scanning = true;
                self.reply(&[ACK]);
            }
            command::DISABLE => {
                self.set_defaults();
                self.scanning = false;
                self.reply(&[ACK]);
            }
            command::SET_DEFAULTS => {
                self.set_defaults();
                self.reply(&[ACK]);
            }
            // Scancode-set-3 key type commands: accepted, they change nothing in set 2.
            0xf7..=0xfd => self.reply(&[ACK]),
            command::RESET => {
                self.set_defaults();
                self.scanning = true;
                self.reply(&[ACK, BAT_OK]);
            }
            _ => self.reply(&[RESEND]),
        }
    }

    /// Handles the parameter of `command`; false if `value` is not one (then it is a command).
    fn parameter(&mut self, command: u8, value: u8) -> bool {
        match command {
            command::SET_LEDS if value < command::SET_LEDS => {
                self.leds = value & 0x07;
                self.reply(&[ACK]);
            }
            command::SET_TYPEMATIC if value < 0x80 => self.reply(&[ACK]),
            command::SCANCODE_SET if value == 0 => self.reply(&[ACK, SCANCODE_SET_2]),
            command::SCANCODE_SET if value == SCANCODE_SET_2 => self.reply(&[ACK]),
            // Sets 1 and 3 are not spoken: refused, so the driver keeps set 2.
            command::SCANCODE_SET if value <= 3 => self.reply(&[RESEND]),
            _ => return false,
        }
        true
    }

    fn set_defaults(&mut self) {
        self.leds = 0;
        self.awaiting_parameter = None;
    }

    fn reply(&mut self, bytes: &[u8]) {
        // Replies follow a command, which emptied the buffer, so they always fit.
        for &byte in bytes {
            if self.output.len() < KEYBOARD_BUFFER_SIZE {
                self.output.push_back(byte);
            }
        }
    }
}
