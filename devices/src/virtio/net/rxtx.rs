//! Moving frames between the guest's queues and the backend: one pass of the event handler.
//!
//! RX: the backend's next frame is read into a fixed buffer and stays there until the guest
//! gave enough receive buffers for it (one chain, or several with `MRG_RXBUF`), so a full RX
//! queue loses nothing the backend still holds: the backend is simply not read meanwhile.
//! TX: each chain's descriptors are mapped (bounds-checked against guest memory) and handed to
//! the backend as pieces, which it gives to the kernel with `writev`/`sendmsg` without a copy; a
//! backend that cannot take the frame leaves the chain in the queue (backpressure) until its
//! descriptor is writable again.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use kiln_arch::GuestMemoryMmap;

use super::backend::{Backend, BackendError, FramePart};
use super::{LINK_UP, MAX_PACKET_SIZE, NET_HDR_SIZE};
use crate::log_limit::warn_limited;
use crate::virtio::{next_chain, Interrupt, LogLimiter};

/// Chains moved per queue and pass before the handler lets other events of the loop run.
pub(super) const PASS_BUDGET: u32 = 256;
/// `virtio_net_hdr.gso_type` without the ECN bit.
const GSO_TYPE_MASK: u8 = 0x7f;
const GSO_NONE: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
const GSO_TCPV4: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
const GSO_TCPV6: u8 = virtio_bindings::virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;

/// Frame and drop counters of one NIC, readable from any thread.
#[derive(Debug, Default)]
pub struct NetStats {
    /// Frames given to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes of those frames (headers not counted).
    pub rx_bytes: AtomicU64,
    /// Frames from the backend the guest could not take (receive buffer too small, bad
    /// buffer).
    pub rx_dropped: AtomicU64,
    /// Frames sent to the backend.
    pub tx_frames: AtomicU64,
    /// Bytes of those frames (headers not counted).
    pub tx_bytes: AtomicU64,
    /// Guest frames not sent (malformed chains, link down, backend refused the frame).
    pub tx_dropped: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// The queues of an active device and what the driver negotiated.
#[derive(Debug)]
pub(super) struct Queues {
    pub memory: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub interrupt: Arc<Interrupt>,
    pub mergeable: bool,
    pub guest_csum: bool,
    pub host_tso4: bool,
    pub host_tso6: bool,
    /// A ring is corrupt: the device does nothing more until the driver resets it.
    pub broken: bool,
}

/// What happened to the frame in hand.
enum Delivery {
    /// Written to this many chains (or dropped after taking them).
    Done(u32),
    /// Not enough receive buffers yet: this many were available, all too small together.
    NoRoom(u16),
    /// The ring is corrupt.
    Broken,
}

/// One receive chain taken for the frame in hand: its head and its writable segments.
#[derive(Debug)]
struct RxChain {
    head: u16,
    segments: std::ops::Range<usize>,
    written: u32,
}

/// What the event handler and the device share.
#[derive(Debug)]
pub(super) struct Core {
    pub name: String,
    pub backend: Box<dyn Backend>,
    pub vnet_header: bool,
    pub queues: Option<Queues>,
    pub paused: bool,
    /// The `status` field of the configuration space.
    pub status: Arc<AtomicU16>,
    /// The backend is gone: the link stays down.
    pub backend_gone: bool,
    /// A frame from the guest waits for the backend to become writable.
    pub tx_blocked: bool,
    /// The frame in hand for the guest: header and frame, `rx_len` bytes.
    rx_frame: Box<[u8]>,
    rx_len: Option<usize>,
    /// The pieces of the transmit chain in hand (guest memory, header left out unless the
    /// backend carries it).
    tx_parts: Vec<FramePart>,
    rx_chains: Vec<RxChain>,
    rx_segments: Vec<(GuestAddress, usize)>,
    pub wake: Arc<EventFd>,
    pub warnings: LogLimiter,
    pub stats: Arc<NetStats>,
}

impl Core {
    pub fn new(
        name: String,
        backend: Box<dyn Backend>,
        status: Arc<AtomicU16>,
        wake: Arc<EventFd>,
        stats: Arc<NetStats>,
    ) -> Self {
        Self {
            name,
            vnet_header: backend.has_vnet_header(),
            backend,
            queues: None,
            paused: false,
            status,
            backend_gone: false,
            tx_blocked: false,
            rx_frame: vec![0; MAX_PACKET_SIZE].into_boxed_slice(),
            rx_len: None,
            tx_parts: Vec::new(),
            rx_chains: Vec::new(),
            rx_segments: Vec::new(),
            wake,
            warnings: LogLimiter::new(),
            stats,
        }
    }

    /// Forgets the driver's queues and the frame in hand (device reset).
    pub fn reset(&mut self) {
        self.queues = None;
        self.paused = false;
        self.rx_len = None;
        self.tx_blocked = false;
    }

    /// One pass: everything that can move, moves, unless paused.
    pub fn run(&mut self) {
        if self.paused || self.queues.as_ref().is_none_or(|q| q.broken) {
            return;
        }
        let mut rx_used = 0;
        let mut tx_used = 0;
        let mut budget_left = true;
        loop {
            let taken = self.process_tx();
            let given = self.process_rx();
            tx_used += taken;
            rx_used += given;
            if taken == 0 && given == 0 {
                break;
            }
            if tx_used >= PASS_BUDGET || rx_used >= PASS_BUDGET {
                budget_left = false;
                break;
            }
        }
        if !budget_left {
            // Let the rest of the event loop run; come back at once.
            if let Err(err) = self.wake.write(1) {
                log::error!("{}: cannot wake the event handler: {err}", self.name);
            }
        }
        let Some(queues) = &mut self.queues else {
            return;
        };
        for (queue, used) in [(&mut queues.rx, rx_used), (&mut queues.tx, tx_used)] {
            if used == 0 {
                continue;
            }
            // A spurious interrupt is harmless, a lost one stalls the guest.
            if queue.needs_notification(&queues.memory).unwrap_or(true) {
                queues.interrupt.signal_used_queue();
            }
        }
    }

    /// The backend went away: link down, the guest told, the reason logged (once: the backend
    /// is never read again).
    fn backend_failed(&mut self, why: &str) {
        if self.backend_gone {
            return;
        }
        self.backend_gone = true;
        self.rx_len = None;
        self.tx_blocked = false;
        self.status.fetch_and(!LINK_UP, Ordering::AcqRel);
        let reason = self
            .backend
            .exit_reason()
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default();
        log::error!(
            "{}: the network backend is gone: {why}{reason}; the link is down, the VM keeps running",
            self.name
        );
        if let Some(queues) = &self.queues {
            queues.interrupt.signal_config_change();
        }
    }

    /// Reads the backend's next frame into `rx_frame`; its length with the header.
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            if self.backend_gone {
                return None;
            }
            let start = if self.vnet_header { 0 } else { NET_HDR_SIZE };
            match self.backend.receive(&mut self.rx_frame[start..]) {
                Ok(None) => return None,
                Ok(Some(len)) if self.vnet_header && len < NET_HDR_SIZE => {
                    bump(&self.stats.rx_dropped, 1);
                }
                Ok(Some(0)) => {}
                Ok(Some(len)) => {
                    if !self.vnet_header {
                        self.rx_frame[..NET_HDR_SIZE].fill(0);
                    }
                    return Some(start + len);
                }
                Err(BackendError::Dropped(err)) => {
                    warn_limited!(
                        self.warnings,
                        "net",
                        "{}: cannot read a frame from the backend: {err}",
                        self.name
                    );
                    return None;
                }
                Err(BackendError::Gone(why)) => {
                    self.backend_failed(&why);
                    return None;
                }
            }
        }
    }

    /// Gives the backend's frames to the guest; returns how many chains were used.
    fn process_rx(&mut self) -> u32 {
        let mut given = 0;
        while given < PASS_BUDGET {
            if self.rx_len.is_none() {
                self.rx_len = self.read_frame();
                if self.rx_len.is_none() {
                    break;
                }
            }
            match self.deliver() {
                Delivery::Done(chains) => {
                    given += chains;
                    self.rx_len = None;
                }
                Delivery::NoRoom(had) => {
                    let Some(queues) = &mut self.queues else {
                        break;
                    };
                    // Ask for a kick when buffers come; if more came meanwhile, go on.
                    let more = queues.rx.enable_notification(&queues.memory).and_then(|_| {
                        let available = queues
                            .rx
                            .avail_idx(&queues.memory, std::sync::atomic::Ordering::Acquire)?;
                        Ok((available - std::num::Wrapping(queues.rx.next_avail())).0 > had)
                    });
                    match more {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(err) => {
                            warn_limited!(self.warnings, "net", "{}: RX queue: {err}", self.name);
                            break;
                        }
                    }
                }
                Delivery::Broken => break,
            }
        }
        given
    }

    /// Places the frame in hand into receive chains.
    fn deliver(&mut self) -> Delivery {
        let Some(total) = self.rx_len else {
            return Delivery::Done(0);
        };
        let Some(queues) = &mut self.queues else {
            return Delivery::NoRoom(0);
        };
        let Queues {
            memory,
            rx,
            interrupt,
            broken,
            mergeable,
            guest_csum,
            ..
        } = queues;
        self.rx_chains.clear();
        self.rx_segments.clear();
        let max_chains = if *mergeable {
            usize::from(rx.size())
        } else {
            1
        };
        let mut capacity = 0usize;
        while capacity < total && self.rx_chains.len() < max_chains {
            let chain = match next_chain(rx, memory) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    // Put the chains back: they are taken again once there are enough.
                    for _ in 0..self.rx_chains.len() {
                        rx.go_to_previous_position();
                    }
                    return Delivery::NoRoom(self.rx_chains.len() as u16);
                }
                Err(err) => {
                    queues_broken(&mut self.warnings, &self.name, interrupt, "RX", &err);
                    *broken = true;
                    return Delivery::Broken;
                }
            };
            let head = chain.head_index();
            let first = self.rx_segments.len();
            // Readable descriptors in a receive chain are the driver's mistake: skipped.
            for descriptor in chain.filter(|d| d.is_write_only()) {
                if capacity >= total {
                    break;
                }
                let room = (descriptor.len() as usize).min(total - capacity);
                self.rx_segments.push((descriptor.addr(), room));
                capacity += room;
            }
            self.rx_chains.push(RxChain {
                head,
                segments: first..self.rx_segments.len(),
                written: 0,
            });
        }
        let chains = self.rx_chains.len() as u32;
        let fits = capacity >= total;
        let mut delivered = fits;
        if fits {
            let num_buffers = if *mergeable { chains as u16 } else { 1 };
            self.rx_frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
            if !*guest_csum {
                // Neither partial checksums nor segments for a guest that did not ask.
                self.rx_frame[..2].fill(0);
            }
            let mut offset = 0;
            'chains: for chain in &mut self.rx_chains {
                for &(addr, len) in &self.rx_segments[chain.segments.clone()] {
                    if memory
                        .write_slice(&self.rx_frame[offset..offset + len], addr)
                        .is_err()
                    {
                        delivered = false;
                        break 'chains;
                    }
                    offset += len;
                    chain.written += len as u32;
                }
            }
        }
        if delivered {
            bump(&self.stats.rx_frames, 1);
            bump(&self.stats.rx_bytes, (total - NET_HDR_SIZE) as u64);
        } else {
            bump(&self.stats.rx_dropped, 1);
            warn_limited!(
                self.warnings,
                "net",
                "{}: a {total}-byte packet does not fit the guest's receive buffers ({capacity} bytes{}); dropped",
                self.name,
                if fits { ", some outside guest memory" } else { "" }
            );
        }
        for chain in &self.rx_chains {
            let len = if delivered { chain.written } else { 0 };
            if let Err(err) = rx.add_used(&*memory, chain.head, len) {
                warn_limited!(self.warnings, "net", "{}: RX queue: {err}", self.name);
            }
        }
        Delivery::Done(chains)
    }

    /// Sends the guest's frames; returns how many chains were used.
    fn process_tx(&mut self) -> u32 {
        let mut taken = 0;
        loop {
            let Some(queues) = &mut self.queues else {
                return taken;
            };
            if let Err(err) = queues.tx.disable_notification(&queues.memory) {
                warn_limited!(self.warnings, "net", "{}: TX queue: {err}", self.name);
                return taken;
            }
            while taken < PASS_BUDGET {
                let (head, len) = match self.take_tx_chain() {
                    TxChain::Empty => break,
                    TxChain::Broken => return taken,
                    TxChain::Bad(head, problem) => {
                        warn_limited!(
                            self.warnings,
                            "net",
                            "{}: a transmit chain from the guest {problem}; frame dropped",
                            self.name
                        );
                        bump(&self.stats.tx_dropped, 1);
                        if !self.finish_tx(head) {
                            return taken;
                        }
                        taken += 1;
                        continue;
                    }
                    TxChain::Frame(head, len) => (head, len),
                };
                let mut sent = false;
                if !self.backend_gone {
                    let sent_now = self.backend.send_parts(&self.tx_parts);
                    self.tx_parts.clear();
                    match sent_now {
                        Ok(true) => sent = true,
                        Ok(false) => {
                            // Backpressure: the chain stays for when the backend drains.
                            if let Some(queues) = &mut self.queues {
                                queues.tx.go_to_previous_position();
                            }
                            self.tx_blocked = true;
                            return taken;
                        }
                        Err(BackendError::Dropped(err)) => {
                            warn_limited!(
                                self.warnings,
                                "net",
                                "{}: the backend refused a frame: {err}",
                                self.name
                            );
                        }
                        Err(BackendError::Gone(why)) => self.backend_failed(&why),
                    }
                }
                self.tx_blocked = false;
                if sent {
                    bump(&self.stats.tx_frames, 1);
                    bump(&self.stats.tx_bytes, (len - NET_HDR_SIZE) as u64);
                } else {
                    bump(&self.stats.tx_dropped, 1);
                }
                if !self.finish_tx(head) {
                    return taken;
                }
                taken += 1;
            }
            if taken >= PASS_BUDGET {
                return taken;
            }
            let Some(queues) = &mut self.queues else {
                return taken;
            };
            match queues.tx.enable_notification(&queues.memory) {
                Ok(true) => continue,
                Ok(false) => return taken,
                Err(err) => {
                    warn_limited!(self.warnings, "net", "{}: TX queue: {err}", self.name);
                    return taken;
                }
            }
        }
    }

    /// Takes the next transmit chain and maps its pieces into `tx_parts`.
    fn take_tx_chain(&mut self) -> TxChain {
        let Some(queues) = &mut self.queues else {
            return TxChain::Empty;
        };
        let chain = match next_chain(&mut queues.tx, &queues.memory) {
            Ok(Some(chain)) => chain,
            Ok(None) => return TxChain::Empty,
            Err(err) => {
                queues_broken(
                    &mut self.warnings,
                    &self.name,
                    &queues.interrupt,
                    "TX",
                    &err,
                );
                queues.broken = true;
                return TxChain::Broken;
            }
        };
        let head = chain.head_index();
        self.tx_parts.clear();
        // The header is read for its checks; it is sent only to a backend that carries it.
        let mut header = [0u8; NET_HDR_SIZE];
        let skip = if self.vnet_header { 0 } else { NET_HDR_SIZE };
        let mut len = 0usize;
        for descriptor in chain {
            if descriptor.is_write_only() {
                return TxChain::Bad(head, "has a device-writable descriptor");
            }
            let piece = descriptor.len() as usize;
            if len + piece > MAX_PACKET_SIZE {
                return TxChain::Bad(head, "is larger than a 65550-byte frame and its header");
            }
            let in_header = NET_HDR_SIZE.saturating_sub(len).min(piece);
            if in_header > 0
                && queues
                    .memory
                    .read_slice(&mut header[len..len + in_header], descriptor.addr())
                    .is_err()
            {
                return TxChain::Bad(head, "points outside guest memory");
            }
            let unsent = skip.saturating_sub(len).min(piece);
            if piece > unsent {
                let Some(addr) = descriptor.addr().checked_add(unsent as u64) else {
                    return TxChain::Bad(head, "points outside guest memory");
                };
                // All of the range must be guest memory (several regions' mappings if it
                // crosses one's end), or nothing of it is sent.
                for slice in queues.memory.get_slices(addr, piece - unsent) {
                    let Ok(slice) = slice else {
                        return TxChain::Bad(head, "points outside guest memory");
                    };
                    let guard = slice.ptr_guard();
                    // SAFETY: vm-memory checked that the range is mapped guest memory; the
                    // mapping lives as long as `queues.memory`, which outlives the send of
                    // this frame (the parts are cleared right after it).
                    self.tx_parts
                        .push(unsafe { FramePart::new(guard.as_ptr(), slice.len()) });
                }
            }
            len += piece;
        }
        if len <= NET_HDR_SIZE {
            return TxChain::Bad(head, "is not longer than the virtio-net header");
        }
        if self.vnet_header {
            let gso = header[1] & GSO_TYPE_MASK;
            let allowed = gso == GSO_NONE
                || (gso == GSO_TCPV4 && queues.host_tso4)
                || (gso == GSO_TCPV6 && queues.host_tso6);
            if !allowed {
                return TxChain::Bad(head, "asks for a segmentation offload it did not negotiate");
            }
        }
        TxChain::Frame(head, len)
    }

    /// Returns a transmit chain to the guest; false if the ring cannot take it.
    fn finish_tx(&mut self, head: u16) -> bool {
        let Some(queues) = &mut self.queues else {
            return false;
        };
        if let Err(err) = queues.tx.add_used(&queues.memory, head, 0) {
            warn_limited!(self.warnings, "net", "{}: TX queue: {err}", self.name);
            return false;
        }
        true
    }
}

/// The next transmit chain.
enum TxChain {
    /// None available.
    Empty,
    /// The ring is corrupt.
    Broken,
    /// A chain no frame can be taken from, and why.
    Bad(u16, &'static str),
    /// A frame of this many bytes (header included), its pieces in `tx_parts`.
    Frame(u16, usize),
}

/// A corrupt ring: logged, and the driver is told the device needs a reset.
fn queues_broken(
    warnings: &mut LogLimiter,
    name: &str,
    interrupt: &Interrupt,
    queue: &str,
    err: &virtio_queue::Error,
) {
    warn_limited!(
        warnings,
        "net",
        "{name}: {queue} queue: {err}; the device stops until the guest resets it"
    );
    interrupt.signal_needs_reset();
}
