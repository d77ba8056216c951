//! The vsock device driven through its queues by a test driver, with real Unix sockets on the
//! host side: connections both ways, credit, half-close, pause, transport reset, and every kind
//! of bad input.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use vm_memory::GuestAddress;

use super::*;
use crate::virtio::block::test_utils::guest_memory;
use crate::virtio::test_driver::{TestQueue, WRITE};
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::packet::{op, shutdown, PKT_HEADER_SIZE, TYPE_STREAM};
use crate::virtio::vsock::HOST_CID;

pub(super) const CID: u64 = 3;
const RX_DATA: u32 = 4096;

/// A temporary directory for the device's sockets, removed on drop.
pub(super) struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kiln-vsock-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest with the vsock device active.
pub(super) struct Guest {
    pub(super) memory: GuestMemoryMmap,
    pub(super) device: Vsock,
    pub(super) rx: TestQueue,
    pub(super) tx: TestQueue,
    pub(super) event: TestQueue,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) next_buffer: u64,
    pub(super) rx_buffers: HashMap<u16, (u64, u64)>,
    pub(super) dir: TempDir,
}

fn timeouts() -> Timeouts {
    Timeouts {
        handshake: Duration::from_millis(200),
        connect: Duration::from_millis(200),
        close: Duration::from_millis(200),
    }
}

impl Guest {
    pub(super) fn new() -> Self {
        let dir = TempDir::new();
        let memory = guest_memory();
        let mut device = Vsock::with_timeouts(CID, &dir.0.join("v.sock"), timeouts()).unwrap();
        let rx = TestQueue::new(0x1000, QUEUE_SIZE);
        let tx = TestQueue::new(0x3000, QUEUE_SIZE);
        let event = TestQueue::new(0x5000, QUEUE_SIZE);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let activation = Activation {
            memory: memory.clone(),
            queues: vec![
                rx.queue(&memory, true),
                tx.queue(&memory, true),
                event.queue(&memory, true),
            ],
            queue_events: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: interrupt.clone(),
            features: device.features(),
        };
        device.activate(activation).unwrap();
        Self {
            memory,
            device,
            rx,
            tx,
            event,
            interrupt,
            next_buffer: 0x10_0000,
            rx_buffers: HashMap::new(),
            dir,
        }
    }

    pub(super) fn path(&self) -> PathBuf {
        self.dir.0.join("v.sock")
    }

    pub(super) fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += (len + 0xfff) & !0xfff;
        addr
    }

    /// Sends a packet on the TX queue (header and payload in two buffers) and runs a pass.
    pub(super) fn send(&mut self, header: Header, payload: &[u8]) {
        let header_addr = self.alloc(PKT_HEADER_SIZE as u64);
        self.memory
            .write_slice(&header.to_bytes(), GuestAddress(header_addr))
            .unwrap();
        let mut chain = vec![(header_addr, PKT_HEADER_SIZE as u32, 0)];
        if !payload.is_empty() {
            let data = self.alloc(payload.len() as u64);
            self.memory
                .write_slice(payload, GuestAddress(data))
                .unwrap();
            chain.push((data, payload.len() as u32, 0));
        }
        self.tx.add(&self.memory, &chain);
        self.device.run_pass();
    }

    /// Posts receive buffers and runs a pass.
    pub(super) fn give_rx(&mut self, count: usize) {
        for _ in 0..count {
            let header = self.alloc(PKT_HEADER_SIZE as u64);
            let data = self.alloc(u64::from(RX_DATA));
            let head = self.rx.add(
                &self.memory,
                &[
                    (header, PKT_HEADER_SIZE as u32, WRITE),
                    (data, RX_DATA, WRITE),
                ],
            );
            self.rx_buffers.insert(head, (header, data));
        }
        self.device.run_pass();
    }

    /// Packets the device put in receive buffers since the last call.
    pub(super) fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.rx
            .take_used(&self.memory)
            .into_iter()
            .map(|(head, len)| {
                let (header_addr, data) = self.rx_buffers[&head];
                let mut bytes = [0u8; PKT_HEADER_SIZE];
                self.memory
                    .read_slice(&mut bytes, GuestAddress(header_addr))
                    .unwrap();
                let header = Header::from_bytes(&bytes);
                assert_eq!(len, PKT_HEADER_SIZE as u32 + header.len, "used length");
                let mut payload = vec![0u8; header.len as usize];
                self.memory
                    .read_slice(&mut payload, GuestAddress(data))
                    .unwrap();
                (header, payload)
            })
            .collect()
    }

    /// Posts buffers until nothing more arrives; returns every packet.
    pub(super) fn drain(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            self.give_rx(8);
            let got = self.received();
            if got.is_empty() {
                return all;
            }
            all.extend(got);
        }
    }
}

/// A guest packet with the usual addresses: guest CID 3 port `src` to host port `dst`.
pub(super) fn packet(op: u16, src: u32, dst: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

pub(super) fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(header, _)| header.op).collect()
}

/// A host listener on `PATH_<port>`.
pub(super) fn host_listener(guest: &Guest, port: u32) -> UnixListener {
    let path = format!("{}_{port}", guest.path().display());
    UnixListener::bind(path).unwrap()
}

/// Kiln closed the socket: EOF, or a reset when Kiln closed it with data unread.
pub(super) fn assert_closed(stream: &mut UnixStream) {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "unexpected data {rest:?}"),
        Err(err) => assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}"),
    }
}

pub(super) fn timed(stream: UnixStream) -> UnixStream {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Guest port 1025 connects to host port 80 (a listener there); returns the host's end.
pub(super) fn guest_connects(guest: &mut Guest, listener: &UnixListener) -> UnixStream {
    guest.send(packet(op::REQUEST, 1025, 80, 0), &[]);
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RESPONSE]);
    let response = got[0].0;
    assert_eq!((response.src_cid, response.dst_cid), (HOST_CID, CID));
    assert_eq!((response.src_port, response.dst_port), (80, 1025));
    assert_eq!(response.buf_alloc, BUF_ALLOC);
    timed(listener.accept().unwrap().0)
}

#[test]
fn config_space_holds_the_guest_cid() {
    let guest = Guest::new();
    let mut config = [0u8; 8];
    guest.device.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config), CID);
    let mut high = [0xffu8; 4];
    guest.device.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
}

#[test]
fn guest_connection_to_a_host_listener_carries_data_both_ways_and_half_closes() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);

    guest.send(packet(op::RW, 1025, 80, 5), b"hello");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world!").unwrap();
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"world!");

    // Guest half-close: the host reads EOF and can still send.
    let mut shut = packet(op::SHUTDOWN, 1025, 80, 0);
    shut.flags = shutdown::SEND;
    guest.send(shut, &[]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    host.write_all(b"late").unwrap();
    let got = guest.drain();
    assert_eq!(got[0].1, b"late");

    // Host half-close: the guest gets SHUTDOWN(SEND); both directions are done: RST ends it.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RST], "{got:?}");
    assert_eq!(guest.device.connection_count(), 0);
}

#[test]
fn host_connect_handshake_answers_ok_after_the_guest_accepts() {
    let mut guest = Guest::new();
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 52\nearly data").unwrap();
    guest.device.run_pass();
    let got = guest.drain();
    assert_eq!(ops(&got), [op::REQUEST]);
    let request = got[0].0;
    assert_eq!(request.dst_port, 52);
    assert!(
        request.src_port >= 1 << 30,
        "host port from the ephemeral range"
    );

    let mut response = packet(op::RESPONSE, 52, request.src_port, 0);
    response.buf_alloc = 4096;
    guest.send(response, &[]);
    let mut line = [0u8; 32];
    let n = client.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {}\n", request.src_port)
    );
    // What the client sent after its line is the first data for the guest.
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"early data");
}

#[test]
fn guest_refusal_closes_the_host_client_without_ok() {
    let mut guest = Guest::new();
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 9\n").unwrap();
    guest.device.run_pass();
    let request = guest.drain()[0].0;
    guest.send(packet(op::RST, 9, request.src_port, 0), &[]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK line: {rest:?}");
    assert_eq!(guest.device.connection_count(), 0);
}

#[test]
fn guest_that_never_answers_a_request_is_given_up() {
    let mut guest = Guest::new();
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 7\n").unwrap();
    guest.device.run_pass();
    assert_eq!(ops(&guest.drain()), [op::REQUEST]);
    std::thread::sleep(Duration::from_millis(300));
    guest.device.run_pass();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(ops(&guest.drain()), [op::RST], "the guest is told too");
}

#[test]
fn connecting_to_a_host_port_nobody_listens_on_is_reset_at_once() {
    let mut guest = Guest::new();
    guest.send(packet(op::REQUEST, 1025, 81, 0), &[]);
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RST]);
    assert_eq!((got[0].0.src_port, got[0].0.dst_port), (81, 1025));
}

#[test]
fn host_to_guest_data_respects_the_guests_credit() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut request = packet(op::REQUEST, 1025, 80, 0);
    request.buf_alloc = 6000;
    guest.send(request, &[]);
    assert_eq!(ops(&guest.drain()), [op::RESPONSE]);
    let mut host = listener.accept().unwrap().0;
    host.write_all(&[5u8; 20_000]).unwrap();
    let got = guest.drain();
    let bytes: usize = got.iter().map(|(_, data)| data.len()).sum();
    assert_eq!(bytes, 6000, "exactly the credit");
    // The guest consumed it all and says so: the rest flows.
    let mut update = packet(op::CREDIT_UPDATE, 1025, 80, 0);
    update.buf_alloc = 6000;
    update.fwd_cnt = 6000;
    guest.send(update, &[]);
    let bytes: usize = guest.drain().iter().map(|(_, data)| data.len()).sum();
    assert_eq!(bytes, 6000);
}

#[test]
fn credit_request_gets_a_credit_update() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let _host = guest_connects(&mut guest, &listener);
    guest.send(packet(op::CREDIT_REQUEST, 1025, 80, 0), &[]);
    let got = guest.drain();
    assert_eq!(ops(&got), [op::CREDIT_UPDATE]);
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
}

#[test]
fn closed_host_socket_resets_only_its_connection() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let first = guest_connects(&mut guest, &listener);
    guest.send(packet(op::REQUEST, 1026, 80, 0), &[]);
    assert_eq!(ops(&guest.drain()), [op::RESPONSE]);
    let mut second = listener.accept().unwrap().0;
    drop(first);
    guest.device.run_pass();
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RST]);
    assert_eq!(got[0].0.dst_port, 1025);
    guest.send(packet(op::RW, 1026, 80, 2), b"ok");
    let mut buf = [0u8; 2];
    second.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
}

#[test]
fn guest_shutdown_of_both_directions_is_answered_with_rst() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);
    guest.send(packet(op::RW, 1025, 80, 3), b"bye");
    let mut shut = packet(op::SHUTDOWN, 1025, 80, 0);
    shut.flags = shutdown::BOTH;
    guest.send(shut, &[]);
    assert_eq!(ops(&guest.drain()), [op::RST]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye", "flushed before the close");
}

#[test]
fn pause_moves_nothing_until_resume() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);
    let states = guest.device.pause().unwrap();
    assert_eq!(states.len(), 3);
    host.write_all(b"while paused").unwrap();
    guest.give_rx(4);
    guest.device.run_pass();
    assert!(guest.received().is_empty(), "data moved while paused");
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 6\n").unwrap();
    guest.device.run_pass();
    assert!(
        guest.received().is_empty(),
        "a request went out while paused"
    );
    guest.device.resume();
    guest.device.run_pass();
    let mut got = guest.received();
    got.sort_by_key(|(header, _)| header.op);
    assert_eq!(ops(&got), [op::REQUEST, op::RW]);
    assert_eq!(got[1].1, b"while paused");
}

#[test]
fn a_deadline_that_passes_while_paused_does_not_keep_the_loop_awake() {
    let mut guest = Guest::new();
    let _silent = UnixStream::connect(guest.path()).unwrap();
    guest.device.run_pass();
    guest.device.pause().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    guest.device.run_pass();
    let epoll_fd = guest.device.core().muxer.epoll_fd();
    let mut poll = libc::pollfd {
        fd: epoll_fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one live pollfd for a descriptor the device owns, without waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    assert_eq!(
        ready, 0,
        "the muxer's epoll set stays readable while paused"
    );
    // The deadline is served after the resume (moved by the paused time, so not yet).
    guest.device.resume();
    guest.device.run_pass();
    assert_eq!(guest.device.core().muxer.handshake_count(), 1);
}

#[test]
fn transport_reset_event_drops_every_connection() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);
    let event_buffer = guest.alloc(8);
    guest
        .memory
        .write_obj(0xffu32, GuestAddress(event_buffer))
        .unwrap();
    guest.event.add(&guest.memory, &[(event_buffer, 4, WRITE)]);
    let _ = guest.interrupt.eventfd().read();
    guest.device.reset_transport();
    guest.device.run_pass();
    assert_eq!(guest.event.take_used(&guest.memory), [(0, 4)]);
    let id: u32 = guest.memory.read_obj(GuestAddress(event_buffer)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert!(guest.interrupt.eventfd().read().is_ok(), "interrupt raised");
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(guest.device.connection_count(), 0);
}

#[test]
fn device_reset_closes_host_sockets_and_a_new_activation_works() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);
    guest.device.reset();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(guest.device.connection_count(), 0);
    // The socket path stays usable.
    assert!(UnixStream::connect(guest.path()).is_ok());
}

#[test]
fn the_socket_path_must_be_free_and_is_removed_with_the_device() {
    let dir = TempDir::new();
    let path = dir.0.join("taken.sock");
    std::fs::write(&path, b"").unwrap();
    let err = Vsock::new(CID, &path).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    std::fs::remove_file(&path).unwrap();
    let device = Vsock::new(CID, &path).unwrap();
    assert!(path.exists());
    drop(device);
    assert!(!path.exists());
}
