//! x86_64 boot state: one module per piece of machine state the guest expects at entry.

pub mod boot_params;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod paging;
pub mod regs;

#[cfg(test)]
pub(crate) mod test_utils;
