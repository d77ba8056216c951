//! Guest RAM: one anonymous mapping per region, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

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

/// Asks for transparent huge pages on guest RAM: a guest first-touching its memory then takes
/// one fault per 2 MiB instead of one per 4 KiB. Advisory: failure only costs speed.
pub fn advise_huge_pages(memory: &GuestMemory) {
    for region in memory.iter() {
        let Ok(host_address) = memory.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the range is exactly one live mapping owned by `memory`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        let result = unsafe {
            libc::madvise(
                host_address.cast(),
                region.len() as usize,
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
