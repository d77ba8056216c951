use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;

use super::*;
use crate::event_loop::EventLoop;
use crate::host_fd::tests::pipe;

/// `count` bytes that show their position (so a reordering or a wrong cut is visible).
fn pattern(count: usize, seed: u8) -> Vec<u8> {
    (0..count)
        .map(|i| b'!' + ((i as u64 * 7 + u64::from(seed)) % 90) as u8)
        .collect()
}

fn take_all(ring: &mut Ring) -> Vec<u8> {
    let mut out = Vec::new();
    ring.take(&mut out, usize::MAX);
    out
}

#[test]
fn bytes_come_out_in_order() {
    let mut ring = Ring::new(1000);
    let input = pattern(900, 1);
    let mut out = Vec::new();
    for piece in input.chunks(37) {
        ring.push(piece);
        // The drain takes less than was written: what it leaves must come next.
        ring.take(&mut out, 20);
    }
    out.extend(take_all(&mut ring));
    assert_eq!(out, input);
    assert_eq!(ring.dropped_total, 0);
}

#[test]
fn a_full_ring_drops_the_oldest_bytes_with_an_exact_count() {
    let mut ring = Ring::new(16);
    ring.push(b"0123456789");
    ring.push(b"abcdefghij");
    assert_eq!(ring.dropped_total, 4);
    let mut expected = dropped_note(4).into_bytes();
    expected.extend_from_slice(b"456789abcdefghij");
    assert_eq!(take_all(&mut ring), expected);

    // One write larger than the whole buffer keeps only its own newest bytes.
    ring.push(b"xyz");
    let big = pattern(40, 2);
    ring.push(&big);
    assert_eq!(ring.dropped_total, 4 + 3 + 24);
    let mut expected = dropped_note(27).into_bytes();
    expected.extend_from_slice(&big[24..]);
    assert_eq!(take_all(&mut ring), expected);
}

#[test]
fn the_note_sits_exactly_where_the_gap_is() {
    let mut ring = Ring::new(8);
    let mut stream = Vec::new();
    ring.push(b"ABCDEFGH");
    ring.take(&mut stream, 3);
    // "DEFGH" held, 5 more arrive: "D" and "E" go.
    ring.push(b"12345");
    ring.take(&mut stream, usize::MAX);
    ring.push(b"xy");
    ring.take(&mut stream, usize::MAX);
    let mut expected = b"ABC".to_vec();
    expected.extend_from_slice(dropped_note(2).as_bytes());
    expected.extend_from_slice(b"FGH12345xy");
    assert_eq!(stream, expected);
}

#[test]
fn many_bytes_cost_one_wakeup() {
    let (mut writer, mut drain) = channel(Sink::Discard, 4096).unwrap();
    for byte in pattern(1000, 3) {
        writer.write_all(&[byte]).unwrap();
    }
    assert_eq!(drain.shared.wake.read().unwrap(), 1);
    assert_eq!(drain.pump(usize::MAX).unwrap(), Pump::Idle);
    for byte in pattern(1000, 4) {
        writer.write_all(&[byte]).unwrap();
    }
    assert_eq!(drain.shared.wake.read().unwrap(), 1);

    // Overflowing: one more wake-up for the first drop (to warn about it), none per byte.
    for byte in pattern(10_000, 5) {
        writer.write_all(&[byte]).unwrap();
    }
    assert_eq!(drain.shared.wake.read().unwrap(), 1);
    assert_eq!(drain.shared.ring().dropped_total, 1000 + 10_000 - 4096);
}

/// The read end as a private non-blocking description, and its capacity shrunk to one page.
fn small_pipe() -> (File, OwnedFd, usize) {
    let (read, write) = pipe();
    // SAFETY: F_SETPIPE_SZ / F_GETPIPE_SZ with an int argument on a pipe we own.
    let size = unsafe {
        libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096);
        libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
    };
    assert!(size > 0, "{}", io::Error::last_os_error());
    let reader = host_fd::reopen_nonblocking(read.as_fd(), false).unwrap();
    (reader, write, size as usize)
}

fn bytes_in_pipe(reader: &File) -> usize {
    let mut available: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    assert_eq!(
        unsafe { libc::ioctl(reader.as_raw_fd(), libc::FIONREAD, &mut available) },
        0
    );
    available as usize
}

fn read_available(reader: &File, into: &mut Vec<u8>) {
    let mut buf = [0u8; 8192];
    loop {
        match host_fd::read_fd(reader.as_fd(), &mut buf) {
            Ok(0) => return,
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) => panic!("read: {err}"),
        }
    }
}

fn drain_on_loop(
    sink_fd: &OwnedFd,
    capacity: usize,
) -> (ConsoleWriter, Arc<Mutex<ConsoleDrain>>, EventLoop) {
    let (writer, drain) = channel(Sink::for_fd(sink_fd.as_fd()), capacity).unwrap();
    assert!(matches!(drain.sink, Sink::Stream(_)), "a pipe is reopened");
    let drain = Arc::new(Mutex::new(drain));
    let mut event_loop = EventLoop::new().unwrap();
    event_loop.add_subscriber(drain.clone());
    (writer, drain, event_loop)
}

/// Runs the loop until the pipe holds `size` bytes (the drain then waits for room).
fn run_until_full(event_loop: &mut EventLoop, reader: &File, size: usize) {
    let start = Instant::now();
    while bytes_in_pipe(reader) < size {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the pipe never filled"
        );
        event_loop.run_with_timeout(100).unwrap();
    }
}

#[test]
fn a_stalled_pipe_makes_the_drain_wait_without_spinning_then_resume_in_order() {
    let (reader, write_end, size) = small_pipe();
    let (mut writer, _drain, mut event_loop) = drain_on_loop(&write_end, 1 << 20);
    let input = pattern(5 * size, 6);
    writer.write_all(&input).unwrap();
    run_until_full(&mut event_loop, &reader, size);
    // The reader is stalled: nothing wakes the loop (no busy wait on the full pipe).
    assert_eq!(event_loop.run_with_timeout(100).unwrap(), 0);

    let mut received = Vec::new();
    let start = Instant::now();
    while received.len() < input.len() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stuck at {}",
            received.len()
        );
        read_available(&reader, &mut received);
        event_loop.run_with_timeout(100).unwrap();
    }
    assert_eq!(received, input);
    assert_eq!(event_loop.run_with_timeout(50).unwrap(), 0, "idle again");
}

#[test]
fn a_stalled_reader_loses_the_oldest_output_and_the_stream_says_so_at_the_gap() {
    let (reader, write_end, size) = small_pipe();
    let capacity = 4096;
    let (mut writer, drain, mut event_loop) = drain_on_loop(&write_end, capacity);
    let first = pattern(size, 7);
    writer.write_all(&first).unwrap();
    run_until_full(&mut event_loop, &reader, size);

    let second = pattern(10_000, 8);
    writer.write_all(&second).unwrap();
    event_loop.run_with_timeout(100).unwrap();
    let mut received = Vec::new();
    let start = Instant::now();
    while drain.lock().unwrap().shared.ring().bytes.len() + bytes_in_pipe(&reader) > 0
        || received.len() < size
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "stuck at {}",
            received.len()
        );
        read_available(&reader, &mut received);
        event_loop.run_with_timeout(100).unwrap();
    }
    read_available(&reader, &mut received);

    let dropped = 10_000 - capacity;
    let mut expected = first.clone();
    expected.extend_from_slice(dropped_note(dropped as u64).as_bytes());
    expected.extend_from_slice(&second[dropped..]);
    assert_eq!(
        String::from_utf8_lossy(&received),
        String::from_utf8_lossy(&expected)
    );
    let totals = drain.lock().unwrap().finish();
    assert_eq!(totals.dropped, dropped as u64);
    assert_eq!(totals.unwritten, 0);
}

#[test]
fn finish_gives_up_on_a_stalled_reader_within_its_limits() {
    let (reader, write_end, size) = small_pipe();
    let (mut writer, drain, mut event_loop) = drain_on_loop(&write_end, 1 << 20);
    writer.write_all(&pattern(size, 9)).unwrap();
    run_until_full(&mut event_loop, &reader, size);
    writer.write_all(&pattern(10_000, 10)).unwrap();
    let mut drain = drain.lock().unwrap();

    // No progress at all: the stall limit ends it.
    let start = Instant::now();
    let totals = drain.finish_within(Duration::from_secs(5), Duration::from_millis(100));
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < Duration::from_millis(600), "{waited:?}");
    assert_eq!(totals.unwritten, 10_000);

    // The total deadline holds even with a generous stall limit.
    let start = Instant::now();
    let totals = drain.finish_within(Duration::from_millis(150), Duration::from_secs(5));
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_millis(650), "{waited:?}");
    assert_eq!(totals.unwritten, 10_000);
}

#[test]
fn finish_delivers_everything_to_a_reader_that_keeps_reading() {
    let (read, write_end) = pipe();
    let (mut writer, mut drain) = channel(Sink::for_fd(write_end.as_fd()), 1 << 20).unwrap();
    drop(write_end);
    let reader = std::thread::spawn(move || {
        let mut received = Vec::new();
        let mut read = File::from(read);
        std::io::Read::read_to_end(&mut read, &mut received).unwrap();
        received
    });
    let input = pattern(300_000, 11);
    writer.write_all(&input).unwrap();
    let totals = drain.finish();
    assert_eq!(totals.unwritten, 0);
    assert_eq!(totals.delivered, input.len() as u64);
    drop(drain);
    assert_eq!(reader.join().unwrap(), input);
}

#[test]
fn a_socket_never_blocks_the_drain() {
    let (left, _right) = std::os::unix::net::UnixStream::pair().unwrap();
    let (mut writer, mut drain) = channel(Sink::for_fd(left.as_fd()), 1 << 20).unwrap();
    assert!(matches!(drain.sink, Sink::Socket(_)));
    writer.write_all(&pattern(1 << 20, 12)).unwrap();
    let start = Instant::now();
    let totals = drain.finish_within(Duration::from_millis(100), Duration::from_millis(50));
    assert!(start.elapsed() < Duration::from_millis(600));
    assert!(totals.delivered > 0);
    assert!(totals.unwritten > 0);
    assert_eq!(totals.delivered + totals.unwritten, 1 << 20);
}

#[test]
fn a_closed_reader_fails_the_output_once_and_the_rest_is_counted() {
    let (read, write_end) = pipe();
    drop(read);
    let (mut writer, mut drain) = channel(Sink::for_fd(write_end.as_fd()), 1 << 20).unwrap();
    writer.write_all(b"nobody reads this").unwrap();
    let totals = drain.finish();
    assert_eq!(totals.lost_to_errors, 17);
    writer.write_all(b"nor this").unwrap();
    assert_eq!(drain.finish().lost_to_errors, 25);
}

#[test]
fn a_console_file_gets_the_output_and_a_bad_path_is_named() {
    let dir = std::env::temp_dir().join(format!("kiln-console-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("console.log");
    let (mut writer, mut drain) = open(&ConsoleConfig::File(path.clone())).unwrap();
    writer.write_all(b"Linux version\r\n").unwrap();
    assert_eq!(drain.finish().unwritten, 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"Linux version\r\n");
    std::fs::remove_dir_all(&dir).unwrap();

    let missing = dir.join("no/such/dir/console.log");
    let err = open(&ConsoleConfig::File(missing.clone()))
        .err()
        .expect("refused");
    assert!(matches!(&err, Error::ConsoleFile { path, .. } if *path == missing));
    assert!(err.to_string().contains("no/such/dir/console.log"), "{err}");
}

#[test]
fn no_console_discards_without_complaint() {
    let (mut writer, mut drain) = open(&ConsoleConfig::None).unwrap();
    writer.write_all(b"gone").unwrap();
    let totals = drain.finish();
    assert_eq!((totals.unwritten, totals.lost_to_errors), (0, 0));
}
