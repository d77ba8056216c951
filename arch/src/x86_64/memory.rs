//! Guest RAM layout: which guest-physical ranges are RAM, and where an initrd goes.
//!
//! RAM starts at 0 and runs up to [`MMIO_GAP_START`]; whatever does not fit below the 32-bit
//! MMIO gap continues at 4 GiB ([`FIRST_ADDR_PAST_32BITS`]).

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_GAP_START};
use crate::GuestMemoryMmap;

/// Page size used to align guest blobs.
pub const PAGE_SIZE: u64 = 0x1000;

/// Highest address (exclusive) an initrd may end at: the boot protocol's default
/// `initrd_addr_max` is 0x7fff_ffff, the last byte the kernel accepts.
pub const INITRD_END_MAX: u64 = 0x8000_0000;

/// Errors of the guest memory helpers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryError {
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error(
        "initrd of {size} bytes does not fit in guest memory below {limit:#x} \
         (above the kernel, which ends at {kernel_end:#x})"
    )]
    InitrdDoesNotFit {
        /// Size of the initrd in bytes.
        size: usize,
        /// First address the initrd may not reach.
        limit: u64,
        /// End of the kernel image, the lowest address the initrd may use.
        kernel_end: u64,
    },
}

/// Guest RAM regions for `mem_size` bytes of memory, as `(start, size)` pairs.
///
/// Memory is split around the 32-bit MMIO gap: up to [`MMIO_GAP_START`] bytes start at 0, the
/// rest starts at 4 GiB. A `mem_size` of 0 gives no regions.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size == 0 {
        return Vec::new();
    }
    if mem_size <= MMIO_GAP_START {
        return vec![(GuestAddress(0), to_usize(mem_size))];
    }
    vec![
        (GuestAddress(0), to_usize(MMIO_GAP_START)),
        (
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            to_usize(mem_size - MMIO_GAP_START),
        ),
    ]
}

fn to_usize(value: u64) -> usize {
    // Kiln only builds for 64-bit hosts, where usize and u64 have the same width.
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// End (exclusive) of the RAM that starts at guest address 0, capped at the MMIO gap.
///
/// Returns 0 if no RAM starts at 0.
pub fn ram_end_below_gap(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .find(|region| region.start_addr() == GuestAddress(0))
        .map_or(0, |region| region.len().min(MMIO_GAP_START))
}

/// Start and size of the RAM above 4 GiB, if the guest has any.
pub fn ram_above_4g(mem: &GuestMemoryMmap) -> Option<(GuestAddress, u64)> {
    mem.iter()
        .find(|region| region.start_addr() >= GuestAddress(FIRST_ADDR_PAST_32BITS))
        .map(|region| (region.start_addr(), region.len()))
}

/// Highest page-aligned address at which an initrd of `initrd_size` bytes fits.
///
/// The initrd must lie in RAM below the MMIO gap, end at or below [`INITRD_END_MAX`] (the boot
/// protocol's `initrd_addr_max`) and start at or above `kernel_end` (rounded up to a page) and
/// [`HIMEM_START`]. Placing it as high as possible leaves the kernel room to decompress.
pub fn initrd_load_address(
    mem: &GuestMemoryMmap,
    initrd_size: usize,
    kernel_end: u64,
) -> Result<GuestAddress, MemoryError> {
    let limit = ram_end_below_gap(mem).min(INITRD_END_MAX);
    let does_not_fit = || MemoryError::InitrdDoesNotFit {
        size: initrd_size,
        limit,
        kernel_end,
    };
    let lowest = kernel_end
        .max(HIMEM_START)
        .checked_next_multiple_of(PAGE_SIZE)
        .ok_or_else(does_not_fit)?;
    let size = u64::try_from(initrd_size).map_err(|_| does_not_fit())?;
    let start = limit
        .checked_sub(size)
        .map(|end| end & !(PAGE_SIZE - 1))
        .ok_or_else(does_not_fit)?;
    if start < lowest {
        return Err(does_not_fit());
    }
    Ok(GuestAddress(start))
}

/// Checks that `[addr, addr + len)` lies entirely inside guest RAM.
pub(crate) fn range_in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    len == 0 || (addr.checked_add(len as u64).is_some() && mem.check_range(addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    #[test]
    fn small_memory_is_one_region_from_zero() {
        assert_eq!(
            arch_memory_regions(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        assert_eq!(
            arch_memory_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START as usize)]
        );
        assert!(arch_memory_regions(0).is_empty());
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let regions = arch_memory_regions(4 * GIB);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (
                    GuestAddress(FIRST_ADDR_PAST_32BITS),
                    (4 * GIB - MMIO_GAP_START) as usize
                ),
            ]
        );
        let total: usize = regions.iter().map(|(_, size)| size).sum();
        assert_eq!(total as u64, 4 * GIB);
    }

    #[test]
    fn ram_helpers_follow_the_regions() {
        let small = memory(128 * MIB);
        assert_eq!(ram_end_below_gap(&small), 128 * MIB);
        assert_eq!(ram_above_4g(&small), None);

        let large = memory(MMIO_GAP_START + 2 * MIB);
        assert_eq!(ram_end_below_gap(&large), MMIO_GAP_START);
        assert_eq!(
            ram_above_4g(&large),
            Some((GuestAddress(FIRST_ADDR_PAST_32BITS), 2 * MIB))
        );
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let mem = memory(128 * MIB);
        let addr = initrd_load_address(&mem, 0x1234, 0x20_0000).unwrap();
        assert_eq!(addr.raw_value() % PAGE_SIZE, 0);
        assert_eq!(addr.raw_value(), 128 * MIB - 2 * PAGE_SIZE);
        assert!(addr.raw_value() + 0x1234 <= 128 * MIB);
    }

    #[test]
    fn initrd_stays_below_initrd_addr_max() {
        let mem = memory(4 * GIB);
        let addr = initrd_load_address(&mem, 4096, 0x20_0000).unwrap();
        assert_eq!(addr.raw_value(), INITRD_END_MAX - 4096);
    }

    #[test]
    fn initrd_that_reaches_the_kernel_does_not_fit() {
        let mem = memory(16 * MIB);
        // Exactly fits between a kernel ending at 8 MiB and the end of RAM.
        assert_eq!(
            initrd_load_address(&mem, (8 * MIB) as usize, 8 * MIB).unwrap(),
            GuestAddress(8 * MIB)
        );
        let err = initrd_load_address(&mem, (8 * MIB) as usize + 1, 8 * MIB).unwrap_err();
        assert_eq!(
            err,
            MemoryError::InitrdDoesNotFit {
                size: (8 * MIB) as usize + 1,
                limit: 16 * MIB,
                kernel_end: 8 * MIB
            }
        );
        assert!(err
            .to_string()
            .contains("initrd of 8388609 bytes does not fit in guest memory below 0x1000000"));
        // Larger than all of RAM, and a kernel end that cannot be rounded up.
        assert!(initrd_load_address(&mem, usize::MAX, 0).is_err());
        assert!(initrd_load_address(&mem, 1, u64::MAX).is_err());
    }

    #[test]
    fn range_check_rejects_ranges_outside_ram() {
        let mem = memory(MIB);
        assert!(range_in_memory(&mem, GuestAddress(0), MIB as usize));
        assert!(!range_in_memory(&mem, GuestAddress(1), MIB as usize));
        assert!(!range_in_memory(&mem, GuestAddress(u64::MAX), 2));
        assert!(range_in_memory(&mem, GuestAddress(u64::MAX), 0));
    }
}
