//! Device models for Kiln guests.
//!
//! - [`bus`]: the address buses (port I/O and MMIO) a vCPU exit is dispatched on.
//! - [`exit`]: the single channel through which any device asks the VM to stop.
//! - [`log_limit`]: rate limiting for the log lines a guest can trigger.
//! - [`legacy`]: the few PC-compatible devices a microVM still needs (COM1 serial,
//!   i8042 keyboard controller, pvpanic, ACPI power management, boot timer).
//! - [`virtio`]: the virtio-mmio transport and the virtio devices (block).
#![deny(missing_docs)]

pub mod bus;
pub mod exit;
pub mod legacy;
pub mod log_limit;
pub mod virtio;

#[cfg(test)]
mod test_logger;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitNotifier, StopReason};
