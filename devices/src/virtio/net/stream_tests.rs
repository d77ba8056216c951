//! The stream framing against a real socket pair.

use std::io::{Read, Write};

use super::*;
use crate::virtio::net::MAX_PACKET_SIZE;

fn pair() -> (Stream, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    (Stream::new(ours, None).unwrap(), theirs)
}

#[test]
fn frames_split_across_reads_are_put_together() {
    let (mut stream, mut peer) = pair();
    let mut buf = vec![0; MAX_PACKET_SIZE];
    let frame: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&frame);
    wire.extend_from_slice(&3u32.to_be_bytes());
    wire.extend_from_slice(b"abc");
    peer.write_all(&wire[..2]).unwrap();
    assert_eq!(stream.receive(&mut buf).unwrap(), None);
    peer.write_all(&wire[2..700]).unwrap();
    assert_eq!(stream.receive(&mut buf).unwrap(), None);
    peer.write_all(&wire[700..]).unwrap();
    assert_eq!(stream.receive(&mut buf).unwrap(), Some(1500));
    assert_eq!(&buf[..1500], &frame[..]);
    assert_eq!(stream.receive(&mut buf).unwrap(), Some(3));
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(stream.receive(&mut buf).unwrap(), None);
}

#[test]
fn an_oversized_length_ends_the_backend() {
    let (mut stream, mut peer) = pair();
    let mut buf = vec![0; MAX_PACKET_SIZE];
    peer.write_all(&(MAX_FRAME_SIZE as u32 + 1).to_be_bytes())
        .unwrap();
    let err = stream.receive(&mut buf).unwrap_err();
    assert!(
        matches!(err, BackendError::Gone(ref why) if why.contains("65551")),
        "{err}"
    );
}

#[test]
fn the_largest_frame_passes() {
    let (mut stream, mut peer) = pair();
    let mut buf = vec![0; MAX_PACKET_SIZE];
    let frame = vec![0x5a; MAX_FRAME_SIZE];
    let writer = std::thread::spawn(move || {
        peer.write_all(&(MAX_FRAME_SIZE as u32).to_be_bytes())
            .unwrap();
        peer.write_all(&frame).unwrap();
        peer
    });
    let mut got = None;
    for _ in 0..1000 {
        got = stream.receive(&mut buf).unwrap();
        if got.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(got, Some(MAX_FRAME_SIZE));
    assert!(buf[..MAX_FRAME_SIZE].iter().all(|&b| b == 0x5a));
    drop(writer.join().unwrap());
}

#[test]
fn a_closed_peer_is_gone_both_ways() {
    let (mut stream, peer) = pair();
    drop(peer);
    let mut buf = vec![0; MAX_PACKET_SIZE];
    assert!(matches!(
        stream.receive(&mut buf),
        Err(BackendError::Gone(_))
    ));
    assert!(matches!(stream.send(b"frame"), Err(BackendError::Gone(_))));
}

#[test]
fn a_full_socket_pushes_back_and_partial_frames_finish_first() {
    let (mut stream, mut peer) = pair();
    let frame = vec![7u8; 60_000];
    let mut accepted = 0;
    // Fill the socket until it pushes back; nothing grows meanwhile.
    while stream.send(&frame).unwrap() {
        accepted += 1;
        assert!(accepted < 1000, "the socket never pushed back");
        assert!(stream.outbound.capacity() <= PREFIX + MAX_FRAME_SIZE);
    }
    // Drain the peer and check every frame arrived whole, in order.
    peer.set_nonblocking(true).unwrap();
    let mut wire = Vec::new();
    let mut chunk = vec![0; 1 << 16];
    let mut sent_after = 0;
    loop {
        match peer.read(&mut chunk) {
            Ok(n) => wire.extend_from_slice(&chunk[..n]),
            Err(_) => {
                if stream.send(&frame).unwrap() {
                    sent_after += 1;
                    if sent_after == 3 {
                        // Let the partial write finish too.
                        while !stream.flush().unwrap() {
                            let n = peer.read(&mut chunk).unwrap_or(0);
                            wire.extend_from_slice(&chunk[..n]);
                        }
                        while let Ok(n) = peer.read(&mut chunk) {
                            wire.extend_from_slice(&chunk[..n]);
                        }
                        break;
                    }
                }
            }
        }
    }
    let mut frames = 0;
    let mut at = 0;
    while at < wire.len() {
        let len = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len());
        assert!(wire[at + 4..at + 4 + len].iter().all(|&b| b == 7));
        at += 4 + len;
        frames += 1;
    }
    assert_eq!(at, wire.len());
    assert_eq!(frames, accepted + 3);
}
