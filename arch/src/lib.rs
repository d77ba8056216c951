//! x86_64 boot state for Kiln guests.
//!
//! Everything Kiln needs to enter a Linux kernel directly in 64-bit mode (the Linux x86 64-bit
//! boot protocol, as Firecracker does it): the guest memory map, `boot_params` with its e820
//! table, GDT/IDT and identity page tables, the boot vCPU registers, MSRs, CPUID and LAPIC,
//! and the MP and ACPI tables that describe the machine to the guest.
#![deny(missing_docs)]

pub mod x86_64;

pub use x86_64::*;

/// The guest memory type all of Kiln uses. Each region carries a bitmap of the pages written
/// through it (by devices and the VMM; KVM's dirty log covers the vCPUs), for diff snapshots.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
