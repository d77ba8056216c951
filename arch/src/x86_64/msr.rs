//! Model-specific registers every vCPU starts with.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// SYSENTER code segment.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER stack pointer.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER entry point.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// SYSCALL segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS mask applied on SYSCALL.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// GS base swapped in by SWAPGS.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Time stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// Miscellaneous feature enables.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations (REP MOVS/STOS).
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// Default memory type and MTRR enable.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRdefType bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Write-back memory type.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Errors while setting up MSRs.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list could not be built.
    #[error("cannot build the MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it does not accept.
    #[error("KVM set only {set} of {expected} boot MSRs (rejected MSR {rejected:#x})")]
    NotAllSet {
        /// MSRs KVM accepted.
        set: usize,
        /// MSRs Kiln asked for.
        expected: usize,
        /// Index of the first MSR KVM refused.
        rejected: u32,
    },
}

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The MSR values a vCPU starts with: SYSENTER/SYSCALL state cleared, TSC at 0, fast strings on,
/// MTRRs enabled with write-back as the default memory type.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// Loads [`boot_msr_entries`] into `vcpu`, failing unless KVM accepts every one of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::SetMsrs)?;
    if set != entries.len() {
        // KVM_SET_MSRS stops at the first MSR it refuses.
        return Err(MsrError::NotAllSet {
            set,
            expected: entries.len(),
            rejected: entries.get(set).map_or(0, |e| e.index),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::test_utils::kvm_vcpu;

    #[test]
    fn boot_msr_values() {
        let entries = boot_msr_entries();
        let value = |index| {
            entries
                .iter()
                .find(|e| e.index == index)
                .map(|e| e.data)
                .unwrap()
        };
        assert_eq!(value(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(value(MSR_MTRR_DEF_TYPE), 0x806);
        for index in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(value(index), 0, "MSR {index:#x}");
        }
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), 11);
    }

    #[test]
    fn kvm_accepts_every_boot_msr() {
        let (_kvm, _vm, vcpu) = kvm_vcpu();
        setup_msrs(&vcpu).unwrap();
        let wanted = boot_msr_entries();
        let mut msrs = Msrs::from_entries(
            &wanted
                .iter()
                .map(|e| entry(e.index, 0xdead))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), wanted.len());
        for (read, want) in msrs.as_slice().iter().zip(&wanted) {
            assert_eq!(read.index, want.index);
            if want.index == MSR_IA32_TSC {
                // The TSC keeps counting after it is written.
                continue;
            }
            assert_eq!(read.data, want.data, "MSR {:#x}", want.index);
        }
    }
}
