//! Register offsets of the virtio-mmio layout version 2 (virtio 1.2, table 4.1).

/// R: magic value.
pub const MAGIC_VALUE: u64 = 0x000;
/// R: version.
pub const VERSION: u64 = 0x004;
/// R: device ID.
pub const DEVICE_ID: u64 = 0x008;
/// R: vendor ID.
pub const VENDOR_ID: u64 = 0x00c;
/// R: 32 feature bits selected by `DEVICE_FEATURES_SEL`.
pub const DEVICE_FEATURES: u64 = 0x010;
/// W: selects the word of `DEVICE_FEATURES`.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// W: 32 feature bits the driver accepted, selected by `DRIVER_FEATURES_SEL`.
pub const DRIVER_FEATURES: u64 = 0x020;
/// W: selects the word of `DRIVER_FEATURES`.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// Legacy only (version 1): guest page size.
pub const LEGACY_GUEST_PAGE_SIZE: u64 = 0x028;
/// W: selects the queue the queue registers refer to.
pub const QUEUE_SEL: u64 = 0x030;
/// R: maximum size of the selected queue (0: no such queue).
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// W: size of the selected queue.
pub const QUEUE_NUM: u64 = 0x038;
/// Legacy only (version 1): queue alignment.
pub const LEGACY_QUEUE_ALIGN: u64 = 0x03c;
/// Legacy only (version 1): queue page frame number.
pub const LEGACY_QUEUE_PFN: u64 = 0x040;
/// RW: the selected queue is ready.
pub const QUEUE_READY: u64 = 0x044;
/// W: queue notification (the value is the queue index).
pub const QUEUE_NOTIFY: u64 = 0x050;
/// R: pending interrupt causes.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// W: acknowledges interrupt causes.
pub const INTERRUPT_ACK: u64 = 0x064;
/// RW: device status.
pub const STATUS: u64 = 0x070;
/// W: descriptor table address, low 32 bits.
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// W: descriptor table address, high 32 bits.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// W: available ring address, low 32 bits.
pub const QUEUE_AVAIL_LOW: u64 = 0x090;
/// W: available ring address, high 32 bits.
pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
/// W: used ring address, low 32 bits.
pub const QUEUE_USED_LOW: u64 = 0x0a0;
/// W: used ring address, high 32 bits.
pub const QUEUE_USED_HIGH: u64 = 0x0a4;
/// R: configuration atomicity value.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const CONFIG: u64 = 0x100;
