//! A stream socket as a NIC backend, with QEMU's stream framing: each Ethernet frame is
//! preceded by its length as a 32-bit big-endian number. passt speaks it (see [`super::passt`]).
//!
//! Both directions hold at most one frame in Kiln: a partial frame read from the socket waits in
//! a fixed buffer for its rest, a partially written one makes later frames wait in the guest's
//! queue until the socket drained it.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::backend::{Backend, BackendError, FramePart};
use super::MAX_FRAME_SIZE;

/// Bytes of the length prefix.
const PREFIX: usize = 4;
/// Room for two largest frames, so that one read usually brings several small ones.
const READ_BUFFER: usize = 2 * (PREFIX + MAX_FRAME_SIZE);

/// What the peer of a stream backend is, for messages and for reaping it.
pub trait Peer: Send + std::fmt::Debug {
    /// Why the peer went away, if it can tell (a child's exit status).
    fn exit_reason(&mut self) -> Option<String>;
}

/// A connected stream socket carrying length-prefixed frames.
#[derive(Debug)]
pub struct Stream {
    socket: UnixStream,
    inbound: Box<[u8]>,
    /// Unparsed bytes are `inbound[start..end]`.
    start: usize,
    end: usize,
    /// The rest of a frame the socket took only part of.
    outbound: Vec<u8>,
    sent: usize,
    peer: Option<Box<dyn Peer>>,
}

impl Stream {
    /// Uses `socket` (made non-blocking here); `peer` is told nothing but asked why it went.
    pub fn new(socket: UnixStream, peer: Option<Box<dyn Peer>>) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            inbound: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            outbound: Vec::with_capacity(PREFIX + MAX_FRAME_SIZE),
            sent: 0,
            peer,
        })
    }

    /// A complete frame at the front of the buffer, as a range; `Err` for a length no frame
    /// can have.
    fn next_frame(&self) -> Result<Option<std::ops::Range<usize>>, BackendError> {
        let available = &self.inbound[self.start..self.end];
        let Some(prefix) = available.get(..PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME_SIZE {
            return Err(BackendError::Gone(format!(
                "the peer sent a frame of {len} bytes, more than the {MAX_FRAME_SIZE} a NIC takes"
            )));
        }
        if available.len() < PREFIX + len {
            return Ok(None);
        }
        let begin = self.start + PREFIX;
        Ok(Some(begin..begin + len))
    }

    /// Writes what is left of a partly sent frame; true once nothing is left.
    fn flush(&mut self) -> Result<bool, BackendError> {
        while self.sent < self.outbound.len() {
            match send_nosignal(
                &self.socket,
                &[FramePart::from_slice(&self.outbound[self.sent..])],
            ) {
                Ok(written) => self.sent += written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(gone_on_write(err)),
            }
        }
        self.outbound.clear();
        self.sent = 0;
        Ok(true)
    }
}

fn gone_on_write(err: io::Error) -> BackendError {
    BackendError::Gone(format!("cannot write to the peer: {err}"))
}

/// `sendmsg` with `MSG_NOSIGNAL`: a peer that went away is an error, not a SIGPIPE.
fn send_nosignal(socket: &UnixStream, parts: &[FramePart]) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = parts.iter().map(FramePart::iovec).collect();
    // SAFETY: a zeroed msghdr is valid (no name, no control data).
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov.as_mut_ptr();
    message.msg_iovlen = iov.len() as _;
    // SAFETY: the iovecs describe readable memory alive for the call (the contract of
    // `FramePart`); the kernel only reads them.
    let written = unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &message,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(written as usize)
}

impl Backend for Stream {
    fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn has_vnet_header(&self) -> bool {
        false
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError> {
        loop {
            if let Some(range) = self.next_frame()? {
                let len = range.len();
                buf[..len].copy_from_slice(&self.inbound[range.clone()]);
                self.start = range.end;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                return Ok(Some(len));
            }
            if self.start > 0 {
                self.inbound.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.socket.read(&mut self.inbound[self.end..]) {
                Ok(0) => return Err(BackendError::Gone("the peer closed the connection".into())),
                Ok(read) => self.end += read,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(BackendError::Gone(format!(
                        "cannot read from the peer: {err}"
                    )))
                }
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, BackendError> {
        self.send_parts(&[FramePart::from_slice(frame)])
    }

    fn send_parts(&mut self, parts: &[FramePart]) -> Result<bool, BackendError> {
        if !self.flush()? {
            return Ok(false);
        }
        let frame_len: usize = parts.iter().map(FramePart::len).sum();
        let prefix = (frame_len as u32).to_be_bytes();
        let mut pieces = Vec::with_capacity(parts.len() + 1);
        pieces.push(FramePart::from_slice(&prefix));
        pieces.extend_from_slice(parts);
        let total = PREFIX + frame_len;
        let written = loop {
            match send_nosignal(&self.socket, &pieces) {
                Ok(written) => break written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(gone_on_write(err)),
            }
        };
        if written < total {
            // The frame is taken: its rest (copied now, as the guest gets its buffers back) goes
            // out before anything else.
            self.outbound.clear();
            self.sent = 0;
            let mut skip = written;
            for piece in &pieces {
                if skip >= piece.len() {
                    skip -= piece.len();
                    continue;
                }
                piece.append_to(skip, &mut self.outbound);
                skip = 0;
            }
        }
        Ok(true)
    }

    fn exit_reason(&mut self) -> Option<String> {
        self.peer.as_mut().and_then(|peer| peer.exit_reason())
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
