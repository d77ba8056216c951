//! What the device needs from the host side of a NIC.

use std::io;
use std::os::fd::RawFd;

/// The receive offloads the guest accepted, to be passed on to a backend that carries
/// virtio-net headers (a TAP with `IFF_VNET_HDR` hands such frames over only when told).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`GUEST_CSUM`).
    pub csum: bool,
    /// TCPv4 segments above the MTU (`GUEST_TSO4`).
    pub tso4: bool,
    /// TCPv6 segments above the MTU (`GUEST_TSO6`).
    pub tso6: bool,
}

/// A backend failure.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// This frame was lost; the backend works on.
    #[error("a frame was dropped: {0}")]
    Dropped(io::Error),
    /// The backend is gone for good (its peer closed or broke the protocol): the link goes
    /// down.
    #[error("{0}")]
    Gone(String),
}

/// The host side of a NIC: moves whole Ethernet frames.
///
/// The device watches [`fd`](Self::fd) edge-triggered for readability (and, while a frame
/// waits to be sent, writability), so [`receive`](Self::receive) is called until it says there
/// is nothing more, or until the guest has no room left.
pub trait Backend: Send + std::fmt::Debug {
    /// The descriptor to watch.
    fn fd(&self) -> RawFd;
    /// Whether frames carry a `virtio_net_hdr_v1` in front (both ways), so that offloads can
    /// be offered to the guest.
    fn has_vnet_header(&self) -> bool;
    /// Tells the backend which receive offloads the guest accepted (only called when
    /// [`has_vnet_header`](Self::has_vnet_header)).
    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        let _ = offloads;
        Ok(())
    }
    /// Reads the next frame (with its header, if the backend carries one) into `buf`, which
    /// holds [`MAX_PACKET_SIZE`](super::MAX_PACKET_SIZE) bytes. `Ok(None)`: nothing now.
    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError>;
    /// Sends one frame (with its header, if the backend carries one). `Ok(false)`: the
    /// backend cannot take it now; the device keeps it in the guest's queue and asks again
    /// once [`fd`](Self::fd) is writable.
    fn send(&mut self, frame: &[u8]) -> Result<bool, BackendError>;
    /// Why the backend went away, in words for the log, once [`BackendError::Gone`] was seen
    /// (a child's exit status, for example).
    fn exit_reason(&mut self) -> Option<String> {
        None
    }
}
