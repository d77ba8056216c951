//! The muxer's host side: accepting clients on the Unix socket, their `CONNECT` handshake,
//! deadlines, and connecting to `PATH_<port>` without blocking.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent};

use super::{
    watched_events, ConnError, ConnKey, Connection, Handshake, HandshakeError, Muxer, State,
    Target, LOCAL_PORT_END, LOCAL_PORT_FIRST, MAX_CONNECTIONS, MAX_HANDSHAKES,
};
use crate::log_limit::{debug_limited, info_limited, warn_limited};

impl Muxer {
    /// Acts on what the host sockets and the timer reported: accepts clients, reads their
    /// `CONNECT` lines, flushes buffered guest data, ends finished connections, expires
    /// deadlines. Call only while the device runs.
    pub fn service_host(&mut self) {
        if std::mem::take(&mut self.timer_fired) {
            self.expire(Instant::now());
        }
        if std::mem::take(&mut self.listener_ready) {
            self.accept_clients();
        }
        let tokens: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, handshake)| handshake.readable)
            .map(|(token, _)| *token)
            .collect();
        for token in tokens {
            self.continue_handshake(token);
        }
        let mut keys = std::mem::take(&mut self.host_events);
        keys.sort_unstable_by_key(|key| (key.local_port, key.peer_port));
        keys.dedup();
        for key in keys {
            self.service_connection(key);
        }
        self.arm_timer();
    }

    pub(super) fn service_connection(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.writable && conn.buffered() > 0 {
            if let Err(err) = conn.flush() {
                self.reset(key, &err);
                return;
            }
        }
        self.settle(key);
    }

    /// After anything happened to a connection: ends it if nothing more can move, lists it if
    /// it has something for the guest.
    pub(super) fn settle(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            self.reset(key, &ConnError::Protocol("both directions are closed"));
            return;
        }
        if conn.closing.is_some() && conn.flushed() {
            self.reset(key, &ConnError::Protocol("the guest closed the connection"));
            return;
        }
        let wants_room = conn.buffered() > 0;
        if wants_room != conn.watching_writable {
            // Modifying re-checks readiness: room that appeared meanwhile is reported.
            let events = EpollEvent::new(watched_events(wants_room), conn.token);
            match self
                .epoll
                .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), events)
            {
                Ok(()) => conn.watching_writable = wants_room,
                Err(err) => {
                    self.reset(
                        key,
                        &ConnError::Host(format!("cannot watch the socket: {err}")),
                    );
                    return;
                }
            }
        }
        if conn.outgoing().is_some() && !conn.listed {
            conn.listed = true;
            self.ready.push_back(key);
        }
    }

    pub(super) fn accept_clients(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    warn_limited!(
                        self.host_log,
                        "vsock host",
                        "vsock: cannot accept a client on '{}': {err}",
                        self.path.display()
                    );
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                warn_limited!(
                    self.host_log,
                    "vsock host",
                    "vsock: {} host clients on '{}' have not sent their CONNECT line; closing a new one",
                    self.handshakes.len(),
                    self.path.display()
                );
                continue;
            }
            if let Err(err) = stream.set_nonblocking(true) {
                warn_limited!(
                    self.host_log,
                    "vsock host",
                    "vsock: cannot make a client socket non-blocking: {err}"
                );
                continue;
            }
            let token = self.new_token();
            if let Err(err) = self.watch(&stream, token) {
                warn_limited!(
                    self.host_log,
                    "vsock host",
                    "vsock: cannot watch a client socket: {err}"
                );
                continue;
            }
            self.targets.insert(token, Target::Handshake);
            self.handshakes.insert(
                token,
                Handshake {
                    stream,
                    deadline: Instant::now() + self.timeouts.handshake,
                    readable: true,
                },
            );
            self.continue_handshake(token);
        }
    }

    pub(super) fn continue_handshake(&mut self, token: u64) {
        let Some(handshake) = self.handshakes.get_mut(&token) else {
            return;
        };
        let result = handshake.read_line();
        let port = match result {
            Ok(None) => return,
            Ok(Some(port)) => port,
            Err(err) => {
                let quiet = err == HandshakeError::Closed;
                self.drop_handshake(token);
                if quiet {
                    debug_limited!(self.host_log, "vsock host", "vsock: {err}");
                } else {
                    warn_limited!(
                        self.host_log,
                        "vsock host",
                        "vsock: host client on '{}' closed: {err}",
                        self.path.display()
                    );
                }
                return;
            }
        };
        let Some(handshake) = self.drop_handshake_keep_stream(token) else {
            return;
        };
        if self.connections.len() >= MAX_CONNECTIONS {
            warn_limited!(
                self.host_log,
                "vsock host",
                "vsock: {MAX_CONNECTIONS} connections open; refusing a host client's CONNECT {port}"
            );
            self.unwatch(&handshake.stream);
            return;
        }
        let local_port = self.allocate_local_port(port);
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let deadline = Instant::now() + self.timeouts.connect;
        let mut conn = Connection::requested(handshake.stream, token, local_port, port, deadline);
        // Data the client sent after its line stays in the socket for later.
        conn.readable = true;
        self.targets.insert(token, Target::Connection(key));
        self.connections.insert(key, conn);
        log::debug!("vsock: host client asks for guest port {port} (host port {local_port})");
        self.settle(key);
    }

    /// Removes a handshake and closes its socket.
    pub(super) fn drop_handshake(&mut self, token: u64) {
        if let Some(handshake) = self.drop_handshake_keep_stream(token) {
            self.unwatch(&handshake.stream);
        }
    }

    pub(super) fn drop_handshake_keep_stream(&mut self, token: u64) -> Option<Handshake> {
        self.targets.remove(&token);
        self.handshakes.remove(&token)
    }

    /// The host port the next host-initiated connection gets (a snapshot carries it).
    pub fn next_local_port(&self) -> u32 {
        self.next_local_port
    }

    /// Continues host ports from `port` (a restored guest may still hold sockets on the ports
    /// before it: reusing one would meet such a socket); false if `port` is out of range.
    pub fn continue_local_ports_from(&mut self, port: u32) -> bool {
        let fits = (LOCAL_PORT_FIRST..LOCAL_PORT_END).contains(&port);
        if fits {
            self.next_local_port = port;
        }
        fits
    }

    pub(super) fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = if port + 1 >= LOCAL_PORT_END {
                LOCAL_PORT_FIRST
            } else {
                port + 1
            };
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
            if !self.connections.contains_key(&key) {
                return port;
            }
        }
    }

    /// Ends handshakes and connections whose deadline passed.
    pub(super) fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, handshake)| handshake.deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in late {
            warn_limited!(
                self.host_log,
                "vsock host",
                "vsock: a host client on '{}' sent no CONNECT line within {} s; closed",
                self.path.display(),
                self.timeouts.handshake.as_secs()
            );
            self.drop_handshake(token);
        }
        let late: Vec<(ConnKey, bool)> = self
            .connections
            .iter()
            .filter_map(|(key, conn)| match (conn.state, conn.closing) {
                (State::Connecting { deadline }, _) if deadline <= now => Some((*key, true)),
                (_, Some(deadline)) if deadline <= now => Some((*key, false)),
                _ => None,
            })
            .collect();
        for (key, connecting) in late {
            if connecting {
                info_limited!(
                    self.guest_log,
                    "vsock guest",
                    "vsock: the guest did not answer a connection to its port {} within {} s",
                    key.peer_port,
                    self.timeouts.connect.as_secs()
                );
            }
            self.reset(key, &ConnError::Protocol("deadline passed"));
        }
    }

    /// Moves every deadline later by `by` (the time the device was paused).
    pub fn postpone_deadlines(&mut self, by: Duration) {
        for handshake in self.handshakes.values_mut() {
            handshake.deadline += by;
        }
        for conn in self.connections.values_mut() {
            if let State::Connecting { deadline } = &mut conn.state {
                *deadline += by;
            }
            if let Some(deadline) = &mut conn.closing {
                *deadline += by;
            }
        }
        self.timer_armed = None;
        self.arm_timer();
    }

    /// Arms the timer for the earliest deadline, if it is not armed for it already.
    pub(super) fn arm_timer(&mut self) {
        let earliest =
            self.handshakes
                .values()
                .map(|handshake| handshake.deadline)
                .chain(self.connections.values().filter_map(|conn| {
                    match (conn.state, conn.closing) {
                        (State::Connecting { deadline }, _) => Some(deadline),
                        (_, closing) => closing,
                    }
                }))
                .min();
        let Some(earliest) = earliest else {
            return;
        };
        if self.timer_armed.is_some_and(|armed| armed <= earliest) {
            return;
        }
        let delay = earliest
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match self.timer.reset(delay, None) {
            Ok(()) => self.timer_armed = Some(earliest),
            Err(err) => log::error!("vsock: cannot arm the timer: {err}"),
        }
    }
}

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor the caller owns; F_GETFL/F_SETFL touch only its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to a Unix stream socket without ever blocking: a full backlog is `WouldBlock`,
/// which the caller treats like a refusal.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long for a Unix socket",
        ));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: connect(2) reads `length` bytes of the live, initialised `address`.
        let ret = unsafe {
            libc::connect(
                owned.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                length as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(UnixStream::from(owned));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
