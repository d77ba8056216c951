//! virtio-vsock with Firecracker's hybrid vsock convention: the host side of every connection
//! is a Unix stream socket.
//!
//! - Host to guest: a host client connects to the device's Unix socket `PATH` and writes
//!   `CONNECT <port>\n`; Kiln asks the guest for a stream to `port` and answers
//!   `OK <host-port>\n` once the guest accepted, or closes the socket if it refused.
//! - Guest to host: a guest connecting to CID 2 port P makes Kiln connect to `PATH_P`; nobody
//!   listening there resets the guest's connection.
//!
//! Modules: [`packet`] (header layout, parsing with the `virtio-vsock` crate), [`handshake`]
//! (the `CONNECT` line), [`connection`] (one stream and its credit), [`muxer`] (the connection
//! table and host sockets), [`device`] (the [`VirtioDevice`](super::VirtioDevice) and its event
//! handler).

pub mod connection;
pub mod device;
pub mod handshake;
pub mod muxer;
pub mod packet;

pub use device::Vsock;
pub use muxer::{MuxerError, Timeouts};

/// virtio device ID of a socket device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// The host's context ID: the destination of every guest packet, the source of Kiln's.
pub const HOST_CID: u64 = 2;
/// Lowest context ID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Highest context ID a guest may have (`u32::MAX` is `VMADDR_CID_ANY`; Linux keeps CIDs to
/// 32 bits).
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Transmit queue (driver to device).
pub const TX_QUEUE: usize = 1;
/// Event queue.
pub const EVENT_QUEUE: usize = 2;
