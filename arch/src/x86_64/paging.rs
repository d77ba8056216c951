//! Identity page tables for the first GiB, enough for a kernel entered in long mode.
//!
//! One PML4 entry points at one PDPT entry, which points at a page directory of 512 2 MiB
//! pages mapping `[0, 1 GiB)` one to one. Linux builds its own tables right after entry.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{PDE_START, PDPTE_START, PML4_START};
use crate::GuestMemoryMmap;

/// Entry flag: the mapping is present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Entry flag: the mapping is writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page directory entry flag: the entry maps a 2 MiB page.
pub const PTE_HUGE_PAGE: u64 = 1 << 7;
/// Entries per page table.
pub const ENTRIES_PER_TABLE: usize = 512;
/// Size of the pages the page directory maps.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The page table entries for the identity map: PML4, PDPT and page directory contents.
///
/// Unused entries are zero; each table is a full 4 KiB page.
pub fn identity_page_tables() -> [[u64; ENTRIES_PER_TABLE]; 3] {
    let mut pml4 = [0u64; ENTRIES_PER_TABLE];
    let mut pdpt = [0u64; ENTRIES_PER_TABLE];
    let mut pd = [0u64; ENTRIES_PER_TABLE];
    pml4[0] = PDPTE_START | PTE_PRESENT | PTE_WRITABLE;
    pdpt[0] = PDE_START | PTE_PRESENT | PTE_WRITABLE;
    for (index, entry) in pd.iter_mut().enumerate() {
        *entry = (index as u64 * HUGE_PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE_PAGE;
    }
    [pml4, pdpt, pd]
}

/// Writes the identity page tables at [`PML4_START`], [`PDPTE_START`] and [`PDE_START`] and
/// returns the CR3 value that selects them.
pub fn setup_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, GuestMemoryError> {
    let [pml4, pdpt, pd] = identity_page_tables();
    for (table, start) in [(pml4, PML4_START), (pdpt, PDPTE_START), (pd, PDE_START)] {
        let bytes: Vec<u8> = table.iter().flat_map(|entry| entry.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(start))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_entry(mem: &GuestMemoryMmap, table: u64, index: u64) -> u64 {
        mem.read_obj(GuestAddress(table + 8 * index)).unwrap()
    }

    #[test]
    fn identity_map_of_the_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Stale data from an earlier boot must not survive.
        mem.write_obj(0xdead_beefu64, GuestAddress(PML4_START + 8))
            .unwrap();
        let cr3 = setup_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);

        assert_eq!(read_entry(&mem, PML4_START, 0), 0xa003);
        assert_eq!(read_entry(&mem, PML4_START, 1), 0);
        assert_eq!(read_entry(&mem, PDPTE_START, 0), 0xb003);
        assert_eq!(read_entry(&mem, PDPTE_START, 1), 0);
        assert_eq!(read_entry(&mem, PDE_START, 0), 0x83);
        assert_eq!(read_entry(&mem, PDE_START, 1), 0x20_0083);
        assert_eq!(read_entry(&mem, PDE_START, 511), 0x3fe0_0083);
        for index in 0..ENTRIES_PER_TABLE as u64 {
            let entry = read_entry(&mem, PDE_START, index);
            assert_eq!(entry & !0xfff, index << 21, "PD entry {index}");
        }
    }

    #[test]
    fn fails_without_memory_for_the_tables() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(setup_identity_page_tables(&mem).is_err());
    }
}
