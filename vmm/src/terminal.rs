//! Raw terminal mode while a guest owns the console, restored on every way out.

use std::os::fd::RawFd;

/// Puts a terminal in raw mode and restores the saved settings when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches `fd` to raw mode when it is a terminal; `None` when it is not (a pipe, a file).
    pub fn enable(fd: RawFd) -> std::io::Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so Kiln's own log lines still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Some(Self { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same descriptor.
        if unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) } != 0 {
            log::warn!(
                "could not restore terminal settings: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The key that starts an escape sequence on an interactive console: Ctrl-A, as in QEMU.
pub const ESCAPE_KEY: u8 = 0x01;

/// What the escape filter found in a chunk of console input.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Filtered {
    /// Bytes for the guest.
    pub to_guest: Vec<u8>,
    /// The user typed Ctrl-A x: stop the VM.
    pub quit: bool,
}

/// Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends one Ctrl-A, Ctrl-A with anything else sends
/// both. Needed because raw mode gives every other key, Ctrl-C included, to the guest.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// Filters one chunk; an escape split across chunks is handled.
    pub fn filter(&mut self, input: &[u8]) -> Filtered {
        let mut out = Filtered::default();
        for &byte in input {
            if std::mem::take(&mut self.pending) {
                match byte {
                    b'x' | b'X' => {
                        out.quit = true;
                        return out;
                    }
                    ESCAPE_KEY => out.to_guest.push(ESCAPE_KEY),
                    other => out.to_guest.extend_from_slice(&[ESCAPE_KEY, other]),
                }
            } else if byte == ESCAPE_KEY {
                self.pending = true;
            } else {
                out.to_guest.push(byte);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_input_passes_through() {
        let mut filter = EscapeFilter::default();
        assert_eq!(filter.filter(b"ls -l\r\x03").to_guest, b"ls -l\r\x03");
    }

    #[test]
    fn ctrl_a_x_quits_even_when_split() {
        let mut filter = EscapeFilter::default();
        let first = filter.filter(b"ab\x01");
        assert_eq!(first.to_guest, b"ab");
        assert!(!first.quit);
        let second = filter.filter(b"xcd");
        assert!(second.quit);
        assert!(second.to_guest.is_empty());
    }

    #[test]
    fn ctrl_a_twice_sends_one_and_other_keys_send_both() {
        let mut filter = EscapeFilter::default();
        let out = filter.filter(b"\x01\x01\x01c");
        assert_eq!(out.to_guest, b"\x01\x01c");
        assert!(!out.quit);
    }
}
