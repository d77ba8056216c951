//! Register offsets of the virtio-mmio layout version 2 (virtio 1.2, table 4.1).
//!
//! Offsets on the MMIO bus are `u64`; the Linux UAPI header (through `virtio_bindings`) states
//! them as `u32`, which widens without loss.

use virtio_bindings::virtio_mmio as uapi;

/// R: magic value.
pub const MAGIC_VALUE: u64 = uapi::VIRTIO_MMIO_MAGIC_VALUE as u64;
/// R: version.
pub const VERSION: u64 = uapi::VIRTIO_MMIO_VERSION as u64;
/// R: device ID.
pub const DEVICE_ID: u64 = uapi::VIRTIO_MMIO_DEVICE_ID as u64;
/// R: vendor ID.
pub const VENDOR_ID: u64 = uapi::VIRTIO_MMIO_VENDOR_ID as u64;
/// R: 32 feature bits selected by `DEVICE_FEATURES_SEL`.
pub const DEVICE_FEATURES: u64 = uapi::VIRTIO_MMIO_DEVICE_FEATURES as u64;
/// W: selects the word of `DEVICE_FEATURES`.
pub const DEVICE_FEATURES_SEL: u64 = uapi::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
/// W: 32 feature bits the driver accepted, selected by `DRIVER_FEATURES_SEL`.
pub const DRIVER_FEATURES: u64 = uapi::VIRTIO_MMIO_DRIVER_FEATURES as u64;
/// W: selects the word of `DRIVER_FEATURES`.
pub const DRIVER_FEATURES_SEL: u64 = uapi::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
/// Legacy only (version 1): guest page size.
pub const LEGACY_GUEST_PAGE_SIZE: u64 = uapi::VIRTIO_MMIO_GUEST_PAGE_SIZE as u64;
/// W: selects the queue the queue registers refer to.
pub const QUEUE_SEL: u64 = uapi::VIRTIO_MMIO_QUEUE_SEL as u64;
/// R: maximum size of the selected queue (0: no such queue).
pub const QUEUE_NUM_MAX: u64 = uapi::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
/// W: size of the selected queue.
pub const QUEUE_NUM: u64 = uapi::VIRTIO_MMIO_QUEUE_NUM as u64;
/// Legacy only (version 1): queue alignment.
pub const LEGACY_QUEUE_ALIGN: u64 = uapi::VIRTIO_MMIO_QUEUE_ALIGN as u64;
/// Legacy only (version 1): queue page frame number.
pub const LEGACY_QUEUE_PFN: u64 = uapi::VIRTIO_MMIO_QUEUE_PFN as u64;
/// RW: the selected queue is ready.
pub const QUEUE_READY: u64 = uapi::VIRTIO_MMIO_QUEUE_READY as u64;
/// W: queue notification (the value is the queue index).
pub const QUEUE_NOTIFY: u64 = uapi::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// R: pending interrupt causes.
pub const INTERRUPT_STATUS: u64 = uapi::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
/// W: acknowledges interrupt causes.
pub const INTERRUPT_ACK: u64 = uapi::VIRTIO_MMIO_INTERRUPT_ACK as u64;
/// RW: device status.
pub const STATUS: u64 = uapi::VIRTIO_MMIO_STATUS as u64;
/// W: descriptor table address, low 32 bits.
pub const QUEUE_DESC_LOW: u64 = uapi::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
/// W: descriptor table address, high 32 bits.
pub const QUEUE_DESC_HIGH: u64 = uapi::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
/// W: available ring address, low 32 bits.
pub const QUEUE_AVAIL_LOW: u64 = uapi::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
/// W: available ring address, high 32 bits.
pub const QUEUE_AVAIL_HIGH: u64 = uapi::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
/// W: used ring address, low 32 bits.
pub const QUEUE_USED_LOW: u64 = uapi::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
/// W: used ring address, high 32 bits.
pub const QUEUE_USED_HIGH: u64 = uapi::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
/// R: configuration atomicity value.
pub const CONFIG_GENERATION: u64 = uapi::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Start of the device configuration space.
pub const CONFIG: u64 = uapi::VIRTIO_MMIO_CONFIG as u64;

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets of virtio 1.2 table 4.1, as Kiln stated them before taking the UAPI's.
    #[test]
    fn offsets_are_the_specs() {
        let offsets = [
            (MAGIC_VALUE, 0x000),
            (VERSION, 0x004),
            (DEVICE_ID, 0x008),
            (VENDOR_ID, 0x00c),
            (DEVICE_FEATURES, 0x010),
            (DEVICE_FEATURES_SEL, 0x014),
            (DRIVER_FEATURES, 0x020),
            (DRIVER_FEATURES_SEL, 0x024),
            (LEGACY_GUEST_PAGE_SIZE, 0x028),
            (QUEUE_SEL, 0x030),
            (QUEUE_NUM_MAX, 0x034),
            (QUEUE_NUM, 0x038),
            (LEGACY_QUEUE_ALIGN, 0x03c),
            (LEGACY_QUEUE_PFN, 0x040),
            (QUEUE_READY, 0x044),
            (QUEUE_NOTIFY, 0x050),
            (INTERRUPT_STATUS, 0x060),
            (INTERRUPT_ACK, 0x064),
            (STATUS, 0x070),
            (QUEUE_DESC_LOW, 0x080),
            (QUEUE_DESC_HIGH, 0x084),
            (QUEUE_AVAIL_LOW, 0x090),
            (QUEUE_AVAIL_HIGH, 0x094),
            (QUEUE_USED_LOW, 0x0a0),
            (QUEUE_USED_HIGH, 0x0a4),
            (CONFIG_GENERATION, 0x0fc),
            (CONFIG, 0x100),
        ];
        for (index, (offset, expected)) in offsets.into_iter().enumerate() {
            assert_eq!(offset, expected, "register {index} of the table");
        }
    }
}
