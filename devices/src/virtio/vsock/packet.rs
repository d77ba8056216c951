//! The vsock packet header (virtio 1.2, 5.10.6) and the parsing of queue buffers into packets.
//!
//! Buffers the guest hands over are parsed by the `virtio-vsock` crate
//! ([`VsockPacket::from_tx_virtq_chain`] / [`VsockPacket::from_rx_virtq_chain`]), which checks
//! descriptor directions and sizes against guest memory. The header Kiln writes back is built
//! here as plain bytes.

use virtio_queue::DescriptorChain;
use vm_memory::Bytes;

use kiln_arch::GuestMemoryMmap;

pub use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};

/// `type`: a stream socket, the only type Kiln offers (no `VIRTIO_VSOCK_F_SEQPACKET`).
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, or torn down).
    pub const RST: u16 = 3;
    /// One or both directions are closed (`flags`: [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's receive buffer space changed (`buf_alloc`, `fwd_cnt`).
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `flags` of a `SHUTDOWN` packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// `id` of the only event: the transport was reset, every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_SIZE: u32 = 4;

/// Largest payload of one packet from the guest: Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// A packet header, in host byte order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// The 44 little-endian bytes of `struct virtio_vsock_hdr`.
    pub fn to_bytes(&self) -> [u8; PKT_HEADER_SIZE] {
        let mut bytes = [0u8; PKT_HEADER_SIZE];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// Parses `struct virtio_vsock_hdr`.
    pub fn from_bytes(bytes: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0u8; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0u8; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header of a packet parsed by the `virtio-vsock` crate.
    pub fn of(packet: &VsockPacket<'_, crate::virtio::GuestBitmap<'_>>) -> Self {
        Self {
            src_cid: packet.src_cid(),
            dst_cid: packet.dst_cid(),
            src_port: packet.src_port(),
            dst_port: packet.dst_port(),
            len: packet.len(),
            type_: packet.type_(),
            op: packet.op(),
            flags: packet.flags(),
            buf_alloc: packet.buf_alloc(),
            fwd_cnt: packet.fwd_cnt(),
        }
    }

    /// The RST that answers this packet: addresses swapped, no payload.
    pub fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op::RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// Reads the header of a TX chain the crate refused, when its first descriptor holds one, so
/// that the connection it names can be reset.
pub fn raw_tx_header(
    memory: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Option<Header> {
    let head = chain.clone().next()?;
    if head.is_write_only() || (head.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut bytes = [0u8; PKT_HEADER_SIZE];
    memory.read_slice(&mut bytes, head.addr()).ok()?;
    Some(Header::from_bytes(&bytes))
}

/// Human-readable name of an `op`, for log lines.
pub fn op_name(op: u16) -> &'static str {
    match op {
        op::REQUEST => "REQUEST",
        op::RESPONSE => "RESPONSE",
        op::RST => "RST",
        op::SHUTDOWN => "SHUTDOWN",
        op::RW => "RW",
        op::CREDIT_UPDATE => "CREDIT_UPDATE",
        op::CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown op",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_round_trip_in_spec_layout() {
        let header = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1122_3344,
            dst_port: 1234,
            len: 5,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: shutdown::BOTH,
            buf_alloc: 256 * 1024,
            fwd_cnt: 77,
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[0], 0x08, "src_cid is little-endian at offset 0");
        assert_eq!(&bytes[16..20], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), header);
    }

    #[test]
    fn reset_reply_swaps_addresses() {
        let request = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1025,
            dst_port: 80,
            op: op::REQUEST,
            type_: TYPE_STREAM,
            ..Header::default()
        };
        let reply = request.reset_reply();
        assert_eq!((reply.src_cid, reply.dst_cid), (2, 3));
        assert_eq!((reply.src_port, reply.dst_port), (80, 1025));
        assert_eq!(reply.op, op::RST);
    }
}
