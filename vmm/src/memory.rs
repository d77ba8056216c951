//! Guest RAM: one anonymous mapping per region, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::{HugePages, THP_SKIP_BYTES};

/// Guest memory as Kiln uses it everywhere.
pub type GuestMemory = kiln_arch::GuestMemoryMmap;

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host would not map the memory.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Allocate {
        /// Size asked for.
        mib: u64,
        /// The mapping error.
        reason: String,
    },
    /// The host's hugetlbfs pool cannot hold the guest.
    #[error(
        "cannot reserve {mib} MiB of 2 MiB huge pages for guest memory ({reason}); the host's \
         pool (vm.nr_hugepages, HugePages_Free in /proc/meminfo) must have that many free, or use \
         huge_pages None or Transparent"
    )]
    HugetlbReserve {
        /// Size asked for.
        mib: u64,
        /// The mapping error.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory region {slot} at {base:#x}: {source}")]
    Register {
        /// Slot number.
        slot: u32,
        /// Guest physical base.
        base: u64,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
}

/// Maps `size` bytes of guest RAM laid out around the 32-bit MMIO gap.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let regions = kiln_arch::memory::arch_memory_regions(size);
    GuestMemory::from_ranges(&regions).map_err(|err| MemoryError::Allocate {
        mib: size >> 20,
        reason: err.to_string(),
    })
}

/// Maps guest RAM backed as `huge_pages` says, and advises it for transparent huge pages when
/// asked to.
pub fn create_guest_memory_backed(
    size: u64,
    huge_pages: HugePages,
) -> Result<GuestMemory, MemoryError> {
    match huge_pages {
        HugePages::None => create_guest_memory(size),
        HugePages::Transparent => {
            let memory = create_guest_memory(size)?;
            advise_huge_pages(&memory, THP_SKIP_BYTES);
            Ok(memory)
        }
        HugePages::Hugetlbfs2M => create_hugetlb_memory(size),
    }
}

/// Maps guest RAM on hugetlbfs 2 MiB pages. Without `MAP_NORESERVE` the kernel reserves every
/// page now, so a short pool fails here with a message instead of a `SIGBUS` when the guest
/// first touches a page the pool cannot give.
pub fn create_hugetlb_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let reserve_error = |reason: String| MemoryError::HugetlbReserve {
        mib: size >> 20,
        reason,
    };
    let regions = kiln_arch::memory::arch_memory_regions(size)
        .into_iter()
        .map(|(base, len)| {
            let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(
                    libc::MAP_ANONYMOUS
                        | libc::MAP_PRIVATE
                        | libc::MAP_HUGETLB
                        | libc::MAP_HUGE_2MB,
                )
                .with_hugetlbfs(true)
                .build()
                .map_err(|err| reserve_error(err.to_string()))?;
            GuestRegionMmap::new(mapping, base)
                .ok_or_else(|| reserve_error("the region does not fit the address space".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemory::from_regions(regions).map_err(|err| MemoryError::Allocate {
        mib: size >> 20,
        reason: err.to_string(),
    })
}

/// Asks for transparent huge pages on guest RAM from guest address `skip_below` up: a guest
/// first-touching its memory then takes one fault per 2 MiB instead of one per 4 KiB. Advisory:
/// failure only costs speed.
pub fn advise_huge_pages(memory: &GuestMemory, skip_below: u64) {
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(skip_below);
        let end = region.start_addr().raw_value() + region.len();
        if start >= end {
            continue;
        }
        let Ok(host_address) = memory.get_host_address(GuestAddress(start)) else {
            continue;
        };
        // SAFETY: the range lies inside one live mapping owned by `memory`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        let result = unsafe {
            libc::madvise(
                host_address.cast(),
                (end - start) as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if result != 0 {
            log::debug!(
                "madvise(MADV_HUGEPAGE) on guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Hands every region to KVM, one slot each (slot = region index); with `track_dirty`, KVM
/// logs the pages vCPUs write (for diff snapshots).
pub fn register_guest_memory(
    vm_fd: &VmFd,
    memory: &GuestMemory,
    track_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let base = region.start_addr().raw_value();
        let host_address =
            memory
                .get_host_address(GuestAddress(base))
                .map_err(|err| MemoryError::Allocate {
                    mib: region.len() >> 20,
                    reason: err.to_string(),
                })?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if track_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: base,
            memory_size: region.len(),
            userspace_addr: host_address as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which the VM keeps for as long
        // as the VM fd exists (both are dropped together in `Vm`), and slots do not overlap.
        unsafe { vm_fd.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::Register { slot, base, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` line of the mapping that contains `address`, from /proc/self/smaps.
    fn vm_flags_at(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        inside = (start..end).contains(&address);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.trim().to_string();
                }
            }
        }
        panic!("no mapping at {address:#x}");
    }

    #[test]
    fn transparent_huge_pages_skip_the_boot_structures() {
        let memory = create_guest_memory_backed(64 << 20, HugePages::Transparent).unwrap();
        let host = |guest: u64| memory.get_host_address(GuestAddress(guest)).unwrap() as usize;
        let flags = |guest| vm_flags_at(host(guest));
        assert!(!flags(0).split(' ').any(|f| f == "hg"), "{}", flags(0));
        assert!(!flags(THP_SKIP_BYTES - 1).split(' ').any(|f| f == "hg"));
        assert!(flags(THP_SKIP_BYTES).split(' ').any(|f| f == "hg"));
        assert!(flags((64 << 20) - 1).split(' ').any(|f| f == "hg"));

        let plain = create_guest_memory_backed(64 << 20, HugePages::None).unwrap();
        let address = plain.get_host_address(GuestAddress(32 << 20)).unwrap() as usize;
        assert!(!vm_flags_at(address).split(' ').any(|f| f == "hg"));
    }

    #[test]
    fn hugetlb_memory_is_reserved_up_front_or_refused() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let free_pages: u64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("HugePages_Free:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0);
        // One page more than the pool has: refused at once, never a SIGBUS on first touch.
        let too_big = (free_pages + 1) * (2 << 20);
        let err = create_hugetlb_memory(too_big).unwrap_err();
        assert!(matches!(err, MemoryError::HugetlbReserve { .. }), "{err}");
        assert!(err.to_string().contains("vm.nr_hugepages"), "{err}");
        if free_pages >= 1 {
            use vm_memory::Bytes;
            let memory = create_hugetlb_memory(2 << 20).unwrap();
            memory
                .write_obj(0x1234_5678u32, GuestAddress(0x1000))
                .unwrap();
            assert_eq!(
                memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
                0x1234_5678
            );
        }
    }

    #[test]
    fn small_guest_is_one_region() {
        let memory = create_guest_memory(128 << 20).unwrap();
        assert_eq!(memory.num_regions(), 1);
        assert_eq!(memory.last_addr(), GuestAddress((128 << 20) - 1));
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        use kiln_arch::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};
        let size = 4u64 << 30;
        let memory = create_guest_memory(size).unwrap();
        assert_eq!(memory.num_regions(), 2);
        let total: u64 = memory.iter().map(|r| r.len()).sum();
        assert_eq!(total, size);
        assert!(memory.address_in_range(GuestAddress(MMIO_GAP_START - 1)));
        assert!(!memory.address_in_range(GuestAddress(MMIO_GAP_START)));
        assert!(memory.address_in_range(GuestAddress(FIRST_ADDR_PAST_32BITS)));
    }
}
