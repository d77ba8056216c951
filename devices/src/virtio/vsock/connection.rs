//! One stream connection between a guest port and a host Unix socket, with its credit
//! accounting (virtio 1.2, 5.10.6.3).
//!
//! Guest to host: data goes straight from guest memory to the Unix socket; what the socket does
//! not take is kept in a buffer of at most [`BUF_ALLOC`] bytes, the receive space Kiln
//! advertises, so a guest within its credit always fits and a guest beyond it is reset. Host to
//! guest: data is read from the socket straight into the guest's receive buffer, never more than
//! the guest's advertised free space, so nothing is buffered and a guest that stops reading
//! stops only this socket (the host writer then blocks on its own socket buffer).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vm_memory::bitmap::Bitmap;
use vm_memory::{VolatileSlice, WriteVolatile};

use super::packet::{op, shutdown, Header, TYPE_STREAM};
use super::HOST_CID;

/// Receive buffer space Kiln advertises per connection (guest to host), and so the most it
/// ever buffers for one: the same as Linux's default vsock buffer.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Kiln tells the guest about consumed data once this much is unannounced: the guest always
/// believes it has at least half the buffer free once Kiln has caught up.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A host client asked for it (`CONNECT`); Kiln sent (or owes) a `REQUEST` and waits for the
    /// guest's answer until the deadline.
    Connecting {
        /// When to give up on the guest.
        deadline: Instant,
    },
    /// Both sides agreed; data flows.
    Established,
}

/// Why a connection has to be reset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    /// The guest sent more than the credit Kiln gave it.
    #[error("the guest sent {len} bytes with only {free} bytes of credit left")]
    CreditExceeded {
        /// Bytes in the packet.
        len: usize,
        /// Space left in the buffer.
        free: usize,
    },
    /// The host socket is closed or failed.
    #[error("the host socket failed: {0}")]
    Host(String),
    /// The guest broke the protocol for this connection.
    #[error("{0}")]
    Protocol(&'static str),
}

/// Control packets owed to the guest, sent when it gives receive buffers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Owed {
    request: bool,
    response: bool,
    /// `SHUTDOWN` flags not sent yet.
    shutdown: u32,
    credit_update: bool,
}

/// What a connection sends the guest next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// A control packet (no payload) with this op and flags.
    Control(u16, u32),
    /// Data read from the host socket, at most this many bytes (the guest's free credit).
    Data(u32),
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host side.
    pub stream: UnixStream,
    /// Its key in the backend's epoll set.
    pub token: u64,
    /// Port on the host side (CID 2).
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
    /// Where it stands.
    pub state: State,
    /// The host socket has data (or EOF) that was not read yet (edge-triggered readiness).
    pub readable: bool,
    /// The host socket had room the last time Kiln looked.
    pub writable: bool,
    /// The muxer's epoll set reports when the host socket has room: only while guest data
    /// waits for it, since every read of the host peer would otherwise wake the event loop.
    pub watching_writable: bool,
    /// The host socket both directions are shut (peer closed, or both sides half-closed).
    pub hung_up: bool,
    /// Listed in the backend's queue of connections with something for the guest.
    pub listed: bool,
    /// The guest said it sends and receives nothing more: Kiln flushes what it holds, then
    /// resets, at the latest at this deadline.
    pub closing: Option<Instant>,
    owed: Owed,
    // Guest to host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: u32,
    fwd_cnt_announced: u32,
    guest_sends_no_more: bool,
    guest_receives_no_more: bool,
    host_write_shut: bool,
    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    host_eof: bool,
}

impl Connection {
    /// A connection the guest asked for (its `REQUEST` header), to a host socket already
    /// connected: Kiln owes the guest a `RESPONSE`.
    pub fn accepted(stream: UnixStream, token: u64, request: &Header) -> Self {
        let mut conn = Self::new(stream, token, request.dst_port, request.src_port);
        conn.state = State::Established;
        conn.update_peer_credit(request);
        conn.owed.response = true;
        conn
    }

    /// A connection a host client asked for (`CONNECT port`): Kiln owes the guest a `REQUEST`.
    pub fn requested(
        stream: UnixStream,
        token: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, token, local_port, peer_port);
        conn.state = State::Connecting { deadline };
        conn.owed.request = true;
        conn
    }

    fn new(stream: UnixStream, token: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            token,
            local_port,
            peer_port,
            state: State::Established,
            readable: false,
            writable: true,
            watching_writable: false,
            hung_up: false,
            listed: false,
            closing: None,
            owed: Owed::default(),
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_announced: 0,
            guest_sends_no_more: false,
            guest_receives_no_more: false,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            host_eof: false,
        }
    }

    /// Every packet from the guest carries its receive space.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest waiting for the host socket.
    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// The guest accepted Kiln's `REQUEST`.
    pub fn establish(&mut self) {
        self.state = State::Established;
    }

    /// Takes the guest's data for the host: written to the socket at once if it takes it, the
    /// rest buffered within the credit Kiln advertised.
    pub fn send_to_host(
        &mut self,
        data: &VolatileSlice<'_, crate::virtio::GuestBitmap<'_>>,
    ) -> Result<(), ConnError> {
        if self.guest_sends_no_more {
            return Err(ConnError::Protocol(
                "data after the guest shut down sending",
            ));
        }
        let len = data.len();
        let free = (BUF_ALLOC as usize).saturating_sub(self.tx_buf.len());
        if len > free {
            return Err(ConnError::CreditExceeded { len, free });
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            while written < len {
                let rest = data
                    .subslice(written, len - written)
                    .map_err(|err| ConnError::Host(err.to_string()))?;
                match (&self.stream).write_volatile(&rest) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(vm_memory::VolatileMemoryError::IOError(err))
                        if err.kind() == io::ErrorKind::WouldBlock =>
                    {
                        self.writable = false;
                        break;
                    }
                    Err(vm_memory::VolatileMemoryError::IOError(err))
                        if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(ConnError::Host(err.to_string())),
                }
            }
        }
        if written < len {
            let mut rest = vec![0u8; len - written];
            let rest_slice = data
                .subslice(written, len - written)
                .map_err(|err| ConnError::Host(err.to_string()))?;
            rest_slice.copy_to(&mut rest[..]);
            self.tx_buf.extend(rest);
        }
        self.forwarded(written);
        Ok(())
    }

    /// Writes buffered guest data to the host socket; returns whether anything moved.
    pub fn flush(&mut self) -> Result<bool, ConnError> {
        let mut moved = 0;
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    moved += n;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    break;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(ConnError::Host(err.to_string())),
            }
        }
        self.forwarded(moved);
        self.finish_host_writes()?;
        Ok(moved > 0)
    }

    fn forwarded(&mut self, bytes: usize) {
        // Credit counters wrap at 32 bits by definition.
        self.fwd_cnt = self.fwd_cnt.wrapping_add(bytes as u32);
        if self.fwd_cnt.wrapping_sub(self.fwd_cnt_announced) >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// Once the guest stopped sending and everything reached the host, the host sees EOF.
    fn finish_host_writes(&mut self) -> Result<(), ConnError> {
        if self.guest_sends_no_more && self.tx_buf.is_empty() && !self.host_write_shut {
            self.host_write_shut = true;
            if let Err(err) = self.stream.shutdown(std::net::Shutdown::Write) {
                if err.kind() != io::ErrorKind::NotConnected {
                    return Err(ConnError::Host(err.to_string()));
                }
            }
        }
        Ok(())
    }

    /// The guest's `SHUTDOWN` flags. Returns true when the guest is done in both directions.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<bool, ConnError> {
        if flags & shutdown::SEND != 0 {
            self.guest_sends_no_more = true;
        }
        if flags & shutdown::RCV != 0 {
            self.guest_receives_no_more = true;
        }
        self.finish_host_writes()?;
        Ok(self.guest_sends_no_more && self.guest_receives_no_more)
    }

    /// The guest asked for Kiln's credit.
    pub fn owe_credit_update(&mut self) {
        self.owed.credit_update = true;
    }

    /// Whether all data from the guest reached the host.
    pub fn flushed(&self) -> bool {
        self.tx_buf.is_empty()
    }

    /// Whether nothing can move any more in either direction: the host read side ended and
    /// the guest stopped sending with everything delivered, or the host socket is gone.
    pub fn finished(&self) -> bool {
        (self.host_eof || self.guest_receives_no_more)
            && (self.hung_up || (self.guest_sends_no_more && self.tx_buf.is_empty()))
    }

    /// What to send the guest next, if anything (a connection waiting for the guest's answer
    /// sends only its `REQUEST`).
    pub fn outgoing(&self) -> Option<Outgoing> {
        if self.owed.request {
            return Some(Outgoing::Control(op::REQUEST, 0));
        }
        if matches!(self.state, State::Connecting { .. }) {
            return None;
        }
        if self.owed.response {
            return Some(Outgoing::Control(op::RESPONSE, 0));
        }
        if self.readable && !self.host_eof && !self.guest_receives_no_more {
            let credit = self.peer_credit();
            if credit > 0 {
                return Some(Outgoing::Data(credit));
            }
        }
        if self.owed.shutdown != 0 {
            return Some(Outgoing::Control(op::SHUTDOWN, self.owed.shutdown));
        }
        if self.owed.credit_update {
            return Some(Outgoing::Control(op::CREDIT_UPDATE, 0));
        }
        None
    }

    /// The header of a packet to the guest, with Kiln's current credit.
    pub fn header(&self, guest_cid: u64, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Records that a packet went to the guest: control debts paid, credit announced, data
    /// counted.
    pub fn sent(&mut self, header: &Header) {
        match header.op {
            op::REQUEST => self.owed.request = false,
            op::RESPONSE => self.owed.response = false,
            op::SHUTDOWN => self.owed.shutdown &= !header.flags,
            _ => {}
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(header.len);
        self.fwd_cnt_announced = header.fwd_cnt;
        self.owed.credit_update = false;
    }

    /// Reads host data into the guest's buffers, filling them in order, with one `readv(2)`.
    /// `Ok(0)` is EOF (then Kiln owes the guest a `SHUTDOWN`); would-block clears the
    /// readiness.
    pub fn read_from_host_vectored(
        &mut self,
        buffers: &[VolatileSlice<'_, crate::virtio::GuestBitmap<'_>>],
    ) -> io::Result<usize> {
        let guards: Vec<_> = buffers.iter().map(VolatileSlice::ptr_guard_mut).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(buffers)
            .map(|(guard, buffer)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: buffer.len(),
            })
            .collect();
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        loop {
            // SAFETY: every iovec points into a guest memory slice kept mapped by its guard for
            // the whole call, `iov_len` bytes long; the kernel writes only within them.
            let read = unsafe { libc::readv(self.stream.as_raw_fd(), iovecs.as_ptr(), count) };
            if read == 0 {
                self.host_eof = true;
                self.readable = false;
                self.owed.shutdown |= shutdown::SEND;
                return Ok(0);
            }
            if read > 0 {
                // Non-negative and at most the total length of the buffers.
                let read = read as usize;
                let mut left = read;
                for buffer in buffers {
                    let len = left.min(buffer.len());
                    buffer.bitmap().mark_dirty(0, len);
                    left -= len;
                }
                return Ok(read);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Err(err);
                }
                _ => return Err(err),
            }
        }
    }
}
