//! Where the guest kernel's console goes in command mode: to stderr with `--verbose`, otherwise
//! into a small in-memory tail, so that a guest that ends without reporting the command's status
//! (a panic before pvpanic is up, a reset, a hang until `--timeout`) can still say why.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::RunError;

/// Bytes of console output the tail keeps: with `quiet`, a whole panic report fits.
const TAIL_BYTES: usize = 16 << 10;
/// Lines of the tail shown in an error.
const TAIL_LINES: usize = 25;

/// A pipe whose read end a thread copies to stderr: the guest console for `--verbose`, without
/// touching stderr's own file (the console opens its path with truncation).
pub fn relay_to_stderr() -> Result<PathBuf, RunError> {
    let (reader, writer) = pipe()?;
    let mut reader = File::from(reader);
    std::thread::Builder::new()
        .name("kiln-console".into())
        .spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::stderr());
        })
        .map_err(|err| RunError::Io("starting the console thread", err))?;
    Ok(console_path(writer))
}

/// The last [`TAIL_BYTES`] the guest wrote to its console.
pub struct ConsoleTail {
    shared: Arc<Mutex<Shared>>,
}

/// The pipe's read end (non-blocking) and the tail: only read under the lock, so that a final
/// drain sees every byte the guest wrote.
struct Shared {
    reader: File,
    tail: VecDeque<u8>,
}

impl Shared {
    /// Reads what the pipe holds; false at end of file or on an error.
    fn drain(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.reader.read(&mut chunk) {
                Ok(0) => return false,
                Ok(count) => push_bounded(&mut self.tail, &chunk[..count]),
                Err(err) if err.kind() == ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

impl ConsoleTail {
    /// Starts keeping the tail; the path is the console's (`ConsoleConfig::File`).
    pub fn start() -> Result<(Self, PathBuf), RunError> {
        let (reader, writer) = pipe()?;
        let reader_fd = reader.as_raw_fd();
        // SAFETY: F_SETFL on a descriptor this function owns.
        if unsafe { libc::fcntl(reader_fd, libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(RunError::Io(
                "making the console pipe non-blocking",
                std::io::Error::last_os_error(),
            ));
        }
        let shared = Arc::new(Mutex::new(Shared {
            reader: File::from(reader),
            tail: VecDeque::with_capacity(TAIL_BYTES),
        }));
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("kiln-console".into())
            .spawn(move || loop {
                let mut ready = libc::pollfd {
                    fd: reader_fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll(2) on one live pollfd; the descriptor stays open (owned by
                // `thread_shared`) for as long as this thread runs.
                if unsafe { libc::poll(&mut ready, 1, -1) } < 0 {
                    if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                        continue;
                    }
                    return;
                }
                let mut shared = thread_shared.lock().unwrap_or_else(|p| p.into_inner());
                if !shared.drain() {
                    return;
                }
            })
            .map_err(|err| RunError::Io("starting the console thread", err))?;
        Ok((Self { shared }, console_path(writer)))
    }

    /// The tail's last lines, with everything the guest wrote so far.
    pub fn last_lines(&self) -> String {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.drain();
        let bytes: Vec<u8> = shared.tail.iter().copied().collect();
        last_lines(&String::from_utf8_lossy(&bytes), TAIL_LINES)
    }
}

/// Appends `chunk`, dropping the oldest bytes beyond [`TAIL_BYTES`].
fn push_bounded(tail: &mut VecDeque<u8>, chunk: &[u8]) {
    let chunk = &chunk[chunk.len().saturating_sub(TAIL_BYTES)..];
    let overflow = (tail.len() + chunk.len()).saturating_sub(TAIL_BYTES);
    tail.drain(..overflow);
    tail.extend(chunk);
}

/// The last `count` non-empty lines of `text`, each indented for an error message.
fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| !line.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|line| format!("  | {line}\n"))
        .collect()
}

fn pipe() -> Result<(OwnedFd, OwnedFd), RunError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) into a live two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(RunError::Io(
            "creating the console pipe",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The path the console opens: the write end, kept open for the life of the process (the
/// console thread reads until Kiln exits).
fn console_path(writer: OwnedFd) -> PathBuf {
    let fd = writer.as_raw_fd();
    std::mem::forget(writer);
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_tail_keeps_the_newest_bytes() {
        let mut tail = VecDeque::new();
        push_bounded(&mut tail, &vec![b'a'; TAIL_BYTES - 2]);
        push_bounded(&mut tail, b"bcde");
        assert_eq!(tail.len(), TAIL_BYTES);
        let bytes: Vec<u8> = tail.iter().copied().collect();
        assert_eq!(&bytes[..2], b"aa");
        assert!(bytes.ends_with(b"aabcde"));
        push_bounded(&mut tail, &vec![b'z'; TAIL_BYTES + 5]);
        assert!(tail.iter().all(|&byte| byte == b'z'));
    }

    #[test]
    fn last_lines_skip_blank_ones_and_carriage_returns() {
        let text = "one\r\n\r\ntwo\r\nthree\n";
        assert_eq!(last_lines(text, 2), "  | two\n  | three\n");
        assert_eq!(last_lines("", 3), "");
    }

    #[test]
    fn what_the_guest_wrote_is_in_the_tail() {
        let (tail, path) = ConsoleTail::start().unwrap();
        let mut console = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        console
            .write_all(b"[    0.1] early\nKernel panic - not syncing: test\n")
            .unwrap();
        let lines = tail.last_lines();
        assert!(
            lines.ends_with("  | Kernel panic - not syncing: test\n"),
            "{lines:?}"
        );
    }
}
