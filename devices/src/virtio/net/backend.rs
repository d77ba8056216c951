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

/// A piece of a frame in host memory (guest memory the device mapped and bounds-checked), so
/// that backends can hand frames to the kernel with `writev`/`sendmsg` straight from guest
/// memory instead of copying them first.
#[derive(Debug, Clone, Copy)]
pub struct FramePart {
    ptr: *const u8,
    len: usize,
}

// SAFETY: a part is only read during a `send_parts` call, while the guest memory mapping it
// points into is held by the device; moving the pointer between threads changes nothing.
unsafe impl Send for FramePart {}

impl FramePart {
    /// A part of `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and readable for as long as the part is used.
    pub unsafe fn new(ptr: *const u8, len: usize) -> Self {
        Self { ptr, len }
    }

    /// A part covering `bytes` (which must outlive its use).
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// As an iovec for `writev`/`sendmsg` (the kernel only reads it).
    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr as *mut libc::c_void,
            iov_len: self.len,
        }
    }

    /// Appends bytes `from..` of the part to `out`.
    pub fn append_to(&self, from: usize, out: &mut Vec<u8>) {
        let from = from.min(self.len);
        let count = self.len - from;
        out.reserve(count);
        // SAFETY: `ptr..ptr + len` is mapped and readable (the contract of `new`), `from` is
        // within it, and `out` has room for `count` more bytes after `reserve`; guest memory may
        // change meanwhile, which only changes the bytes copied (a copy, no reference is made).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.add(from),
                out.as_mut_ptr().add(out.len()),
                count,
            );
            out.set_len(out.len() + count);
        }
    }
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
    /// [`send`](Self::send) for a frame in pieces (straight from guest memory). The default
    /// gathers the pieces into one buffer; TAP and stream backends hand them to the kernel.
    fn send_parts(&mut self, parts: &[FramePart]) -> Result<bool, BackendError> {
        let mut frame = Vec::with_capacity(parts.iter().map(FramePart::len).sum());
        for part in parts {
            part.append_to(0, &mut frame);
        }
        self.send(&frame)
    }
    /// Why the backend went away, in words for the log, once [`BackendError::Gone`] was seen
    /// (a child's exit status, for example).
    fn exit_reason(&mut self) -> Option<String> {
        None
    }
}
