//! Ordering of the `TRANSPORT_RESET` event against new connections.
//!
//! After a restore the device drops every connection and sends the event. Linux's driver
//! handles the receive queue and the event queue in separate work items, in no fixed order, so
//! a host connection request delivered next to the event could reach the guest while its old
//! sockets still stand: accepted and then reset with them, or, on the addresses of an old
//! connection, answered by the old socket with a reset. The device therefore sends nothing on
//! the receive queue until the driver gives the event buffer back, which it does only after
//! resetting its sockets, and host ports of host-initiated connections continue across a
//! snapshot instead of starting again at the first.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::Core;
use crate::virtio::vsock::muxer::Muxer;
use kiln_arch::GuestMemoryMmap;

impl Core {
    /// A `TRANSPORT_RESET` event is waiting for a buffer or for the guest to handle it.
    pub(super) fn reset_event_outstanding(&mut self) -> bool {
        if self.reset_event_pending {
            return true;
        }
        let Some(index_then) = self.reset_event_unhandled else {
            return false;
        };
        // An unreadable ring counts as handled: never wait for what cannot be seen.
        let handled = self.queues.as_ref().is_none_or(|queues| {
            let unchanged = queues
                .event
                .avail_idx(&queues.memory, Ordering::Acquire)
                .is_ok_and(|index_now| index_now == index_then);
            !unchanged
        });
        if handled {
            log::debug!("vsock: the guest handled the transport reset event");
            self.reset_event_unhandled = None;
        }
        !handled
    }
}

/// With `EVENT_IDX`, the driver notifies only when its available index passes the device's
/// `avail_event`: set it to `index` so that the buffer given back after the reset event is
/// noticed at once (the event queue is otherwise never asked for notifications).
pub(super) fn ask_for_notification_after(
    queue: &Queue,
    memory: &GuestMemoryMmap,
    index: Wrapping<u16>,
) {
    if !queue.event_idx_enabled() {
        return;
    }
    // struct virtq_used { le16 flags; le16 idx; struct virtq_used_elem ring[size]; le16 avail_event; }
    let offset = 4 + 8 * u64::from(queue.size());
    if let Some(address) = queue.used_ring().checked_add(offset) {
        // A failed write only means the guest's next notification is not asked for.
        let _ = memory.store(index.0.to_le(), GuestAddress(address), Ordering::Release);
    }
}

/// The device's own snapshot state: the next host port for host-initiated connections, so
/// that the restored device does not start again at the first one. The guest may still hold
/// its socket of an old connection on such a port (until the reset event is handled and the
/// application closes it): a new connection with the same addresses would meet that socket
/// and be refused.
pub(super) fn saved_state(muxer: &Muxer) -> Vec<u8> {
    muxer.next_local_port().to_le_bytes().to_vec()
}

/// Takes back [`saved_state`]; empty (a snapshot without it) leaves the ports as they are.
pub(super) fn restore_state(muxer: &mut Muxer, saved: &[u8]) -> Result<(), String> {
    if saved.is_empty() {
        return Ok(());
    }
    let port = <[u8; 4]>::try_from(saved)
        .map(u32::from_le_bytes)
        .map_err(|_| format!("vsock state of {} bytes (expected 4)", saved.len()))?;
    if muxer.continue_local_ports_from(port) {
        Ok(())
    } else {
        Err(format!(
            "vsock state: next host port {port} is outside the host-initiated range"
        ))
    }
}
