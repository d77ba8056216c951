//! x86_64 boot state: one module per piece of machine state the guest expects at entry.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;

#[cfg(test)]
mod boot_tests;
#[cfg(test)]
pub(crate) mod test_utils;
