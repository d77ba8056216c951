use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::block::test_utils::*;
use crate::virtio::block::DiskTotals;

const DISK_SIZE: u64 = 64 * 1024;

struct Fixture {
    memory: GuestMemoryMmap,
    image: TempImage,
    disk: DiskImage,
}

/// A disk whose byte `i` is `i * 3 + 1` (mod 256), and guest memory.
fn fixture(readonly: bool) -> Fixture {
    let image = TempImage::new("request", DISK_SIZE);
    let content: Vec<u8> = (0..DISK_SIZE).map(|i| (i * 3 + 1) as u8).collect();
    std::fs::write(image.path(), &content).unwrap();
    let disk = DiskImage::open(image.path(), readonly, Some("kiln-test-serial")).unwrap();
    Fixture {
        memory: guest_memory(),
        image,
        disk,
    }
}

impl Fixture {
    fn content(&self) -> Vec<u8> {
        std::fs::read(self.image.path()).unwrap()
    }

    fn status(&self) -> u8 {
        self.memory.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.memory
            .read_slice(&mut data, GuestAddress(addr))
            .unwrap();
        data
    }

    /// Runs one chain of `(addr, len, flags)` descriptors through `handle_chain`.
    fn run(&self, specs: &[(u64, u32, u16)]) -> Outcome {
        self.memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(&self.memory, 16);
        let chain = vq.build_desc_chain(&linked(0, specs)).unwrap();
        handle_chain(chain, &self.memory, &self.disk)
    }

    /// Runs raw descriptors (with their own NEXT flags and indices); the chain starts at 0.
    fn run_raw(
        &self,
        descriptors: &[virtio_queue::desc::RawDescriptor],
        queue_size: u16,
    ) -> Outcome {
        let vq = MockSplitQueue::new(&self.memory, queue_size);
        for (index, descriptor) in descriptors.iter().enumerate() {
            vq.desc_table().store(index as u16, *descriptor).unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.iter(&self.memory).unwrap().next().unwrap();
        handle_chain(chain, &self.memory, &self.disk)
    }
}

fn assert_completed(outcome: &Outcome, status: u8, used_len: u32) {
    match outcome {
        Outcome::Completed {
            status: s,
            used_len: u,
            ..
        } => assert_eq!((*s, *u), (status, used_len), "{outcome:?}"),
        other => panic!("expected a completed request, got {other:?}"),
    }
}

fn assert_ioerr(outcome: &Outcome, expected: RequestError) {
    match outcome {
        Outcome::Completed {
            status,
            failure: Some(Failure::Request(error)),
            ..
        } => {
            assert_eq!(*status, request_status::IOERR);
            assert_eq!(*error, expected);
        }
        other => panic!("expected IOERR for {expected:?}, got {other:?}"),
    }
}

fn assert_unanswerable(outcome: &Outcome, expected: ChainError) {
    match outcome {
        Outcome::Unanswerable(error) => assert_eq!(*error, expected),
        other => panic!("expected an unanswerable chain ({expected:?}), got {other:?}"),
    }
}

#[test]
fn read_fills_guest_buffers_from_the_image() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 3);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 1025);
    assert_eq!(f.status(), request_status::OK);
    assert_eq!(f.read(DATA, 1024), f.content()[3 * 512..5 * 512]);
}

#[test]
fn read_scatters_into_several_buffers_across_memory_regions() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 10);
    let straddling = REGION_SPLIT - 512;
    let outcome = f.run(&[
        (HEADER, 16, 0),
        (DATA, 512, WRITE),
        (straddling, 1024, WRITE),
        (DATA + 0x1000, 512, WRITE),
        (STATUS, 1, WRITE),
    ]);
    assert_completed(&outcome, request_status::OK, 2049);
    let expected = &f.content()[10 * 512..14 * 512];
    assert_eq!(f.read(DATA, 512), expected[..512]);
    assert_eq!(f.read(straddling, 1024), expected[512..1536]);
    assert_eq!(f.read(DATA + 0x1000, 512), expected[1536..]);
}

#[test]
fn write_stores_guest_buffers_in_the_image() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::OUT, 7);
    let payload: Vec<u8> = (0..1536u32).map(|i| (i % 251) as u8).collect();
    f.memory
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    f.memory
        .write_slice(&payload[512..], GuestAddress(REGION_SPLIT - 256))
        .unwrap();
    let before = f.content();
    let outcome = f.run(&[
        (HEADER, 16, 0),
        (DATA, 512, 0),
        (REGION_SPLIT - 256, 1024, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_completed(&outcome, request_status::OK, 1);
    assert_eq!(f.status(), request_status::OK);
    let after = f.content();
    assert_eq!(after[7 * 512..10 * 512], payload[..]);
    assert_eq!(after[..7 * 512], before[..7 * 512]);
    assert_eq!(after[10 * 512..], before[10 * 512..]);
}

#[test]
fn header_may_span_descriptors_and_share_one_with_data() {
    let f = fixture(false);
    // Header in two halves, the second half followed by data in the same descriptor.
    write_header(&f.memory, HEADER, request_type::OUT, 1);
    let mut tail = [0u8; 8 + 512];
    f.memory
        .read_slice(&mut tail[..8], GuestAddress(HEADER + 8))
        .unwrap();
    tail[8..].fill(0xc3);
    f.memory.write_slice(&tail, GuestAddress(DATA)).unwrap();
    let outcome = f.run(&[(HEADER, 8, 0), (DATA, 8 + 512, 0), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 1);
    assert_eq!(f.content()[512..1024], [0xc3; 512]);
}

#[test]
fn status_may_be_the_last_byte_of_a_data_descriptor() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 0);
    f.memory
        .write_obj(0xffu8, GuestAddress(DATA + 512))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 513, WRITE)]);
    assert_completed(&outcome, request_status::OK, 513);
    assert_eq!(f.read(DATA, 512), f.content()[..512]);
    assert_eq!(f.read(DATA + 512, 1), [request_status::OK]);
}

#[test]
fn flush_succeeds() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::FLUSH, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 1);
    assert_eq!(f.status(), request_status::OK);
    // Read-only disks have nothing to flush, but the request still succeeds.
    let f = fixture(true);
    write_header(&f.memory, HEADER, request_type::FLUSH, 0);
    assert_completed(
        &f.run(&[(HEADER, 16, 0), (STATUS, 1, WRITE)]),
        request_status::OK,
        1,
    );
}

#[test]
fn get_id_returns_the_serial() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::GET_ID, 0);
    f.memory
        .write_slice(&[0xee; 32], GuestAddress(DATA))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 20, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 21);
    assert_eq!(f.read(DATA, 20), b"kiln-test-serial\0\0\0\0");
    // Nothing past the 20 bytes, even with a larger buffer.
    f.memory
        .write_slice(&[0xee; 32], GuestAddress(DATA))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 32, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 21);
    assert_eq!(f.read(DATA + 20, 12), [0xee; 12]);
    // A short buffer gets what fits.
    f.memory
        .write_slice(&[0xee; 32], GuestAddress(DATA))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 4, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 5);
    assert_eq!(f.read(DATA, 5), b"kiln\xee");
}

#[test]
fn unknown_request_types_are_unsupported() {
    let f = fixture(false);
    for request_type in [2, 11, 13, 0x8000_0000, u32::MAX] {
        write_header(&f.memory, HEADER, request_type, 0);
        let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
        assert_completed(&outcome, request_status::UNSUPP, 1);
        assert_eq!(f.status(), request_status::UNSUPP);
    }
}

#[test]
fn data_outside_guest_memory_is_an_io_error_and_nothing_moves() {
    let f = fixture(false);
    let before = f.content();
    write_header(&f.memory, HEADER, request_type::OUT, 0);
    let outside = MEMORY_SIZE - 256;
    let outcome = f.run(&[(HEADER, 16, 0), (outside, 512, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(
        &outcome,
        RequestError::OutsideMemory {
            addr: outside,
            len: 512,
        },
    );
    assert_eq!(f.status(), request_status::IOERR);
    assert_eq!(f.content(), before);

    write_header(&f.memory, HEADER, request_type::IN, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (outside, 512, WRITE), (STATUS, 1, WRITE)]);
    assert!(matches!(
        outcome,
        Outcome::Completed {
            status: request_status::IOERR,
            ..
        }
    ));
    assert_eq!(f.read(outside, 256), vec![0u8; 256]);

    // Addresses that wrap around the 64-bit space.
    let outcome = f.run(&[
        (HEADER, 16, 0),
        (u64::MAX - 100, 512, WRITE),
        (STATUS, 1, WRITE),
    ]);
    assert!(matches!(
        outcome,
        Outcome::Completed {
            status: request_status::IOERR,
            ..
        }
    ));
}

#[test]
fn header_outside_guest_memory_is_an_io_error() {
    let f = fixture(false);
    let outcome = f.run(&[(MEMORY_SIZE + 0x1000, 16, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(
        &outcome,
        RequestError::OutsideMemory {
            addr: MEMORY_SIZE + 0x1000,
            len: 16,
        },
    );
}

#[test]
fn missing_or_unusable_status_makes_the_chain_unanswerable() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 0);
    // Status descriptor device-readable.
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, 0)]);
    assert_unanswerable(&outcome, ChainError::NoStatus);
    // Zero-length status descriptor.
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 0, WRITE)]);
    assert_unanswerable(&outcome, ChainError::NoStatus);
    // Only a header.
    let outcome = f.run(&[(HEADER, 16, 0)]);
    assert_unanswerable(&outcome, ChainError::NoStatus);
    // Status byte outside guest memory, and at the very top of the address space.
    let outcome = f.run(&[(HEADER, 16, 0), (MEMORY_SIZE, 1, WRITE)]);
    assert_unanswerable(&outcome, ChainError::StatusOutsideMemory(MEMORY_SIZE));
    let outcome = f.run(&[(HEADER, 16, 0), (u64::MAX, 2, WRITE)]);
    assert!(matches!(
        outcome,
        Outcome::Unanswerable(ChainError::StatusOutsideMemory(_))
    ));
    // Nothing was read into the data buffer by any of these.
    assert_eq!(f.read(DATA, 512), vec![0u8; 512]);
}

#[test]
fn wrong_directions_are_io_errors() {
    let f = fixture(false);
    let before = f.content();
    // A read whose data buffer is device-readable.
    write_header(&f.memory, HEADER, request_type::IN, 0);
    f.memory
        .write_slice(&[0x11; 512], GuestAddress(DATA))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(
        &outcome,
        RequestError::WrongDirection {
            request: RequestType::In,
            readable: 512,
            writable: 0,
        },
    );
    assert_eq!(f.read(DATA, 512), vec![0x11; 512]);
    // A write whose data buffer is device-writable.
    write_header(&f.memory, HEADER, request_type::OUT, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_ioerr(
        &outcome,
        RequestError::WrongDirection {
            request: RequestType::Out,
            readable: 0,
            writable: 512,
        },
    );
    // A header that is device-writable.
    let outcome = f.run(&[(HEADER, 16, WRITE), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::ShortHeader(0));
    // A readable buffer after a writable one.
    write_header(&f.memory, HEADER, request_type::IN, 0);
    let outcome = f.run(&[
        (HEADER, 16, 0),
        (DATA, 512, WRITE),
        (DATA + 512, 512, 0),
        (STATUS, 1, WRITE),
    ]);
    assert_ioerr(&outcome, RequestError::ReadableAfterWritable);
    // A flush with data.
    write_header(&f.memory, HEADER, request_type::FLUSH, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert!(matches!(
        outcome,
        Outcome::Completed {
            status: request_status::IOERR,
            failure: Some(Failure::Request(RequestError::WrongDirection { .. })),
            ..
        }
    ));
    assert_eq!(f.content(), before);
}

#[test]
fn short_headers_are_io_errors() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 0);
    let outcome = f.run(&[(HEADER, 8, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::ShortHeader(8));
}

#[test]
fn partial_sectors_are_io_errors() {
    let f = fixture(false);
    let before = f.content();
    write_header(&f.memory, HEADER, request_type::IN, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 100, WRITE), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::NotSectorMultiple(100));
    write_header(&f.memory, HEADER, request_type::OUT, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 513, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::NotSectorMultiple(513));
    assert_eq!(f.content(), before);
}

#[test]
fn sectors_beyond_capacity_are_io_errors() {
    let f = fixture(false);
    let before = f.content();
    let capacity = DISK_SIZE / 512;
    // The last sector is fine; one more is not.
    write_header(&f.memory, HEADER, request_type::IN, capacity - 1);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 513);
    write_header(&f.memory, HEADER, request_type::IN, capacity - 1);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
    assert_ioerr(
        &outcome,
        RequestError::BeyondCapacity {
            sector: capacity - 1,
            len: 1024,
            capacity,
        },
    );
    for sector in [capacity, u64::MAX / 512, u64::MAX] {
        write_header(&f.memory, HEADER, request_type::OUT, sector);
        let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
        assert_ioerr(
            &outcome,
            RequestError::BeyondCapacity {
                sector,
                len: 512,
                capacity,
            },
        );
    }
    assert_eq!(f.content(), before);
}

#[test]
fn writes_to_read_only_disks_are_io_errors() {
    let f = fixture(true);
    let before = f.content();
    write_header(&f.memory, HEADER, request_type::OUT, 0);
    f.memory
        .write_slice(&[0x77; 512], GuestAddress(DATA))
        .unwrap();
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::ReadOnly);
    assert_eq!(f.content(), before);
    // Reads still work.
    write_header(&f.memory, HEADER, request_type::IN, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_completed(&outcome, request_status::OK, 513);
}

#[test]
fn get_id_without_a_buffer_is_an_io_error() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::GET_ID, 0);
    let outcome = f.run(&[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
    assert_ioerr(&outcome, RequestError::NoIdBuffer);
}

#[test]
fn loops_and_runaway_chains_are_unanswerable() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...
    let looping = [
        raw(HEADER, 16, NEXT, 1),
        raw(DATA, 512, WRITE | NEXT, 2),
        raw(STATUS, 1, WRITE | NEXT, 1),
    ];
    assert_unanswerable(&f.run_raw(&looping, 16), ChainError::Unterminated);
    // A chain that visits every descriptor of a 4-entry queue and asks for a fifth.
    let too_long = [
        raw(HEADER, 16, NEXT, 1),
        raw(DATA, 512, WRITE | NEXT, 2),
        raw(DATA + 512, 512, WRITE | NEXT, 3),
        raw(STATUS, 1, WRITE | NEXT, 0),
    ];
    assert_unanswerable(&f.run_raw(&too_long, 4), ChainError::Unterminated);
    // A next index past the table.
    let dangling = [raw(HEADER, 16, NEXT, 1), raw(STATUS, 1, WRITE | NEXT, 200)];
    assert_unanswerable(&f.run_raw(&dangling, 16), ChainError::Unterminated);
    assert_eq!(f.read(DATA, 1024), vec![0u8; 1024]);
}

#[test]
fn indirect_tables_work_and_bad_ones_are_unanswerable() {
    let f = fixture(false);
    let table = 0x4_0000;
    write_header(&f.memory, HEADER, request_type::IN, 2);
    let entries = linked(
        0,
        &[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
    );
    for (index, entry) in entries.iter().enumerate() {
        f.memory
            .write_obj(*entry, GuestAddress(table + 16 * index as u64))
            .unwrap();
    }
    let outcome = f.run_raw(&[raw(table, 48, INDIRECT, 0)], 16);
    assert_completed(&outcome, request_status::OK, 513);
    assert_eq!(f.read(DATA, 512), f.content()[1024..1536]);

    // A loop inside the indirect table.
    f.memory
        .write_obj(raw(STATUS, 1, WRITE | NEXT, 1), GuestAddress(table + 32))
        .unwrap();
    assert_unanswerable(
        &f.run_raw(&[raw(table, 48, INDIRECT, 0)], 16),
        ChainError::Unterminated,
    );
    // A nested indirect descriptor.
    f.memory
        .write_obj(raw(table, 48, INDIRECT, 0), GuestAddress(table))
        .unwrap();
    assert_unanswerable(
        &f.run_raw(&[raw(table, 48, INDIRECT, 0)], 16),
        ChainError::Empty,
    );
    // An indirect table outside guest memory, and one with a length that is not whole entries.
    assert_unanswerable(
        &f.run_raw(&[raw(MEMORY_SIZE, 48, INDIRECT, 0)], 16),
        ChainError::Empty,
    );
    assert_unanswerable(
        &f.run_raw(&[raw(table, 40, INDIRECT, 0)], 16),
        ChainError::Empty,
    );
}

#[test]
fn head_index_past_the_queue_gives_an_empty_chain() {
    let f = fixture(false);
    let vq = MockSplitQueue::new(&f.memory, 16);
    vq.avail().ring().ref_at(0).unwrap().store(40);
    vq.avail().idx().store(1);
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.iter(&f.memory).unwrap().next().unwrap();
    assert_unanswerable(&handle_chain(chain, &f.memory, &f.disk), ChainError::Empty);
}

#[test]
fn io_errors_on_the_image_are_reported() {
    let f = fixture(false);
    // Shrink the image behind the device's back: a read of the lost tail fails.
    std::fs::OpenOptions::new()
        .write(true)
        .open(f.image.path())
        .unwrap()
        .set_len(512)
        .unwrap();
    write_header(&f.memory, HEADER, request_type::IN, 4);
    let outcome = f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert!(matches!(
        outcome,
        Outcome::Completed {
            status: request_status::IOERR,
            used_len: 1,
            failure: Some(Failure::Io(_)),
        }
    ));
    assert_eq!(f.status(), request_status::IOERR);
}

#[test]
fn split_segments_cuts_inside_a_segment() {
    let segments = [
        Segment {
            addr: GuestAddress(0x100),
            len: 10,
        },
        Segment {
            addr: GuestAddress(0x200),
            len: 10,
        },
    ];
    let (head, tail) = split_segments(&segments, 14);
    assert_eq!(
        head,
        vec![
            segments[0],
            Segment {
                addr: GuestAddress(0x200),
                len: 4
            }
        ]
    );
    assert_eq!(
        tail,
        vec![Segment {
            addr: GuestAddress(0x204),
            len: 6
        }]
    );
    let (head, tail) = split_segments(&segments, 20);
    assert_eq!((head.len(), tail.len()), (2, 0));
    let (head, tail) = split_segments(&segments, 0);
    assert_eq!((head.len(), tail.len()), (0, 2));
}

#[test]
fn completed_requests_are_counted_failed_ones_are_not() {
    let f = fixture(false);
    write_header(&f.memory, HEADER, request_type::IN, 0);
    f.run(&[(HEADER, 16, 0), (DATA, 1024, WRITE), (STATUS, 1, WRITE)]);
    write_header(&f.memory, HEADER, request_type::OUT, 0);
    f.run(&[(HEADER, 16, 0), (DATA, 512, 0), (STATUS, 1, WRITE)]);
    write_header(&f.memory, HEADER, request_type::FLUSH, 0);
    f.run(&[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
    // Past the end of the disk: IOERR, not counted.
    write_header(&f.memory, HEADER, request_type::IN, DISK_SIZE / 512);
    f.run(&[(HEADER, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
    assert_eq!(
        f.disk.stats().snapshot(),
        DiskTotals {
            read_count: 1,
            read_bytes: 1024,
            write_count: 1,
            write_bytes: 512,
            flush_count: 1,
        }
    );
}
