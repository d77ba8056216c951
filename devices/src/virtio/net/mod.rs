//! virtio-net: one RX and one TX queue over a host backend that moves Ethernet frames.
//!
//! Backends ([`backend::Backend`]): a TAP interface ([`tap::Tap`], host-only and bridged
//! networks; with `IFF_VNET_HDR` it carries the checksum and segmentation offloads) and a stream
//! socket with QEMU's framing ([`stream::Stream`], a 32-bit big-endian length before each
//! frame), which is how Kiln talks to a [`passt`] child for rootless NAT with port forwarding.
//!
//! Modules: [`backend`] (the trait), [`tap`], [`stream`], [`passt`], [`device`] (the
//! [`VirtioDevice`](super::VirtioDevice) and its event handler) and `rxtx` (moving frames
//! between the queues and the backend).

pub mod backend;
pub mod device;
pub mod passt;
mod rxtx;
pub mod stream;
pub mod tap;

pub use backend::{Backend, BackendError, Offloads};
pub use device::{Net, NetStats};

use virtio_bindings::virtio_net as bits;

/// virtio device ID of a network card.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Transmit queue (driver to device).
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`: every virtio 1.x packet starts with it (`num_buffers` included,
/// whether or not `MRG_RXBUF` was negotiated).
pub const NET_HDR_SIZE: usize = 12;
/// Largest Ethernet frame Kiln moves: 64 KiB of IP (the largest TSO segment) plus an Ethernet
/// header with a VLAN tag, as QEMU and Linux's virtio-net allow.
pub const MAX_FRAME_SIZE: usize = 65550;
/// Largest packet on a queue: header and frame.
pub const MAX_PACKET_SIZE: usize = NET_HDR_SIZE + MAX_FRAME_SIZE;
/// `status` bit: the link is up.
pub const LINK_UP: u16 = bits::VIRTIO_NET_S_LINK_UP as u16;

/// Feature bits of virtio-net that Kiln offers.
pub mod features {
    use super::bits;

    /// The device has a MAC address in its configuration space.
    pub const MAC: u32 = bits::VIRTIO_NET_F_MAC;
    /// The configuration space has a link status.
    pub const STATUS: u32 = bits::VIRTIO_NET_F_STATUS;
    /// A received packet may span several receive buffers.
    pub const MRG_RXBUF: u32 = bits::VIRTIO_NET_F_MRG_RXBUF;
    /// The device completes checksums of frames the guest sends.
    pub const CSUM: u32 = bits::VIRTIO_NET_F_CSUM;
    /// The guest accepts frames with partial checksums.
    pub const GUEST_CSUM: u32 = bits::VIRTIO_NET_F_GUEST_CSUM;
    /// The guest accepts TCPv4 segments larger than the MTU.
    pub const GUEST_TSO4: u32 = bits::VIRTIO_NET_F_GUEST_TSO4;
    /// The guest accepts TCPv6 segments larger than the MTU.
    pub const GUEST_TSO6: u32 = bits::VIRTIO_NET_F_GUEST_TSO6;
    /// The device segments TCPv4 from the guest.
    pub const HOST_TSO4: u32 = bits::VIRTIO_NET_F_HOST_TSO4;
    /// The device segments TCPv6 from the guest.
    pub const HOST_TSO6: u32 = bits::VIRTIO_NET_F_HOST_TSO6;
}

/// A MAC address (in configs: the usual `02:00:00:00:00:01` text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddress(pub [u8; 6]);

impl TryFrom<String> for MacAddress {
    type Error = MacError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<MacAddress> for String {
    fn from(mac: MacAddress) -> Self {
        mac.to_string()
    }
}

/// Why a MAC address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six hexadecimal pairs.
    #[error("'{0}' is not a MAC address (six hexadecimal pairs separated by ':', e.g. 02:00:00:00:00:01)")]
    Malformed(String),
    /// The group bit is set: no NIC can have such an address.
    #[error("'{0}' is a multicast address (the lowest bit of the first byte is set); a NIC needs a unicast one")]
    Multicast(String),
    /// All zeros.
    #[error("'{0}' is the all-zero address, which no NIC may have")]
    Zero(String),
}

impl std::str::FromStr for MacAddress {
    type Err = MacError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let malformed = || MacError::Malformed(text.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(malformed)?;
            if part.len() != 2 {
                return Err(malformed());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| malformed())?;
        }
        if parts.next().is_some() {
            return Err(malformed());
        }
        if bytes[0] & 1 != 0 {
            return Err(MacError::Multicast(text.to_string()));
        }
        if bytes == [0; 6] {
            return Err(MacError::Zero(text.to_string()));
        }
        Ok(Self(bytes))
    }
}

impl std::fmt::Display for MacAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddress = "02:4B:4c:00:0a:ff".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x4b, 0x4c, 0x00, 0x0a, 0xff]);
        assert_eq!(mac.to_string(), "02:4b:4c:00:0a:ff");
    }

    #[test]
    fn bad_mac_addresses_say_why() {
        for (text, reason) in [
            ("01:00:5e:00:00:01", "multicast"),
            ("ff:ff:ff:ff:ff:ff", "multicast"),
            ("00:00:00:00:00:00", "all-zero"),
            ("02:00:00:00:00", "not a MAC"),
            ("02:00:00:00:00:01:02", "not a MAC"),
            ("02-00-00-00-00-01", "not a MAC"),
            ("02:00:00:00:00:g1", "not a MAC"),
            ("2:00:00:00:00:01", "not a MAC"),
            ("", "not a MAC"),
        ] {
            let err = text.parse::<MacAddress>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
        }
    }
}
