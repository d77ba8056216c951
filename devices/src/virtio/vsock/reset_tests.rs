//! The transport reset after a restore against new host connections: nothing reaches the
//! guest before it handled the event, and host ports continue across a snapshot.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::tests::*;
use super::QUEUE_SIZE;
use crate::virtio::test_driver::WRITE;
use crate::virtio::vsock::packet::op;
use crate::virtio::VirtioDevice;

#[test]
fn a_host_connection_after_a_transport_reset_reaches_the_guest_only_once_it_handled_the_event() {
    let mut guest = Guest::new();
    // Linux posts several event buffers and gives each back after handling its event.
    let event_buffers: Vec<u64> = (0..2).map(|_| guest.alloc(8)).collect();
    for &buffer in &event_buffers {
        guest.event.add(&guest.memory, &[(buffer, 4, WRITE)]);
    }
    guest.give_rx(4);
    // As after `PUT /snapshot/load`: the reset, then at once a new host client.
    guest.device.reset_transport();
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 5000\n").unwrap();
    // Passes until the muxer read the CONNECT line: its REQUEST waits, or it reached RX.
    let mut delivered = Vec::new();
    let mut waited = 0;
    while !guest.device.core().muxer.has_output() && delivered.is_empty() {
        assert!(waited < 1000, "the muxer never read the CONNECT line");
        std::thread::sleep(Duration::from_millis(1));
        guest.device.run_pass();
        delivered.extend(guest.rx.take_used(&guest.memory));
        waited += 1;
    }
    guest.device.run_pass();
    delivered.extend(guest.rx.take_used(&guest.memory));
    assert_eq!(
        guest.event.take_used(&guest.memory),
        [(0, 4)],
        "event delivered"
    );
    // Linux may handle the receive queue before the event queue: the request would meet the
    // old sockets.
    assert!(
        delivered.is_empty(),
        "the connection request reached the guest before it handled the reset event"
    );
    assert!(guest.device.core().muxer.has_output(), "the request waits");
    // With EVENT_IDX the driver is asked to notify when it gives a buffer back.
    assert_eq!(avail_event(&guest), 2);

    // The guest reset its sockets and gives the buffer back: the request follows.
    guest
        .event
        .add(&guest.memory, &[(event_buffers[0], 4, WRITE)]);
    guest.device.run_pass();
    let got = guest.received();
    assert_eq!(ops(&got), [op::REQUEST]);
    assert_eq!(got[0].0.dst_port, 5000);
    assert!(
        guest.event.take_used(&guest.memory).is_empty(),
        "one event only"
    );
}

/// The `avail_event` field the device writes after the event queue's used ring.
fn avail_event(guest: &Guest) -> u16 {
    let queue = guest.event.queue(&guest.memory, true);
    let address = queue.used_ring() + 4 + 8 * u64::from(QUEUE_SIZE);
    guest.memory.read_obj(GuestAddress(address)).unwrap()
}

/// A host client connects; returns the host port the guest sees (the REQUEST's source port).
fn host_connect_port(guest: &mut Guest, client: &mut UnixStream, guest_port: u32) -> u32 {
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    guest.device.run_pass();
    let got = guest.drain();
    assert_eq!(ops(&got), [op::REQUEST]);
    got[0].0.src_port
}

#[test]
fn host_ports_go_on_across_a_snapshot_so_a_new_connection_never_meets_an_old_guest_socket() {
    let mut source = Guest::new();
    let mut old_client = timed(UnixStream::connect(source.path()).unwrap());
    let old_port = host_connect_port(&mut source, &mut old_client, 5000);
    let saved = source.device.saved_state();

    // The restored device (a new process) with the snapshot's state, then the reset.
    let mut restored = Guest::new();
    restored.device.restore_state(&saved).unwrap();
    restored.device.reset_transport();
    let buffer = restored.alloc(8);
    restored.event.add(&restored.memory, &[(buffer, 4, WRITE)]);
    restored.device.run_pass();
    restored.event.add(&restored.memory, &[(buffer, 4, WRITE)]); // handled
    let mut new_client = timed(UnixStream::connect(restored.path()).unwrap());
    let new_port = host_connect_port(&mut restored, &mut new_client, 5000);
    assert_ne!(
        new_port, old_port,
        "the guest may still hold its socket of the old connection on that port"
    );
    assert_eq!(new_port, old_port + 1);
}

#[test]
fn vsock_state_of_another_shape_is_refused_and_none_is_accepted() {
    let mut guest = Guest::new();
    assert_eq!(guest.device.restore_state(&[]), Ok(()));
    let err = guest.device.restore_state(&[1, 2, 3]).unwrap_err();
    assert!(err.contains("3 bytes (expected 4)"), "{err}");
    let err = guest.device.restore_state(&5u32.to_le_bytes()).unwrap_err();
    assert!(err.contains("outside the host-initiated range"), "{err}");
}
