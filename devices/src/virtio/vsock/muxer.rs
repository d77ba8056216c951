//! The host side of the vsock device: the Unix socket Kiln listens on, Firecracker's `CONNECT`
//! handshake, guest connections to `PATH_<port>`, and the table of connections between them.
//!
//! Every host socket is non-blocking and watched edge-triggered in the muxer's own epoll set,
//! whose one descriptor sits in the VMM thread's event loop: the device drains it
//! ([`Muxer::poll_events`]), which only records readiness, and moves data when it is not
//! paused. Nothing here ever blocks or polls in a loop.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

mod host_side;
mod to_guest;

pub use to_guest::{RxPacket, MAX_RX_BATCH};

pub use host_side::connect_nonblocking;
use host_side::set_nonblocking;

use super::connection::{ConnError, Connection, State};
use super::handshake::{Handshake, HandshakeError};
use super::packet::{op, Header, TYPE_STREAM};
use super::HOST_CID;
use crate::log_limit::{debug_limited, warn_limited, LogLimiter};

/// Connections at once (both directions); more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host clients that connected and have not finished their `CONNECT` line; more are closed.
pub const MAX_HANDSHAKES: usize = 128;
/// `RST`s for packets without a connection that may wait for receive buffers; while this
/// many wait, Kiln takes no more packets from the guest.
pub const RESET_BACKLOG: usize = 256;
/// Host ports Kiln gives host-initiated connections: `[2^30, 2^31)`, as Firecracker does.
const LOCAL_PORT_FIRST: u32 = 1 << 30;
const LOCAL_PORT_END: u32 = 1 << 31;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

/// How long Kiln waits for the other side at each step.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A host client's `CONNECT` line.
    pub handshake: Duration,
    /// The guest's answer to a `REQUEST`.
    pub connect: Duration,
    /// Flushing what the guest sent before it shut down both directions.
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            close: Duration::from_secs(5),
        }
    }
}

/// Why the muxer could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// The Unix socket path is taken.
    #[error("the vsock socket path '{0}' already exists (remove it if no VM uses it)")]
    PathExists(PathBuf),
    /// A host resource could not be created.
    #[error("cannot {0}: {1}")]
    Io(&'static str, io::Error),
}

/// A connection's address: host port and guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on CID 2.
    pub local_port: u32,
    /// Port on the guest.
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Handshake,
    Connection(ConnKey),
}

/// The connection table and the host sockets.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: Option<Instant>,
    timeouts: Timeouts,
    next_token: u64,
    targets: HashMap<u64, Target>,
    handshakes: HashMap<u64, Handshake>,
    connections: HashMap<ConnKey, Connection>,
    /// Connections with something for the guest, served in turn.
    ready: VecDeque<ConnKey>,
    /// Connections whose host socket reported something since the last service.
    host_events: Vec<ConnKey>,
    /// `RST`s owed to the guest for packets Kiln refused.
    resets: VecDeque<Header>,
    listener_ready: bool,
    timer_fired: bool,
    next_local_port: u32,
    /// For lines the guest can trigger.
    guest_log: LogLimiter,
    /// For lines host clients can trigger.
    host_log: LogLimiter,
}

impl Muxer {
    /// Listens on `path` (which must not exist yet) for host clients of guest `guest_cid`.
    pub fn new(guest_cid: u64, path: &Path, timeouts: Timeouts) -> Result<Self, MuxerError> {
        if path.symlink_metadata().is_ok() {
            return Err(MuxerError::PathExists(path.to_path_buf()));
        }
        let listener =
            UnixListener::bind(path).map_err(|e| MuxerError::Io("create the vsock socket", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| MuxerError::Io("make the vsock socket non-blocking", e))?;
        let epoll = Epoll::new().map_err(|e| MuxerError::Io("create the vsock epoll set", e))?;
        let timer = TimerFd::new()
            .map_err(|e| MuxerError::Io("create the vsock timer", io::Error::from(e)))?;
        set_nonblocking(timer.as_raw_fd())
            .map_err(|e| MuxerError::Io("make the vsock timer non-blocking", e))?;
        let muxer = Self {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            timer,
            timer_armed: None,
            timeouts,
            next_token: FIRST_STREAM_TOKEN,
            targets: HashMap::new(),
            handshakes: HashMap::new(),
            connections: HashMap::new(),
            ready: VecDeque::new(),
            host_events: Vec::new(),
            resets: VecDeque::new(),
            listener_ready: false,
            timer_fired: false,
            next_local_port: LOCAL_PORT_FIRST,
            guest_log: LogLimiter::new(),
            host_log: LogLimiter::new(),
        };
        let watch = |fd: RawFd, events: EventSet, token: u64| {
            muxer
                .epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(|e| MuxerError::Io("watch the vsock socket", e))
        };
        watch(
            muxer.listener.as_raw_fd(),
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            LISTENER_TOKEN,
        )?;
        watch(muxer.timer.as_raw_fd(), EventSet::IN, TIMER_TOKEN)?;
        Ok(muxer)
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The Unix socket path host clients connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The muxer's epoll descriptor, for the VMM thread's event loop.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Live connections.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Host clients still in their `CONNECT` handshake.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// `RST`s waiting for receive buffers.
    pub fn resets_waiting(&self) -> usize {
        self.resets.len()
    }

    /// A connection's state, for tests and diagnostics.
    pub fn connection(&self, key: &ConnKey) -> Option<&Connection> {
        self.connections.get(key)
    }

    /// Whether Kiln can take more packets from the guest now (each may need an `RST` back).
    pub fn accepts_guest_packets(&self) -> bool {
        self.resets.len() < RESET_BACKLOG
    }

    /// Whether something waits for receive buffers.
    pub fn has_output(&self) -> bool {
        !self.resets.is_empty() || !self.ready.is_empty()
    }

    /// Drains the epoll set and records what each socket reported. Moves no data, so it may
    /// run while the device is paused.
    pub fn poll_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let count = match self.epoll.wait(0, &mut events) {
                Ok(count) => count,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    log::error!("vsock: cannot read the muxer's epoll set: {err}");
                    return;
                }
            };
            for event in &events[..count] {
                self.record(event.data(), event.event_set());
            }
            if count < events.len() {
                return;
            }
        }
    }

    fn record(&mut self, token: u64, set: EventSet) {
        match token {
            LISTENER_TOKEN => self.listener_ready = true,
            TIMER_TOKEN => {
                // Read it now: a readable timer would keep the epoll set (and so the event
                // loop) awake while the device is paused and not serving deadlines.
                let _ = self.timer.wait();
                self.timer_armed = None;
                self.timer_fired = true;
            }
            _ => match self.targets.get(&token) {
                Some(Target::Handshake) => {
                    if let Some(handshake) = self.handshakes.get_mut(&token) {
                        handshake.readable = true;
                    }
                }
                Some(Target::Connection(key)) => {
                    let key = *key;
                    if let Some(conn) = self.connections.get_mut(&key) {
                        if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                            conn.readable = true;
                        }
                        if set.contains(EventSet::OUT) {
                            conn.writable = true;
                        }
                        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                            conn.hung_up = true;
                            conn.readable = true;
                        }
                        self.host_events.push(key);
                    }
                }
                None => {}
            },
        }
    }

    /// Handles one packet from the guest. `data` is its payload (RW only).
    pub fn handle_guest_packet(
        &mut self,
        header: &Header,
        data: Option<&VolatileSlice<'_, crate::virtio::GuestBitmap<'_>>>,
    ) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            warn_limited!(
                self.guest_log,
                "vsock guest",
                "vsock: guest packet from CID {} to CID {} (the guest is CID {}, the host {HOST_CID}); reset",
                header.src_cid,
                header.dst_cid,
                self.guest_cid
            );
            self.refuse(header);
            return;
        }
        if header.type_ != TYPE_STREAM {
            debug_limited!(
                self.guest_log,
                "vsock guest",
                "vsock: guest packet of socket type {} (only streams are offered); reset",
                header.type_
            );
            self.refuse(header);
            return;
        }
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        let Some(conn) = self.connections.get_mut(&key) else {
            match header.op {
                op::REQUEST => self.connect_to_host(header, key),
                op::RST => {}
                _ => {
                    debug_limited!(
                        self.guest_log,
                        "vsock guest",
                        "vsock: guest {} for unknown connection {}:{} -> host port {}; reset",
                        super::packet::op_name(header.op),
                        header.src_cid,
                        header.src_port,
                        header.dst_port
                    );
                    self.refuse(header);
                }
            }
            return;
        };
        conn.update_peer_credit(header);
        let outcome = match header.op {
            op::RESPONSE => match conn.state {
                State::Connecting { .. } => {
                    conn.establish();
                    let line = format!("OK {}\n", conn.local_port);
                    match (&conn.stream).write(line.as_bytes()) {
                        Ok(n) if n == line.len() => Ok(()),
                        Ok(_) => Err(ConnError::Host("short write of the OK line".into())),
                        Err(err) => Err(ConnError::Host(err.to_string())),
                    }
                }
                State::Established => Err(ConnError::Protocol("RESPONSE on a live connection")),
            },
            op::RST => {
                self.remove(key);
                return;
            }
            op::SHUTDOWN => match conn.guest_shutdown(header.flags) {
                Ok(true) if conn.flushed() => {
                    self.reset(key, &ConnError::Protocol("the guest closed the connection"));
                    return;
                }
                Ok(true) => {
                    conn.closing = Some(Instant::now() + self.timeouts.close);
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(err) => Err(err),
            },
            op::RW => match conn.state {
                State::Connecting { .. } => Err(ConnError::Protocol("data before RESPONSE")),
                State::Established => match data {
                    Some(data) => conn.send_to_host(data),
                    None => Ok(()),
                },
            },
            op::CREDIT_UPDATE => Ok(()),
            op::CREDIT_REQUEST => {
                conn.owe_credit_update();
                Ok(())
            }
            op::REQUEST => Err(ConnError::Protocol("REQUEST for a live connection")),
            _ => Err(ConnError::Protocol("unknown op")),
        };
        match outcome {
            Ok(()) => self.settle(key),
            Err(err) => self.reset(key, &err),
        }
    }

    /// A packet whose buffers are unusable but whose header could be read: its connection (if
    /// any) is reset, otherwise it is refused.
    pub fn reject_malformed(&mut self, header: &Header) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.src_cid == self.guest_cid && self.connections.contains_key(&key) {
            self.reset(key, &ConnError::Protocol("malformed packet"));
        } else {
            self.refuse(header);
        }
    }

    /// The guest asked for host port `key.local_port`: connect to `PATH_<port>`.
    fn connect_to_host(&mut self, header: &Header, key: ConnKey) {
        if self.connections.len() >= MAX_CONNECTIONS {
            warn_limited!(
                self.guest_log,
                "vsock guest",
                "vsock: {MAX_CONNECTIONS} connections open; refusing the guest's connection to host port {}",
                key.local_port
            );
            self.refuse(header);
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), key.local_port));
        let stream = match connect_nonblocking(&target) {
            Ok(stream) => stream,
            Err(err) => {
                debug_limited!(
                    self.guest_log,
                    "vsock guest",
                    "vsock: guest connection to host port {} refused: '{}': {err}",
                    key.local_port,
                    target.display()
                );
                self.refuse(header);
                return;
            }
        };
        let token = self.new_token();
        if let Err(err) = self.watch(&stream, token) {
            log::warn!("vsock: cannot watch '{}': {err}", target.display());
            self.refuse(header);
            return;
        }
        let mut conn = Connection::accepted(stream, token, header);
        conn.writable = true;
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, conn);
        log::debug!(
            "vsock: guest port {} connected to '{}'",
            key.peer_port,
            target.display()
        );
        self.settle(key);
    }

    /// Answers a packet Kiln will not take with an `RST` (never an `RST` with an `RST`).
    fn refuse(&mut self, header: &Header) {
        if header.op == op::RST {
            return;
        }
        let mut reply = header.reset_reply();
        // Whatever the guest claimed, the answer comes from the host to the guest.
        reply.src_cid = HOST_CID;
        reply.dst_cid = self.guest_cid;
        self.resets.push_back(reply);
    }

    /// Tears a connection down: the host socket is closed now, the guest gets an `RST`.
    fn reset(&mut self, key: ConnKey, why: &ConnError) {
        if let Some(conn) = self.connections.get(&key) {
            debug_limited!(
                self.guest_log,
                "vsock guest",
                "vsock: connection guest port {} <-> host port {} reset: {why}",
                key.peer_port,
                key.local_port
            );
            let rst = conn.header(self.guest_cid, op::RST, 0, 0);
            self.resets.push_back(rst);
        }
        self.remove(key);
    }

    /// Forgets a connection and closes its host socket.
    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.connections.remove(&key) {
            self.targets.remove(&conn.token);
            self.unwatch(&conn.stream);
        }
    }

    /// Closes every connection and handshake (device reset, transport reset).
    pub fn drop_all(&mut self) {
        let keys: Vec<ConnKey> = self.connections.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let tokens: Vec<u64> = self.handshakes.keys().copied().collect();
        for token in tokens {
            self.drop_handshake(token);
        }
        self.ready.clear();
        self.host_events.clear();
        self.resets.clear();
    }

    fn new_token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Watches a host socket for input (and, from [`Muxer::settle`], for room while data
    /// waits for it).
    fn watch(&self, stream: &UnixStream, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(watched_events(false), token),
        )
    }

    fn unwatch(&self, stream: &UnixStream) {
        // Fails only if it was never added; closing the socket removes it anyway.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file would stop the next VM from using the path.
        if let Err(err) = std::fs::remove_file(&self.path) {
            log::debug!("vsock: cannot remove '{}': {err}", self.path.display());
        }
    }
}

/// What the muxer's epoll set watches on a host socket.
fn watched_events(writable: bool) -> EventSet {
    let events = EventSet::IN | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
    if writable {
        events | EventSet::OUT
    } else {
        events
    }
}
