//! The receive queue: the guest's buffers filled with what the muxer has for it.

use virtio_queue::{QueueOwnedT, QueueT};

use super::{
    next_chain, queues_broken, warn_limited, Core, Queues, VsockPacket, MAX_RX_BATCH,
    MAX_RX_BUFFER, PASS_BUDGET,
};

impl Core {
    /// Fills the guest's receive buffers with what the muxer has; returns how many.
    ///
    /// Buffers are taken in batches (see [`MAX_RX_BATCH`]) so that one `readv(2)` can fill
    /// several; those the muxer left untouched go back to the available ring. The batch grows
    /// while batches fill completely and shrinks when they do not, so that a lone small packet
    /// (a round trip) does not parse dozens of buffers only to give them back.
    pub(super) fn process_rx(&mut self) -> u32 {
        // After a transport reset nothing goes to the guest until it handled the event (see
        // reset_event.rs).
        if self.reset_event_outstanding() {
            return 0;
        }
        let Some(queues) = &mut self.queues else {
            return 0;
        };
        let Queues {
            memory,
            rx,
            interrupt,
            broken,
            ..
        } = queues;
        let mut given = 0;
        let mut heads: Vec<u16> = Vec::with_capacity(MAX_RX_BATCH);
        let mut used: Vec<u32> = Vec::with_capacity(MAX_RX_BATCH);
        loop {
            if let Err(err) = rx.disable_notification(memory) {
                warn_limited!(self.warnings, "vsock", "vsock: RX queue: {err}");
                return given;
            }
            // Nothing was ready to send after all: stop, even with buffers left.
            let mut idle = false;
            while given < PASS_BUDGET && self.muxer.has_output() {
                let want = self.rx_batch.min((PASS_BUDGET - given) as usize);
                let mut packets = Vec::with_capacity(want);
                heads.clear();
                while packets.len() < want && given < PASS_BUDGET {
                    let mut chain = match next_chain(rx, memory) {
                        Ok(Some(chain)) => chain,
                        Ok(None) => break,
                        Err(err) => {
                            queues_broken(&mut self.warnings, interrupt, "RX", &err);
                            *broken = true;
                            return given;
                        }
                    };
                    let head = chain.head_index();
                    match VsockPacket::from_rx_virtq_chain(&*memory, &mut chain, MAX_RX_BUFFER) {
                        Ok(packet) => {
                            heads.push(head);
                            packets.push(packet);
                        }
                        Err(_) if !packets.is_empty() => {
                            // Served (returned empty) once the batch before it is done.
                            rx.go_to_previous_position();
                            break;
                        }
                        Err(err) => {
                            warn_limited!(
                                self.warnings,
                                "vsock",
                                "vsock: unusable receive buffer from the guest ({err}); returned empty"
                            );
                            if let Err(err) = rx.add_used(memory, head, 0) {
                                warn_limited!(self.warnings, "vsock", "vsock: RX queue: {err}");
                                return given;
                            }
                            given += 1;
                        }
                    }
                }
                if packets.is_empty() {
                    break;
                }
                self.muxer.fill_buffers(&mut packets, &mut used);
                for (head, length) in heads.iter().zip(&used) {
                    if let Err(err) = rx.add_used(memory, *head, *length) {
                        warn_limited!(self.warnings, "vsock", "vsock: RX queue: {err}");
                        return given;
                    }
                    given += 1;
                }
                let untouched = packets.len() - used.len();
                for _ in 0..untouched {
                    rx.go_to_previous_position();
                }
                self.rx_batch = if untouched == 0 {
                    (self.rx_batch * 2).min(MAX_RX_BATCH)
                } else {
                    used.len().clamp(1, MAX_RX_BATCH)
                };
                if untouched > 0 {
                    idle = true;
                    break;
                }
            }
            match rx.enable_notification(memory) {
                Ok(true) if !idle && given < PASS_BUDGET && self.muxer.has_output() => continue,
                Ok(_) => return given,
                Err(err) => {
                    warn_limited!(self.warnings, "vsock", "vsock: RX queue: {err}");
                    return given;
                }
            }
        }
    }
}
