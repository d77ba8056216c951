//! Kiln takes its virtio constants from `virtio_bindings` (the Linux UAPI headers). These are
//! the spec's values (virtio 1.2), as Kiln wrote them by hand before: a wrong pick or a type
//! conversion that loses bits shows here.

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::virtio_blk_config;

use super::block::test_utils::TempImage;
use super::block::{self, request::HEADER_SIZE, request_status, request_type, Block, DiskImage};
use super::{features, status, VirtioDevice, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_RING};

#[test]
fn device_status_bits() {
    assert_eq!(
        [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::DRIVER_OK,
            status::FEATURES_OK,
            status::NEEDS_RESET,
            status::FAILED
        ],
        [1, 2, 4, 8, 0x40, 0x80]
    );
}

#[test]
fn feature_bit_numbers() {
    assert_eq!(
        [
            features::VERSION_1,
            features::RING_INDIRECT_DESC,
            features::RING_EVENT_IDX
        ],
        [32, 28, 29]
    );
    assert_eq!(
        [
            block::features::SEG_MAX,
            block::features::RO,
            block::features::FLUSH
        ],
        [2, 5, 9]
    );
}

#[test]
fn interrupt_status_bits() {
    assert_eq!([INTERRUPT_USED_RING, INTERRUPT_CONFIG_CHANGE], [1, 2]);
}

#[test]
fn block_requests() {
    assert_eq!(block::DEVICE_TYPE, 2);
    assert_eq!(block::ID_BYTES, 20);
    assert_eq!(HEADER_SIZE, 16);
    assert_eq!(
        [
            request_type::IN,
            request_type::OUT,
            request_type::FLUSH,
            request_type::GET_ID
        ],
        [0, 1, 4, 8]
    );
    assert_eq!(
        [
            request_status::OK,
            request_status::IOERR,
            request_status::UNSUPP
        ],
        [0, 1, 2]
    );
}

/// The configuration space reads as `struct virtio_blk_config`: capacity and `seg_max` where
/// the UAPI puts them, everything else (features Kiln does not offer) zero.
#[test]
fn block_configuration_space_has_the_uapi_layout() {
    let sectors = 3 * 1024;
    let image = TempImage::new("config-layout", sectors * 512);
    let device = Block::new(DiskImage::open(image.path(), false, None).unwrap()).unwrap();
    let mut config = vec![0xffu8; size_of::<virtio_blk_config>()];
    device.read_config(0, &mut config);

    let field = |offset: usize, len: usize| {
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(&config[offset..offset + len]);
        u64::from_le_bytes(bytes)
    };
    let capacity = offset_of!(virtio_blk_config, capacity);
    let seg_max = offset_of!(virtio_blk_config, seg_max);
    assert_eq!(field(capacity, 8), sectors);
    assert_eq!(field(seg_max, 4), u64::from(block::SEG_MAX));
    let others: Vec<(usize, u8)> = config
        .iter()
        .copied()
        .enumerate()
        .filter(|&(offset, byte)| {
            let in_field = (capacity..capacity + 8).contains(&offset)
                || (seg_max..seg_max + 4).contains(&offset);
            !in_field && byte != 0
        })
        .collect();
    assert_eq!(others, [], "non-zero bytes outside capacity and seg_max");
}
