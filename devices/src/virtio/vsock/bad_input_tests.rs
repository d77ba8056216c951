//! Bad input for the vsock device, from the guest (unknown connections, wrong CIDs, lengths
//! beyond their buffers, floods past the credit, protocol violations, unusable buffers, a corrupt
//! ring) and from host clients (malformed, too long or missing `CONNECT` lines): each gets an
//! `RST` or a closed socket, never a panic, a leak or a stuck pass.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::tests::*;
use crate::virtio::test_driver::WRITE;
use crate::virtio::vsock::connection::BUF_ALLOC;
use crate::virtio::vsock::packet::{op, MAX_PKT_DATA};
use crate::virtio::vsock::HOST_CID;

#[test]
fn bad_connect_lines_and_silent_clients_are_closed() {
    let mut guest = Guest::new();
    let mut malformed = timed(UnixStream::connect(guest.path()).unwrap());
    malformed.write_all(b"HELLO 52\n").unwrap();
    let mut too_long = timed(UnixStream::connect(guest.path()).unwrap());
    too_long.write_all(&[b'9'; 64]).unwrap();
    let mut silent = timed(UnixStream::connect(guest.path()).unwrap());
    guest.device.run_pass();
    for client in [&mut malformed, &mut too_long] {
        assert_closed(client);
    }
    assert_eq!(guest.device.core().muxer.handshake_count(), 1);
    // The silent one is closed at its deadline; the pass never waits for it.
    std::thread::sleep(Duration::from_millis(300));
    guest.device.run_pass();
    assert_closed(&mut silent);
    assert_eq!(guest.device.core().muxer.handshake_count(), 0);
    assert!(guest.drain().is_empty(), "nothing reached the guest");
}

#[test]
fn packets_for_unknown_connections_get_rst_but_rst_gets_nothing() {
    let mut guest = Guest::new();
    for op in [op::RW, op::SHUTDOWN, op::CREDIT_UPDATE, op::RESPONSE, 99] {
        guest.send(packet(op, 2000, 90, 0), &[]);
    }
    guest.send(packet(op::RST, 2000, 90, 0), &[]);
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RST; 5]);
}

#[test]
fn wrong_cids_and_socket_types_are_reset_from_the_host_to_the_real_guest() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut wrong_src = packet(op::REQUEST, 1025, 80, 0);
    wrong_src.src_cid = 9;
    let mut wrong_dst = packet(op::REQUEST, 1025, 80, 0);
    wrong_dst.dst_cid = 4;
    let mut seqpacket = packet(op::REQUEST, 1025, 80, 0);
    seqpacket.type_ = 2;
    for header in [wrong_src, wrong_dst, seqpacket] {
        guest.send(header, &[]);
    }
    let got = guest.drain();
    assert_eq!(ops(&got), [op::RST; 3]);
    for (header, _) in &got {
        assert_eq!((header.src_cid, header.dst_cid), (HOST_CID, CID));
    }
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "no host connection was made");
}

#[test]
fn len_beyond_the_buffer_resets_the_connection() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let mut host = guest_connects(&mut guest, &listener);
    // The header claims 1000 bytes; the data buffer holds 10.
    guest.send(packet(op::RW, 1025, 80, 1000), &[7u8; 10]);
    assert_eq!(ops(&guest.drain()), [op::RST]);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "nothing of the bad packet reached the host"
    );
    // Past the largest packet: refused the same way.
    guest.send(packet(op::RW, 1025, 80, MAX_PKT_DATA + 1), &[1u8; 16]);
    assert_eq!(ops(&guest.drain()), [op::RST]);
}

#[test]
fn chains_without_a_readable_header_are_dropped_not_fatal() {
    let mut guest = Guest::new();
    let data = guest.alloc(64);
    // Device-writable "header" and a too-short one.
    guest.tx.add(&guest.memory, &[(data, 64, WRITE)]);
    guest.tx.add(&guest.memory, &[(data, 8, 0)]);
    // A buffer outside guest memory.
    guest.tx.add(&guest.memory, &[(0xffff_0000, 44, 0)]);
    guest.device.run_pass();
    assert_eq!(guest.tx.take_used(&guest.memory).len(), 3);
    assert!(guest.drain().is_empty());
}

#[test]
fn a_guest_that_floods_past_its_credit_is_reset_and_the_host_keeps_the_rest() {
    let mut guest = Guest::new();
    let listener = host_listener(&guest, 80);
    let host = guest_connects(&mut guest, &listener);
    // The host never reads: everything beyond its socket buffer is buffered by Kiln, up to the
    // credit Kiln gave; the packet that goes past it resets the connection.
    let chunk = vec![0xabu8; 64 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    for _ in 0..((BUF_ALLOC as usize * 4) / chunk.len() + 64) {
        guest.send(packet(op::RW, 1025, 80, chunk.len() as u32), &chunk);
        sent += chunk.len();
        if ops(&guest.drain()).contains(&op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "{sent} bytes accepted without credit");
    assert_eq!(guest.device.connection_count(), 0);
    drop(host);
}

#[test]
fn protocol_violations_on_live_connections_reset_them() {
    for (name, header) in [
        ("REQUEST again", packet(op::REQUEST, 1025, 80, 0)),
        (
            "RESPONSE when established",
            packet(op::RESPONSE, 1025, 80, 0),
        ),
        ("unknown op", packet(42, 1025, 80, 0)),
    ] {
        let mut guest = Guest::new();
        let listener = host_listener(&guest, 80);
        let _host = guest_connects(&mut guest, &listener);
        guest.send(header, &[]);
        assert_eq!(ops(&guest.drain()), [op::RST], "{name}");
        assert_eq!(guest.device.connection_count(), 0, "{name}");
    }
}

#[test]
fn data_before_the_guest_accepted_resets() {
    let mut guest = Guest::new();
    let mut client = timed(UnixStream::connect(guest.path()).unwrap());
    client.write_all(b"CONNECT 5\n").unwrap();
    guest.device.run_pass();
    let request = guest.drain()[0].0;
    guest.send(packet(op::RW, 5, request.src_port, 1), b"x");
    assert_eq!(ops(&guest.drain()), [op::RST]);
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn unusable_receive_buffers_come_back_empty() {
    let mut guest = Guest::new();
    let buffer = guest.alloc(64);
    // Read-only, and too short for a header.
    guest.rx.add(&guest.memory, &[(buffer, 64, 0)]);
    guest.rx.add(&guest.memory, &[(buffer, 8, WRITE)]);
    guest.send(packet(op::REQUEST, 1025, 81, 0), &[]);
    let used = guest.rx.take_used(&guest.memory);
    assert_eq!(used, [(0, 0), (1, 0)]);
    // The RST still reaches the guest once it gives a proper buffer.
    assert_eq!(ops(&guest.drain()), [op::RST]);
}

#[test]
fn a_corrupt_available_ring_stops_the_device_instead_of_spinning() {
    let mut guest = Guest::new();
    // The TX ring's index runs far ahead of anything the driver could have made available.
    guest
        .memory
        .write_obj(1000u16, GuestAddress(0x3000 + 16 * 256 + 2))
        .unwrap();
    let started = std::time::Instant::now();
    guest.device.run_pass();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(guest.interrupt.needs_reset(), "the driver is told to reset");
    // Host clients are still served by a later activation; this one does nothing more.
    guest.give_rx(2);
    assert!(guest.received().is_empty());
}
