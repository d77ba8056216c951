//! Firecracker's host-initiated connection handshake on the vsock Unix socket: the host client
//! writes `CONNECT <port>\n`; Kiln answers `OK <host-port>\n` once the guest accepted, or closes
//! the socket.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Longest `CONNECT` line accepted, newline included (`CONNECT 4294967295\n` is 19 bytes).
pub const MAX_LINE: usize = 32;

/// A host client that connected and has not sent its whole `CONNECT` line yet.
#[derive(Debug)]
pub struct Handshake {
    /// The client's socket.
    pub stream: UnixStream,
    /// When Kiln gives up on the line.
    pub deadline: Instant,
    /// The socket has news (data, EOF) that was not looked at yet.
    pub readable: bool,
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed before finishing the line.
    #[error("the client closed the connection before sending a CONNECT line")]
    Closed,
    /// No newline within [`MAX_LINE`] bytes.
    #[error("no CONNECT line within {MAX_LINE} bytes")]
    TooLong,
    /// A line that is not `CONNECT <port>`.
    #[error("expected 'CONNECT <port>', got {0:?}")]
    Malformed(String),
    /// Reading failed.
    #[error("cannot read the CONNECT line: {0}")]
    Io(String),
}

/// Parses one line (without its newline): `CONNECT <port>`, the port a decimal `u32`.
pub fn parse_connect_line(line: &[u8]) -> Result<u32, HandshakeError> {
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let (command, port) = text.split_once(' ').ok_or_else(malformed)?;
    if command != "CONNECT" {
        return Err(malformed());
    }
    let port = port.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    port.parse::<u32>().map_err(|_| malformed())
}

impl Handshake {
    /// Reads the `CONNECT` line if it is all there, consuming exactly the line: anything the
    /// client sent after it stays in the socket as the first data for the guest. `Ok(None)`:
    /// not complete yet.
    pub fn read_line(&mut self) -> Result<Option<u32>, HandshakeError> {
        let mut peeked = [0u8; MAX_LINE + 1];
        let got = recv(&self.stream, &mut peeked, libc::MSG_PEEK)?;
        let Some(got) = got else {
            self.readable = false;
            return Ok(None);
        };
        if got == 0 {
            return Err(HandshakeError::Closed);
        }
        let Some(newline) = peeked[..got].iter().position(|&b| b == b'\n') else {
            if got > MAX_LINE - 1 {
                return Err(HandshakeError::TooLong);
            }
            // Wait for the rest; its arrival is a new readiness edge.
            self.readable = false;
            return Ok(None);
        };
        let mut line = vec![0u8; newline + 1];
        match recv(&self.stream, &mut line, 0)? {
            Some(n) if n == line.len() => parse_connect_line(&line[..newline]).map(Some),
            _ => Err(HandshakeError::Io(
                "the line vanished between peek and read".into(),
            )),
        }
    }
}

/// `recv(2)` without blocking: `Ok(None)` when nothing is there.
fn recv(stream: &UnixStream, buf: &mut [u8], flags: i32) -> Result<Option<usize>, HandshakeError> {
    loop {
        // SAFETY: recv(2) writes at most buf.len() bytes into the live buffer `buf`; the fd is
        // owned by `stream` for the duration of the call.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags | libc::MSG_DONTWAIT,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            return Ok(Some(n));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(HandshakeError::Io(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn connect_lines_parse_or_are_refused_with_the_line() {
        assert_eq!(parse_connect_line(b"CONNECT 52"), Ok(52));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\r"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT"[..],
            b"CONNECT ",
            b"connect 52",
            b"CONNECT 4294967296",
            b"CONNECT -1",
            b"CONNECT 5x",
            b"LISTEN 52",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse_connect_line(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    fn pair() -> (Handshake, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let handshake = Handshake {
            stream: ours,
            deadline: Instant::now() + Duration::from_secs(5),
            readable: true,
        };
        (handshake, theirs)
    }

    #[test]
    fn the_line_is_consumed_and_data_after_it_stays() {
        let (mut handshake, mut client) = pair();
        client.write_all(b"CONN").unwrap();
        assert_eq!(handshake.read_line(), Ok(None));
        assert!(!handshake.readable);
        client.write_all(b"ECT 1234\nhello").unwrap();
        assert_eq!(handshake.read_line(), Ok(Some(1234)));
        let mut rest = [0u8; 16];
        let n = recv(&handshake.stream, &mut rest, 0).unwrap().unwrap();
        assert_eq!(&rest[..n], b"hello");
    }

    #[test]
    fn long_lines_and_early_close_are_errors() {
        let (mut handshake, mut client) = pair();
        client.write_all(&[b'C'; MAX_LINE + 5]).unwrap();
        assert_eq!(handshake.read_line(), Err(HandshakeError::TooLong));

        let (mut handshake, client) = pair();
        drop(client);
        assert_eq!(handshake.read_line(), Err(HandshakeError::Closed));
    }
}
