//! Guest RAM: one anonymous mapping per region, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::HugePages;

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

/// Size of an x86-64 transparent huge page (a PMD mapping).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Maps `size` bytes of guest RAM laid out around the 32-bit MMIO gap, each region at a
/// host address aligned to [`HUGE_PAGE_SIZE`].
///
/// Why aligned: KVM maps a guest page with a 2 MiB page-table entry only when the guest
/// physical and host virtual addresses agree modulo 2 MiB and a host huge page backs it. Guest
/// regions start 2 MiB aligned, but `mmap` places a large anonymous mapping at any 4 KiB
/// boundary on host kernels before 6.7; the guest then runs on 4 KiB mappings while the host
/// still zeroes whole 2 MiB pages for it (measured in the virtual KVM host, Linux 6.1: the
/// guest kernel reached init ~0.5 s later than with aligned memory).
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    let allocate_error = |reason: String| MemoryError::Allocate {
        mib: size >> 20,
        reason,
    };
    let regions = kiln_arch::memory::arch_memory_regions(size)
        .into_iter()
        .map(|(base, len)| aligned_region(base, len))
        .collect::<Result<Vec<_>, _>>()
        .map_err(allocate_error)?;
    GuestMemory::from_regions(regions).map_err(|err| allocate_error(err.to_string()))
}

/// Maps one region at a 2 MiB-aligned host address if it can. A try fails when a free gap
/// between `len` and `len + 2 MiB` lies above the hole (or another thread maps into the hole
/// first); the next try keeps the misplaced mapping, so it cannot land in that gap again.
fn aligned_region<B: NewBitmap>(
    base: GuestAddress,
    len: usize,
) -> Result<GuestRegionMmap<B>, String> {
    const TRIES: usize = 8;
    let mut misplaced = Vec::new();
    loop {
        // The bitmap first: a large one is allocated with mmap, which must not take the hole.
        let bitmap = B::with_len(len);
        let hole = AlignedHole::open(len);
        let mapping = MmapRegionBuilder::new_with_bitmap(len, bitmap)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|err| err.to_string())?;
        drop(hole);
        let aligned = (mapping.as_ptr() as usize).is_multiple_of(HUGE_PAGE_SIZE);
        if aligned || misplaced.len() + 1 == TRIES {
            if !aligned {
                log::debug!(
                    "guest memory at {:#x} landed at host address {:p}, not 2 MiB aligned",
                    base.raw_value(),
                    mapping.as_ptr()
                );
            }
            // Unmapped here: untouched and MAP_NORESERVE, they never cost memory.
            drop(misplaced);
            return GuestRegionMmap::new(mapping, base)
                .ok_or_else(|| format!("region at {:#x} overflows", base.raw_value()));
        }
        misplaced.push(mapping);
    }
}

/// A free, 2 MiB-aligned stretch of address space of exactly the size about to be mapped,
/// fenced by reserved (`PROT_NONE`) pieces on both sides until it is dropped.
///
/// `mmap` without an address takes the highest free gap that fits (top-down), and the fences
/// sit in the highest gap that fitted `len + 2 MiB`, so the next mapping of `len` bytes lands in
/// the hole unless a gap of between `len` and `len + 2 MiB` lies above it, or another thread
/// maps there first; either only costs the alignment. Nothing outside the fences is touched.
struct AlignedHole {
    fences: [(usize, usize); 2],
}

impl AlignedHole {
    fn open(len: usize) -> Option<Self> {
        let reserved_len = len.checked_add(HUGE_PAGE_SIZE)?;
        // SAFETY: a new private, inaccessible, unreserved mapping at an address the kernel
        // picks; it cannot overlap or change any existing mapping.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return None;
        }
        let start = reserved as usize;
        let hole = start.next_multiple_of(HUGE_PAGE_SIZE);
        let end = start + reserved_len;
        // SAFETY: [hole, hole + len) lies inside the reservation made above, which nothing else
        // refers to.
        unsafe { libc::munmap(hole as *mut libc::c_void, len) };
        Some(Self {
            fences: [(start, hole - start), (hole + len, end - (hole + len))],
        })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (start, len) in self.fences {
            if len > 0 {
                // SAFETY: each fence is what is left of this hole's own reservation; nothing
                // else can have been mapped over it (only MAP_FIXED could, and nothing uses it).
                unsafe { libc::munmap(start as *mut libc::c_void, len) };
            }
        }
    }
}

/// Maps guest RAM backed as `huge_pages` says: `Transparent` advises transparent huge pages
/// (see [`advise_huge_pages`]), `None` asks for none even where THP is on for every mapping,
/// `2M` takes hugetlbfs pages.
pub fn create_guest_memory_backed(
    size: u64,
    huge_pages: HugePages,
) -> Result<GuestMemory, MemoryError> {
    match huge_pages {
        HugePages::None => {
            let memory = create_guest_memory(size)?;
            for region in memory.iter() {
                if let Ok(host_address) = memory.get_host_address(region.start_addr()) {
                    // SAFETY: the range is exactly one live mapping owned by `memory`.
                    unsafe {
                        madvise_or_log(host_address, region.len() as usize, libc::MADV_NOHUGEPAGE)
                    };
                }
            }
            Ok(memory)
        }
        HugePages::Transparent => {
            let memory = create_guest_memory(size)?;
            advise_huge_pages(&memory);
            Ok(memory)
        }
        HugePages::Hugetlbfs2M => create_hugetlb_memory(size),
    }
}

/// Maps guest RAM on hugetlbfs 2 MiB pages (naturally 2 MiB aligned). Without
/// `MAP_NORESERVE` the kernel reserves every page now, so a short pool fails here with a
/// message instead of a `SIGBUS` when the guest first touches a page the pool cannot give.
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

/// Asks for transparent huge pages on guest RAM: a guest first-touching its memory then takes
/// one fault per 2 MiB instead of one per 4 KiB. Advisory: failure only costs speed.
///
/// Except the first 2 MiB: Kiln writes its boot structures there (zero page, GDT, page tables,
/// command line, MP and ACPI tables), a few KiB in all, and a huge page would make the host
/// zero and keep 2 MiB for them in every VM (measured with the `exit` guest: 5.1 MiB peak RSS
/// instead of 3.1 MiB). Linux only keeps firmware data and its real-mode trampoline there.
pub fn advise_huge_pages(memory: &GuestMemory) {
    for region in memory.iter() {
        let Ok(host_address) = memory.get_host_address(region.start_addr()) else {
            continue;
        };
        let len = region.len() as usize;
        let low = if region.start_addr().raw_value() == 0 {
            len.min(HUGE_PAGE_SIZE)
        } else {
            0
        };
        // SAFETY: both ranges lie inside one live mapping owned by `memory`; the advice only
        // changes how the kernel backs them, never their contents or validity.
        unsafe {
            madvise_or_log(host_address, low, libc::MADV_NOHUGEPAGE);
            madvise_or_log(host_address.add(low), len - low, libc::MADV_HUGEPAGE);
        }
    }
}

/// `madvise`, logging a failure (advice only ever costs speed or memory).
///
/// # Safety
/// `[address, address + len)` must lie inside a mapping the caller owns.
unsafe fn madvise_or_log(address: *mut u8, len: usize, advice: libc::c_int) {
    if len == 0 {
        return;
    }
    // SAFETY: the caller guarantees the range is inside its own live mapping.
    if unsafe { libc::madvise(address.cast(), len, advice) } != 0 {
        log::debug!(
            "madvise({advice}) on guest memory failed: {}",
            std::io::Error::last_os_error()
        );
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
        assert!(!flags(crate::config::THP_SKIP_BYTES - 1)
            .split(' ')
            .any(|f| f == "hg"));
        assert!(flags(crate::config::THP_SKIP_BYTES)
            .split(' ')
            .any(|f| f == "hg"));
        assert!(flags((64 << 20) - 1).split(' ').any(|f| f == "hg"));

        let plain = create_guest_memory_backed(64 << 20, HugePages::None).unwrap();
        let address = plain.get_host_address(GuestAddress(32 << 20)).unwrap() as usize;
        let flags = vm_flags_at(address);
        assert!(!flags.split(' ').any(|f| f == "hg"), "{flags}");
        // Refused explicitly, so that THP in "always" mode does not give it huge pages either.
        assert!(flags.split(' ').any(|f| f == "nh"), "{flags}");
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
    fn guest_memory_is_huge_page_aligned_on_the_host() {
        // Odd sizes too: newer host kernels align mappings of whole 2 MiB multiples themselves.
        for mib in [3, 129, 256, 1023] {
            let memory = create_guest_memory(mib << 20).unwrap();
            for region in memory.iter() {
                assert_eq!(region.as_ptr() as usize % HUGE_PAGE_SIZE, 0, "{mib} MiB");
            }
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
