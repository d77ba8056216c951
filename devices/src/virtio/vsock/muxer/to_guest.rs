//! Filling the guest's receive buffers: `RST`s and control packets take one buffer each; data
//! is read from a host socket into as many buffers as the guest's credit allows with one
//! `readv(2)` (Linux posts 4 KiB receive buffers, so one read per buffer would cost a system
//! call per 4 KiB).

use std::io;

use vm_memory::VolatileSlice;

use super::{ConnError, Muxer};
use crate::virtio::vsock::connection::Outgoing;
use crate::virtio::vsock::packet::{op, Header, VsockPacket, PKT_HEADER_SIZE};
use crate::virtio::GuestBitmap;

/// A receive buffer from the guest, parsed.
pub type RxPacket<'a> = VsockPacket<'a, GuestBitmap<'a>>;

/// Most receive buffers filled from one host socket with one `readv(2)`: 256 KiB (Linux's
/// default vsock buffer, so the most credit a guest usually gives) of 4 KiB buffers.
pub const MAX_RX_BATCH: usize = 64;

impl Muxer {
    /// Fills the receive buffers `packets` in order with what waits for the guest. Returns
    /// each filled buffer's used length in `used` (0: the buffer cannot hold what is next and
    /// goes back empty); the buffers after the last filled one are untouched (nothing more to
    /// send now) and go back to the queue.
    pub fn fill_buffers(&mut self, packets: &mut [RxPacket<'_>], used: &mut Vec<u32>) {
        used.clear();
        while used.len() < packets.len() {
            let start = used.len();
            if !self.fill_next(&mut packets[start..], used) {
                return;
            }
        }
    }

    /// Fills the first buffer(s) of `packets` (at least one) with the next packet(s) for the
    /// guest; false when there is nothing to send.
    fn fill_next(&mut self, packets: &mut [RxPacket<'_>], used: &mut Vec<u32>) -> bool {
        let Some(first) = packets.first_mut() else {
            return false;
        };
        if let Some(rst) = self.resets.pop_front() {
            used.push(write_header(first, &rst));
            return true;
        }
        // Each turn either writes a packet or takes a connection off the list (or changes its
        // state so that its next turn does), so this ends.
        while let Some(key) = self.ready.pop_front() {
            if let Some(rst) = self.resets.pop_front() {
                self.ready.push_front(key);
                used.push(write_header(&mut packets[0], &rst));
                return true;
            }
            let guest_cid = self.guest_cid;
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            conn.listed = false;
            let credit = match conn.outgoing() {
                None => continue,
                Some(Outgoing::Control(op, flags)) => {
                    let header = conn.header(guest_cid, op, flags, 0);
                    conn.sent(&header);
                    used.push(write_header(&mut packets[0], &header));
                    self.settle(key);
                    return true;
                }
                Some(Outgoing::Data(credit)) => credit as usize,
            };
            // How much of each buffer the credit lets Kiln fill.
            let mut rooms = [0usize; MAX_RX_BATCH];
            let mut count = 0;
            let mut credit_left = credit;
            for packet in packets.iter().take(MAX_RX_BATCH) {
                let room = packet
                    .data_slice()
                    .map_or(0, |buffer| buffer.len())
                    .min(credit_left);
                if room == 0 {
                    break;
                }
                rooms[count] = room;
                credit_left -= room;
                count += 1;
            }
            if count == 0 {
                // A receive buffer without room for data (no driver does that): it goes back
                // empty, so a broken driver cannot stall the queue.
                self.ready.push_front(key);
                conn.listed = true;
                used.push(0);
                return true;
            }
            let targets: Vec<VolatileSlice<'_, GuestBitmap<'_>>> = packets[..count]
                .iter()
                .zip(&rooms)
                .filter_map(|(packet, room)| packet.data_slice()?.subslice(0, *room).ok())
                .collect();
            if targets.len() != count {
                continue;
            }
            match conn.read_from_host_vectored(&targets) {
                Ok(0) => {
                    self.settle(key);
                    continue;
                }
                Ok(read) => {
                    let mut left = read;
                    for (packet, room) in packets.iter_mut().zip(&rooms[..count]) {
                        if left == 0 {
                            break;
                        }
                        let len = left.min(*room);
                        left -= len;
                        // At most one buffer's room, within a u32 credit.
                        let header = conn.header(guest_cid, op::RW, 0, len as u32);
                        conn.sent(&header);
                        used.push(write_header(packet, &header));
                    }
                    self.settle(key);
                    return true;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.settle(key);
                    continue;
                }
                Err(err) => {
                    self.reset(key, &ConnError::Host(err.to_string()));
                    continue;
                }
            }
        }
        if let Some(rst) = self.resets.pop_front() {
            used.push(write_header(&mut packets[0], &rst));
            return true;
        }
        false
    }
}

/// Writes `header` into a receive buffer; returns the used length (header plus payload).
fn write_header(packet: &mut RxPacket<'_>, header: &Header) -> u32 {
    // The buffer was checked to hold a header when the packet was parsed.
    if let Err(err) = packet.set_header_from_raw(&header.to_bytes()) {
        log::error!("vsock: cannot write a packet header: {err}");
        return 0;
    }
    PKT_HEADER_SIZE as u32 + header.len
}
