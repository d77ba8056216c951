//! The virtio-net device driven through its queues by a test driver, over a mock backend:
//! frames both ways, merged receive buffers, backpressure, a full RX queue, link loss, pause,
//! and every kind of bad input from the guest.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::test_utils::{guest_memory, MEMORY_SIZE};
use crate::virtio::net::{BackendError, MAX_FRAME_SIZE, MAX_PACKET_SIZE, NET_HDR_SIZE};
use crate::virtio::test_driver::{TestQueue, WRITE};
use crate::virtio::{Interrupt, INTERRUPT_CONFIG_CHANGE};
use kiln_arch::GuestMemoryMmap;

/// What the mock backend holds; shared with the test.
#[derive(Debug, Default)]
struct MockState {
    /// Frames the host side sends to the guest.
    inbound: VecDeque<Vec<u8>>,
    /// Frames the guest sent.
    outbound: Vec<Vec<u8>>,
    /// The backend refuses frames (a full socket).
    full: bool,
    /// The next call fails for good.
    gone: bool,
    offloads: Option<Offloads>,
}

#[derive(Debug)]
struct MockBackend {
    state: Arc<Mutex<MockState>>,
    vnet_header: bool,
    fd: EventFd,
}

impl Backend for MockBackend {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn has_vnet_header(&self) -> bool {
        self.vnet_header
    }

    fn set_offloads(&mut self, offloads: Offloads) -> std::io::Result<()> {
        self.state.lock().unwrap().offloads = Some(offloads);
        Ok(())
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError> {
        let mut state = self.state.lock().unwrap();
        if state.gone {
            return Err(BackendError::Gone("the mock peer closed".into()));
        }
        Ok(state.inbound.pop_front().map(|frame| {
            buf[..frame.len()].copy_from_slice(&frame);
            frame.len()
        }))
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, BackendError> {
        let mut state = self.state.lock().unwrap();
        if state.gone {
            return Err(BackendError::Gone("the mock peer closed".into()));
        }
        if state.full {
            return Ok(false);
        }
        state.outbound.push(frame.to_vec());
        Ok(true)
    }

    fn exit_reason(&mut self) -> Option<String> {
        Some("mock ended".into())
    }
}

const MAC: MacAddress = MacAddress([0x02, 0x4b, 0x4c, 0, 0, 1]);

struct Guest {
    memory: GuestMemoryMmap,
    device: Net,
    backend: Arc<Mutex<MockState>>,
    rx: TestQueue,
    tx: TestQueue,
    interrupt: Arc<Interrupt>,
    next_buffer: u64,
    /// Receive chains posted: head → (address, length) of each buffer.
    rx_buffers: std::collections::HashMap<u16, Vec<(u64, u32)>>,
}

impl Guest {
    /// An active device; `accepted` are the features the driver takes.
    fn new(vnet_header: bool, accepted: impl Fn(u64) -> u64) -> Self {
        let memory = guest_memory();
        let backend = Arc::new(Mutex::new(MockState::default()));
        let mock = MockBackend {
            state: backend.clone(),
            vnet_header,
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let mut device = Net::new("net0 (mock)", MAC, Box::new(mock)).unwrap();
        let rx = TestQueue::new(0x1000, QUEUE_SIZE);
        let tx = TestQueue::new(0x3000, QUEUE_SIZE);
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let features = accepted(device.features());
        device.check_features(features).unwrap();
        let activation = Activation {
            memory: memory.clone(),
            queues: vec![rx.queue(&memory, true), tx.queue(&memory, true)],
            queue_events: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: interrupt.clone(),
            features,
        };
        device.activate(activation).unwrap();
        Self {
            memory,
            device,
            backend,
            rx,
            tx,
            interrupt,
            next_buffer: 0x10_0000,
            rx_buffers: Default::default(),
        }
    }

    fn plain() -> Self {
        Self::new(false, |offered| offered)
    }

    fn alloc(&mut self, len: u64) -> u64 {
        let addr = self.next_buffer;
        self.next_buffer += (len + 0xfff) & !0xfff;
        assert!(
            self.next_buffer < MEMORY_SIZE,
            "test ran out of guest memory"
        );
        addr
    }

    /// Posts a TX chain of these buffers (contents, flags).
    fn send_chain(&mut self, parts: &[(&[u8], u16)]) -> u16 {
        let mut chain = Vec::new();
        for (bytes, flags) in parts {
            let addr = self.alloc(bytes.len().max(1) as u64);
            self.memory.write_slice(bytes, GuestAddress(addr)).unwrap();
            chain.push((addr, bytes.len() as u32, *flags));
        }
        self.tx.add(&self.memory, &chain)
    }

    /// Posts a frame with a zero header (header and frame in two buffers) and runs a pass.
    fn send(&mut self, frame: &[u8]) -> u16 {
        let head = self.send_chain(&[(&[0u8; NET_HDR_SIZE], 0), (frame, 0)]);
        self.device.run_pass();
        head
    }

    /// Posts `count` receive chains of one buffer of `len` bytes each.
    fn give_rx(&mut self, count: usize, len: u32) {
        for _ in 0..count {
            let addr = self.alloc(u64::from(len));
            let head = self.rx.add(&self.memory, &[(addr, len, WRITE)]);
            self.rx_buffers.insert(head, vec![(addr, len)]);
        }
        self.device.run_pass();
    }

    /// The bytes of each used receive chain since the last call: `(head, bytes)`.
    fn used_rx(&mut self) -> Vec<(u16, Vec<u8>)> {
        self.rx
            .take_used(&self.memory)
            .into_iter()
            .map(|(head, len)| {
                let mut bytes = Vec::new();
                let mut left = len as usize;
                for &(addr, size) in &self.rx_buffers[&head] {
                    let take = left.min(size as usize);
                    let mut piece = vec![0; take];
                    self.memory
                        .read_slice(&mut piece, GuestAddress(addr))
                        .unwrap();
                    bytes.extend(piece);
                    left -= take;
                }
                (head, bytes)
            })
            .collect()
    }

    /// Whole packets received: (header, frame), joining merged buffers.
    fn received(&mut self) -> Vec<([u8; NET_HDR_SIZE], Vec<u8>)> {
        let mut packets = Vec::new();
        let mut used = self.used_rx().into_iter();
        while let Some((_, first)) = used.next() {
            assert!(
                first.len() >= NET_HDR_SIZE,
                "a used buffer without a header"
            );
            let header: [u8; NET_HDR_SIZE] = first[..NET_HDR_SIZE].try_into().unwrap();
            let buffers = u16::from_le_bytes([header[10], header[11]]);
            let mut frame = first[NET_HDR_SIZE..].to_vec();
            for _ in 1..buffers {
                frame.extend(used.next().expect("num_buffers promised more").1);
            }
            packets.push((header, frame));
        }
        packets
    }

    fn host_sends(&self, frame: Vec<u8>) {
        self.backend.lock().unwrap().inbound.push_back(frame);
    }

    fn host_received(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.backend.lock().unwrap().outbound)
    }

    fn stat(&self, pick: impl Fn(&NetStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(self.device.stats()).load(Ordering::Relaxed)
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn without(bit: u32) -> impl Fn(u64) -> u64 {
    move |offered| offered & !(1 << bit)
}

#[test]
fn config_space_holds_mac_link_and_one_queue_pair() {
    let guest = Guest::plain();
    let mut config = [0xffu8; 12];
    guest.device.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC.0);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), LINK_UP);
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1);
    assert_eq!(&config[10..], &[0, 0], "beyond the config space reads zero");
    let mut status = [0u8; 2];
    guest.device.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), LINK_UP);
    let mut far = [0xffu8; 4];
    guest.device.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn offloads_are_offered_only_over_a_backend_with_headers() {
    let plain = Guest::plain().device.features();
    let tap = Guest::new(true, |offered| offered).device.features();
    for bit in [
        features::CSUM,
        features::GUEST_CSUM,
        features::HOST_TSO4,
        features::GUEST_TSO6,
    ] {
        assert_eq!(plain & (1 << bit), 0, "bit {bit} over a plain backend");
        assert_ne!(tap & (1 << bit), 0, "bit {bit} over a TAP-like backend");
    }
    for bit in [features::MAC, features::STATUS, features::MRG_RXBUF] {
        assert_ne!(plain & (1 << bit), 0, "bit {bit}");
    }
}

#[test]
fn the_guest_offloads_reach_the_backend() {
    let guest = Guest::new(true, without(features::GUEST_TSO6));
    let offloads = guest.backend.lock().unwrap().offloads.unwrap();
    assert_eq!(
        offloads,
        Offloads {
            csum: true,
            tso4: true,
            tso6: false
        }
    );
}

#[test]
fn segmentation_without_its_checksum_offload_is_refused() {
    let mut guest = Guest::new(true, |offered| offered);
    let offered = guest.device.features();
    let err = guest
        .device
        .check_features(offered & !(1 << features::CSUM))
        .unwrap_err();
    assert!(err.to_string().contains("requires"), "{err}");
    assert!(guest
        .device
        .check_features(offered & !(1 << features::GUEST_CSUM))
        .is_err());
}

#[test]
fn frames_go_out_without_the_header() {
    let mut guest = Guest::plain();
    let sent = frame(1514, 1);
    let head = guest.send(&sent);
    assert_eq!(guest.host_received(), vec![sent]);
    assert_eq!(guest.tx.take_used(&guest.memory), vec![(head, 0)]);
    assert_eq!(guest.stat(|s| &s.tx_frames), 1);
    assert_eq!(guest.stat(|s| &s.tx_bytes), 1514);
}

#[test]
fn a_backend_with_headers_gets_the_guest_header_too() {
    let mut guest = Guest::new(true, |offered| offered);
    let mut header = [0u8; NET_HDR_SIZE];
    header[0] = 1; // NEEDS_CSUM
    let payload = frame(100, 2);
    guest.send_chain(&[(&header, 0), (&payload, 0)]);
    guest.device.run_pass();
    let out = guest.host_received();
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][..NET_HDR_SIZE], &header);
    assert_eq!(&out[0][NET_HDR_SIZE..], &payload[..]);
}

#[test]
fn frames_come_in_behind_a_header_that_counts_one_buffer() {
    let mut guest = Guest::new(false, without(features::MRG_RXBUF));
    guest.host_sends(frame(60, 3));
    guest.host_sends(frame(1514, 4));
    guest.give_rx(4, 2048);
    let got = guest.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, frame(60, 3));
    assert_eq!(got[1].1, frame(1514, 4));
    for (header, _) in &got {
        assert_eq!(&header[..10], &[0; 10]);
        assert_eq!(u16::from_le_bytes([header[10], header[11]]), 1);
    }
    assert_ne!(guest.interrupt.status(), 0, "the guest was interrupted");
}

#[test]
fn a_large_frame_spans_merged_buffers() {
    let mut guest = Guest::plain();
    let big = frame(MAX_FRAME_SIZE, 5);
    guest.host_sends(big.clone());
    guest.give_rx(40, 2048);
    let got = guest.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, big);
    let buffers = u16::from_le_bytes([got[0].0[10], got[0].0[11]]);
    assert_eq!(usize::from(buffers), MAX_PACKET_SIZE.div_ceil(2048));
}

#[test]
fn a_full_rx_queue_keeps_the_frames_until_buffers_come() {
    let mut guest = Guest::plain();
    for seed in 0..5 {
        guest.host_sends(frame(3000, seed));
    }
    // One buffer of 2048 cannot hold a 3000-byte frame: nothing is taken, nothing dropped.
    guest.give_rx(1, 2048);
    assert!(guest.received().is_empty());
    assert_eq!(guest.stat(|s| &s.rx_dropped), 0);
    // Enough for two frames.
    guest.give_rx(3, 2048);
    let got = guest.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].1, frame(3000, 0));
    assert_eq!(got[1].1, frame(3000, 1));
    assert_eq!(
        guest.backend.lock().unwrap().inbound.len(),
        2,
        "one frame is in hand"
    );
    guest.give_rx(10, 2048);
    let got = guest.received();
    let seeds: Vec<Vec<u8>> = got.into_iter().map(|(_, f)| f).collect();
    assert_eq!(seeds, vec![frame(3000, 2), frame(3000, 3), frame(3000, 4)]);
    assert_eq!(guest.stat(|s| &s.rx_dropped), 0);
    assert_eq!(guest.stat(|s| &s.rx_frames), 5);
}

#[test]
fn an_rx_buffer_too_small_for_the_frame_drops_the_frame_only() {
    let mut guest = Guest::new(false, without(features::MRG_RXBUF));
    guest.host_sends(frame(1514, 6));
    guest.host_sends(frame(100, 7));
    guest.give_rx(1, 1000);
    let used = guest.used_rx();
    assert_eq!(used.len(), 1);
    assert!(used[0].1.is_empty(), "the small buffer comes back empty");
    assert_eq!(guest.stat(|s| &s.rx_dropped), 1);
    guest.give_rx(1, 2048);
    let got = guest.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame(100, 7));
}

#[test]
fn an_rx_chain_shorter_than_the_header_drops_the_frame() {
    let mut guest = Guest::new(false, without(features::MRG_RXBUF));
    guest.host_sends(frame(60, 8));
    guest.give_rx(1, 4);
    assert_eq!(guest.used_rx(), vec![(0, Vec::new())]);
    assert_eq!(guest.stat(|s| &s.rx_dropped), 1);
}

#[test]
fn rx_chains_with_readable_descriptors_only_are_passed_over() {
    let mut guest = Guest::new(false, without(features::MRG_RXBUF));
    guest.host_sends(frame(60, 9));
    let addr = guest.alloc(2048);
    let head = guest.rx.add(&guest.memory, &[(addr, 2048, 0)]);
    guest.rx_buffers.insert(head, vec![(addr, 2048)]);
    guest.device.run_pass();
    assert_eq!(guest.used_rx(), vec![(head, Vec::new())]);
    guest.give_rx(1, 2048);
    assert_eq!(
        guest.received().len(),
        0,
        "the frame was dropped with the bad chain"
    );
    guest.host_sends(frame(60, 10));
    guest.device.run_pass();
    assert_eq!(guest.received()[0].1, frame(60, 10));
}

#[test]
fn a_tx_chain_shorter_than_the_header_is_dropped() {
    let mut guest = Guest::plain();
    let head = guest.send_chain(&[(&[0u8; 8], 0)]);
    let exact = guest.send_chain(&[(&[0u8; NET_HDR_SIZE], 0)]);
    guest.device.run_pass();
    assert!(guest.host_received().is_empty());
    assert_eq!(
        guest.tx.take_used(&guest.memory),
        vec![(head, 0), (exact, 0)]
    );
    assert_eq!(guest.stat(|s| &s.tx_dropped), 2);
    // The device goes on.
    guest.send(&frame(64, 1));
    assert_eq!(guest.host_received().len(), 1);
}

#[test]
fn a_tx_frame_above_65550_bytes_is_dropped() {
    let mut guest = Guest::plain();
    let too_big = frame(MAX_FRAME_SIZE + 1, 2);
    let head = guest.send(&too_big);
    assert!(guest.host_received().is_empty());
    assert_eq!(guest.tx.take_used(&guest.memory), vec![(head, 0)]);
    let largest = frame(MAX_FRAME_SIZE, 3);
    guest.send(&largest);
    assert_eq!(guest.host_received(), vec![largest]);
}

#[test]
fn a_tx_chain_with_a_writable_descriptor_is_dropped() {
    let mut guest = Guest::plain();
    let payload = frame(64, 4);
    let head = guest.send_chain(&[(&[0u8; NET_HDR_SIZE], 0), (&payload, WRITE)]);
    guest.device.run_pass();
    assert!(guest.host_received().is_empty());
    assert_eq!(guest.tx.take_used(&guest.memory), vec![(head, 0)]);
    assert_eq!(guest.stat(|s| &s.tx_dropped), 1);
}

#[test]
fn a_tx_chain_outside_guest_memory_is_dropped() {
    let mut guest = Guest::plain();
    let head = guest.tx.add(&guest.memory, &[(MEMORY_SIZE - 4, 64, 0)]);
    guest.device.run_pass();
    assert_eq!(guest.tx.take_used(&guest.memory), vec![(head, 0)]);
    assert_eq!(guest.stat(|s| &s.tx_dropped), 1);
}

#[test]
fn segmentation_the_guest_did_not_negotiate_is_dropped() {
    let mut guest = Guest::new(true, without(features::HOST_TSO4));
    let mut header = [0u8; NET_HDR_SIZE];
    header[1] = 1; // GSO_TCPV4
    guest.send_chain(&[(&header, 0), (&frame(3000, 1), 0)]);
    guest.device.run_pass();
    assert!(guest.host_received().is_empty());
    header[1] = 4; // GSO_TCPV6: negotiated
    guest.send_chain(&[(&header, 0), (&frame(3000, 1), 0)]);
    guest.device.run_pass();
    assert_eq!(guest.host_received().len(), 1);
}

#[test]
fn a_full_backend_holds_frames_in_the_queue() {
    let mut guest = Guest::plain();
    guest.backend.lock().unwrap().full = true;
    let first = guest.send(&frame(100, 1));
    guest.send(&frame(100, 2));
    assert!(
        guest.tx.take_used(&guest.memory).is_empty(),
        "nothing taken while full"
    );
    assert!(guest.device.core().tx_blocked);
    guest.backend.lock().unwrap().full = false;
    guest.device.run_pass();
    assert_eq!(guest.host_received(), vec![frame(100, 1), frame(100, 2)]);
    let used = guest.tx.take_used(&guest.memory);
    assert_eq!(used.len(), 2);
    assert_eq!(used[0].0, first);
    assert!(!guest.device.core().tx_blocked);
    assert_eq!(guest.stat(|s| &s.tx_dropped), 0);
}

#[test]
fn a_backend_that_goes_away_takes_the_link_down_and_nothing_else() {
    let mut guest = Guest::plain();
    guest.interrupt.acknowledge(u32::MAX);
    guest.backend.lock().unwrap().gone = true;
    guest.send(&frame(64, 1));
    assert!(!guest.device.link_up());
    assert_ne!(guest.interrupt.status() & INTERRUPT_CONFIG_CHANGE, 0);
    let mut status = [0u8; 2];
    guest.device.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 0);
    // The guest's frames are still taken (and dropped): no stuck queue.
    guest.send(&frame(64, 2));
    assert_eq!(guest.tx.take_used(&guest.memory).len(), 2);
    guest.give_rx(2, 2048);
    assert!(guest.received().is_empty());
}

#[test]
fn a_corrupt_ring_asks_for_a_reset_without_panicking() {
    let mut guest = Guest::plain();
    // The available index runs far ahead of the queue size.
    let avail_idx_addr = 0x3000 + 16 * u64::from(QUEUE_SIZE) + 2;
    guest
        .memory
        .write_obj(1000u16, GuestAddress(avail_idx_addr))
        .unwrap();
    guest.device.run_pass();
    assert!(guest.interrupt.needs_reset());
    // Nothing moves any more, and nothing panics.
    guest.host_sends(frame(64, 1));
    guest.give_rx(1, 2048);
    assert!(guest.used_rx().is_empty());
}

#[test]
fn nothing_moves_while_paused() {
    let mut guest = Guest::plain();
    let states = guest.device.pause().unwrap();
    assert_eq!(states.len(), 2);
    guest.host_sends(frame(64, 1));
    guest.give_rx(1, 2048);
    guest.send(&frame(64, 2));
    assert!(guest.used_rx().is_empty());
    assert!(guest.host_received().is_empty());
    guest.device.resume();
    guest.device.run_pass();
    assert_eq!(guest.received().len(), 1);
    assert_eq!(guest.host_received().len(), 1);
}

#[test]
fn a_reset_drops_the_frame_in_hand_and_the_queues() {
    let mut guest = Guest::plain();
    guest.host_sends(frame(3000, 1));
    guest.give_rx(1, 100);
    guest.device.reset();
    assert!(guest.device.core().queues.is_none());
    // The device reads nothing without queues.
    guest.host_sends(frame(60, 2));
    guest.device.run_pass();
    assert_eq!(guest.backend.lock().unwrap().inbound.len(), 1);
}

#[test]
fn config_writes_are_ignored() {
    let mut guest = Guest::plain();
    guest.device.write_config(0, &[0xff; 6]);
    assert_eq!(guest.device.mac(), MAC);
    let mut config = [0u8; 6];
    guest.device.read_config(0, &mut config);
    assert_eq!(config, MAC.0);
}

#[test]
fn the_saved_state_carries_mac_and_link_and_restores_on_a_new_device() {
    let mut guest = Guest::plain();
    let saved_up = guest.device.saved_state();
    assert_eq!(&saved_up[..6], &MAC.0);
    guest.backend.lock().unwrap().gone = true;
    guest.send(&frame(64, 1));
    let saved_down = guest.device.saved_state();

    let mut fresh = Guest::plain();
    fresh.device.restore_state(&saved_up).unwrap();
    assert!(fresh.device.link_up());
    fresh.device.restore_state(&saved_down).unwrap();
    assert!(
        !fresh.device.link_up(),
        "a link the guest saw down stays down"
    );
    assert!(
        fresh.device.restore_state(&[]).is_ok(),
        "older snapshots have none"
    );

    let mut other_mac = saved_up.clone();
    other_mac[5] ^= 1;
    let err = fresh.device.restore_state(&other_mac).unwrap_err();
    assert!(err.contains("had MAC"), "{err}");
    assert!(fresh.device.restore_state(&saved_up[..4]).is_err());
}
