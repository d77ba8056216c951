//! Discard and write-zeroes through the request path: offered on writable qcow2 (version 3)
//! disks only, with the limits in the configuration space, and every malformed range refused.

use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::device::Block;
use super::disk::DiskImage;
use super::qcow2::{create_overlay, OverlayOptions};
use super::request::{handle_chain, Failure, Outcome, RequestError};
use super::test_utils::*;
use super::{features, request_status, request_type};
use crate::virtio::VirtioDevice;
use kiln_arch::GuestMemoryMmap;

const DISK_SIZE: u64 = 1 << 20;
/// Where the discard/write-zeroes ranges go.
const RANGES: u64 = 0x4_0000;

/// A fresh qcow2 image (64 KiB clusters), removed on drop.
struct Qcow2Image {
    image: TempImage,
}

impl Qcow2Image {
    fn new(name: &str) -> Self {
        let image = TempImage::new(name, 0);
        std::fs::remove_file(image.path()).unwrap();
        let options = OverlayOptions {
            size: Some(DISK_SIZE),
            ..Default::default()
        };
        create_overlay(image.path(), &options).unwrap();
        Self { image }
    }

    fn open(&self, readonly: bool) -> DiskImage {
        DiskImage::open(self.image.path(), readonly, None).unwrap()
    }
}

fn range(memory: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&sector.to_le_bytes());
    bytes[8..12].copy_from_slice(&sectors.to_le_bytes());
    bytes[12..].copy_from_slice(&flags.to_le_bytes());
    memory.write_slice(&bytes, GuestAddress(at)).unwrap();
}

fn run(memory: &GuestMemoryMmap, disk: &DiskImage, specs: &[(u64, u32, u16)]) -> Outcome {
    let vq = MockSplitQueue::new(memory, 16);
    let chain = vq.build_desc_chain(&linked(0, specs)).unwrap();
    handle_chain(chain, memory, disk)
}

fn status(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Completed { status, .. } => *status,
        other => panic!("not completed: {other:?}"),
    }
}

fn request(
    memory: &GuestMemoryMmap,
    disk: &DiskImage,
    kind: u32,
    ranges: &[(u64, u32, u32)],
) -> Outcome {
    write_header(memory, HEADER, kind, 0);
    for (i, &(sector, sectors, flags)) in ranges.iter().enumerate() {
        range(memory, RANGES + 16 * i as u64, sector, sectors, flags);
    }
    let len = 16 * ranges.len() as u32;
    if len == 0 {
        return run(memory, disk, &[(HEADER, 16, 0), (STATUS, 1, WRITE)]);
    }
    run(
        memory,
        disk,
        &[(HEADER, 16, 0), (RANGES, len, 0), (STATUS, 1, WRITE)],
    )
}

fn write_data(memory: &GuestMemoryMmap, disk: &DiskImage, sector: u64, data: &[u8]) {
    write_header(memory, HEADER, request_type::OUT, sector);
    memory.write_slice(data, GuestAddress(DATA)).unwrap();
    let outcome = run(
        memory,
        disk,
        &[
            (HEADER, 16, 0),
            (DATA, data.len() as u32, 0),
            (STATUS, 1, WRITE),
        ],
    );
    assert_eq!(status(&outcome), request_status::OK);
}

fn read_data(memory: &GuestMemoryMmap, disk: &DiskImage, sector: u64, len: u32) -> Vec<u8> {
    write_header(memory, HEADER, request_type::IN, sector);
    let outcome = run(
        memory,
        disk,
        &[(HEADER, 16, 0), (DATA, len, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(status(&outcome), request_status::OK);
    let mut data = vec![0u8; len as usize];
    memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    data
}

#[test]
fn offered_on_writable_qcow2_disks_with_their_limits() {
    let image = Qcow2Image::new("offer");
    let block = Block::new(image.open(false)).unwrap();
    let offered = (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
    assert_eq!(block.features() & offered, offered);
    let mut config = [0u8; 60];
    block.read_config(0, &mut config);
    let word = |at: usize| u32::from_le_bytes(config[at..at + 4].try_into().unwrap());
    assert_eq!(word(36), 0x3f_ffff, "max_discard_sectors");
    assert_eq!(word(40), 1, "max_discard_seg");
    assert_eq!(word(44), 128, "discard_sector_alignment: a 64 KiB cluster");
    assert_eq!(word(48), 0x3f_ffff, "max_write_zeroes_sectors");
    assert_eq!(word(52), 1, "max_write_zeroes_seg");
    assert_eq!(config[56], 1, "write_zeroes_may_unmap");
    drop(block);

    let readonly = Block::new(image.open(true)).unwrap();
    assert_eq!(readonly.features() & offered, 0);
    let raw = TempImage::new("offer-raw", DISK_SIZE);
    let raw = Block::new(DiskImage::open(raw.path(), false, None).unwrap()).unwrap();
    assert_eq!(raw.features() & offered, 0);
    let mut limits = [0xffu8; 24];
    raw.read_config(36, &mut limits);
    assert_eq!(limits, [0; 24]);
}

#[test]
fn discard_and_write_zeroes_make_sectors_read_as_zeros() {
    let image = Qcow2Image::new("zeroes");
    let disk = image.open(false);
    let memory = guest_memory();
    write_data(&memory, &disk, 0, &vec![0xab; 512 * 1024]);
    // Write zeroes over part clusters (written) and whole clusters (zero clusters).
    let outcome = request(&memory, &disk, request_type::WRITE_ZEROES, &[(3, 300, 0)]);
    assert_eq!(status(&outcome), request_status::OK);
    let outcome = request(&memory, &disk, request_type::WRITE_ZEROES, &[(400, 200, 1)]);
    assert_eq!(status(&outcome), request_status::OK);
    // Discard whole clusters 6 and 7.
    let outcome = request(&memory, &disk, request_type::DISCARD, &[(768, 256, 0)]);
    assert_eq!(status(&outcome), request_status::OK);
    let back = read_data(&memory, &disk, 0, 512 * 1024);
    for (i, byte) in back.iter().enumerate() {
        let sector = (i / 512) as u64;
        let zero = (3..303).contains(&sector) || (400..600).contains(&sector) || sector >= 768;
        assert_eq!(*byte == 0, zero, "byte {i}");
    }
}

#[test]
fn malformed_ranges_are_refused() {
    let image = Qcow2Image::new("ranges");
    let disk = image.open(false);
    let memory = guest_memory();
    let sectors = DISK_SIZE / 512;
    // The unmap flag on a discard, and unknown flags: UNSUPP, as the spec says.
    for (kind, flags) in [
        (request_type::DISCARD, 1),
        (request_type::DISCARD, 4),
        (request_type::WRITE_ZEROES, 2),
    ] {
        let outcome = request(&memory, &disk, kind, &[(0, 8, flags)]);
        assert_eq!(status(&outcome), request_status::UNSUPP, "{kind} {flags}");
    }
    let ioerr = |outcome: Outcome, expected: RequestError| match outcome {
        Outcome::Completed {
            status,
            failure: Some(Failure::Request(error)),
            ..
        } => {
            assert_eq!(status, request_status::IOERR);
            assert_eq!(error, expected);
        }
        other => panic!("expected IOERR {expected:?}, got {other:?}"),
    };
    ioerr(
        request(
            &memory,
            &disk,
            request_type::DISCARD,
            &[(sectors - 4, 8, 0)],
        ),
        RequestError::BeyondCapacity {
            sector: sectors - 4,
            len: 8 * 512,
            capacity: sectors,
        },
    );
    ioerr(
        request(
            &memory,
            &disk,
            request_type::WRITE_ZEROES,
            &[(u64::MAX, 8, 0)],
        ),
        RequestError::BeyondCapacity {
            sector: u64::MAX,
            len: 8 * 512,
            capacity: sectors,
        },
    );
    ioerr(
        request(&memory, &disk, request_type::DISCARD, &[]),
        RequestError::BadRanges(0),
    );
    ioerr(
        request(
            &memory,
            &disk,
            request_type::DISCARD,
            &[(0, 8, 0), (16, 8, 0)],
        ),
        RequestError::BadRanges(32),
    );
    write_header(&memory, HEADER, request_type::WRITE_ZEROES, 0);
    ioerr(
        run(
            &memory,
            &disk,
            &[(HEADER, 16, 0), (RANGES, 17, 0), (STATUS, 1, WRITE)],
        ),
        RequestError::BadRanges(17),
    );
    // Device-writable ranges: not a request Kiln knows.
    let outcome = run(
        &memory,
        &disk,
        &[(HEADER, 16, 0), (RANGES, 16, WRITE), (STATUS, 1, WRITE)],
    );
    assert_eq!(status(&outcome), request_status::UNSUPP);
}

#[test]
fn read_only_and_raw_disks_answer_unsupp() {
    let image = Qcow2Image::new("ro");
    let memory = guest_memory();
    let readonly = image.open(true);
    let outcome = request(&memory, &readonly, request_type::DISCARD, &[(0, 8, 0)]);
    assert_eq!(status(&outcome), request_status::UNSUPP);
    let raw = TempImage::new("raw-discard", DISK_SIZE);
    std::fs::write(raw.path(), vec![0x5a; DISK_SIZE as usize]).unwrap();
    let disk = DiskImage::open(raw.path(), false, None).unwrap();
    let outcome = request(&memory, &disk, request_type::WRITE_ZEROES, &[(0, 8, 0)]);
    assert_eq!(status(&outcome), request_status::UNSUPP);
    assert_eq!(
        std::fs::read(raw.path()).unwrap(),
        vec![0x5a; DISK_SIZE as usize]
    );
}

#[test]
fn write_through_disks_flush_after_discard() {
    let image = Qcow2Image::new("wt");
    let disk = image.open(false);
    disk.set_write_through(true);
    let memory = guest_memory();
    let before = disk.flush_count();
    let outcome = request(&memory, &disk, request_type::DISCARD, &[(0, 128, 0)]);
    assert_eq!(status(&outcome), request_status::OK);
    assert_eq!(disk.flush_count(), before + 1);
}
