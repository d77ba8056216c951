//! The PC-compatible devices a Kiln microVM still needs.
//!
//! Each sits on the port-I/O bus (the boot timer on the MMIO bus) at the address given
//! by `kiln_arch`'s layout, and implements [`BusDevice`](crate::bus::BusDevice) with
//! offsets relative to that address.

pub mod acpi_pm;
pub mod boot_timer;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::AcpiPmDevice;
pub use boot_timer::BootTimer;
pub use i8042::I8042Device;
pub use pvpanic::PvPanicDevice;
pub use serial::{EventFdTrigger, SerialDevice};
