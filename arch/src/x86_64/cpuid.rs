//! CPUID as the guest sees it: KVM's supported set, with the topology of a Kiln VM.
//!
//! Every vCPU is one core of a single socket with one thread per core; its APIC id is its
//! vCPU index. KVM's paravirt leaves (`0x4000_0000..`, the "KVMKVMKVM" signature and feature
//! bits) are left exactly as KVM reports them.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 0: highest basic leaf and vendor string.
pub const LEAF_VENDOR: u32 = 0;
/// Leaf 1: family/model, APIC id, feature bits.
pub const LEAF_FEATURES: u32 = 1;
/// Leaf 4 (Intel): deterministic cache parameters.
pub const LEAF_CACHE_PARAMETERS: u32 = 4;
/// Leaf 6: thermal and power management.
pub const LEAF_POWER_MANAGEMENT: u32 = 6;
/// Leaf 0xb: extended topology enumeration.
pub const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1f: V2 extended topology enumeration.
pub const LEAF_EXTENDED_TOPOLOGY_V2: u32 = 0x1f;
/// First hypervisor leaf (KVM signature).
pub const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
/// Leaf 0x8000_0001: extended feature bits.
pub const LEAF_EXTENDED_FEATURES: u32 = 0x8000_0001;
/// Leaf 0x8000_0008 (AMD): address sizes and core count (NC).
pub const LEAF_AMD_SIZE_IDENTIFIERS: u32 = 0x8000_0008;
/// Leaf 0x8000_001d (AMD): cache topology.
pub const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
/// Leaf 0x8000_001e (AMD): extended APIC id, core and node ids.
pub const LEAF_AMD_EXTENDED_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 EDX: hyper-threading / multi-core (logical processor count valid).
pub const EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: TSC-deadline mode of the LAPIC timer.
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 6 EAX: APIC timer always running (the only power feature KVM offers).
pub const EAX_ARAT: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX (AMD): core multi-processing legacy mode.
pub const ECX_CMP_LEGACY: u32 = 1 << 1;
/// CLFLUSH line size in 8-byte units (64-byte lines).
pub const CLFLUSH_LINE_SIZE: u32 = 8;

/// Topology level type "SMT" in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_SMT: u32 = 1;
/// Topology level type "core" in leaf 0xb/0x1f ECX[15:8].
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors while adapting CPUID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// A VM needs at least one vCPU.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    /// The vCPU index is not below the vCPU count.
    #[error("vCPU id {vcpu_id} is out of range for {cpu_count} vCPUs")]
    VcpuIdOutOfRange {
        /// The vCPU index.
        vcpu_id: u8,
        /// Number of vCPUs.
        cpu_count: u8,
    },
    /// KVM's CPUID lacks a leaf the guest cannot boot without.
    #[error("CPUID leaf {0:#x} is missing from KVM's supported CPUID")]
    MissingLeaf(u32),
}

/// CPU vendor, from the leaf 0 vendor string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" or "HygonGenuine".
    Amd,
    /// Any other vendor string.
    Other,
}

/// The vendor named by leaf 0 of `cpuid`.
pub fn cpu_vendor(cpuid: &CpuId) -> Result<CpuVendor, CpuidError> {
    let leaf = find(cpuid, LEAF_VENDOR).ok_or(CpuidError::MissingLeaf(LEAF_VENDOR))?;
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&leaf.edx.to_le_bytes());
    vendor[8..12].copy_from_slice(&leaf.ecx.to_le_bytes());
    Ok(match &vendor {
        b"GenuineIntel" => CpuVendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => CpuVendor::Amd,
        _ => CpuVendor::Other,
    })
}

fn find(cpuid: &CpuId, function: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid.as_slice().iter().find(|e| e.function == function)
}

/// Number of APIC id bits needed to number `count` CPUs (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

/// Replaces `width` bits of `value` starting at `shift` with `field`.
fn set_bits(value: u32, shift: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u32 << width) - 1) << shift;
    (value & !mask) | ((field << shift) & mask)
}

/// Adapts KVM's supported CPUID (from `Kvm::get_supported_cpuid`) for vCPU `vcpu_id` of
/// `cpu_count`.
///
/// Leaf 1 gets the APIC id, logical processor count, CLFLUSH size, HTT and hypervisor bits;
/// cache and topology leaves (4, 0xb, 0x1f, AMD 0x8000_0008/1d/1e) describe one socket with
/// `cpu_count` single-threaded cores; leaf 6 keeps only ARAT. The TSC-deadline bit stays as KVM
/// reported it: use [`set_tsc_deadline_timer`] with `KVM_CAP_TSC_DEADLINE_TIMER` to fix it up.
pub fn filter_cpuid(kvm_cpuid: &mut CpuId, vcpu_id: u8, cpu_count: u8) -> Result<(), CpuidError> {
    if cpu_count == 0 {
        return Err(CpuidError::NoCpus);
    }
    if vcpu_id >= cpu_count {
        return Err(CpuidError::VcpuIdOutOfRange { vcpu_id, cpu_count });
    }
    let vendor = cpu_vendor(kvm_cpuid)?;
    if find(kvm_cpuid, LEAF_FEATURES).is_none() {
        return Err(CpuidError::MissingLeaf(LEAF_FEATURES));
    }
    if vendor == CpuVendor::Other {
        log::warn!("unknown CPU vendor: only vendor-neutral CPUID fixups applied");
    }

    let apic_id = u32::from(vcpu_id);
    let count = u32::from(cpu_count);
    for entry in kvm_cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                entry.ebx = set_bits(entry.ebx, 24, 8, apic_id);
                entry.ebx = set_bits(entry.ebx, 16, 8, count);
                entry.ebx = set_bits(entry.ebx, 8, 8, CLFLUSH_LINE_SIZE);
                if cpu_count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
                entry.ecx |= ECX_HYPERVISOR;
            }
            LEAF_CACHE_PARAMETERS | LEAF_AMD_CACHE_TOPOLOGY => fix_cache_leaf(entry, count),
            LEAF_POWER_MANAGEMENT => {
                // No turbo, HWP, thermal or energy-bias control: KVM emulates none of them.
                entry.eax &= EAX_ARAT;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_EXTENDED_TOPOLOGY_V2 => {
                fix_topology_leaf(entry, apic_id, cpu_count)
            }
            LEAF_EXTENDED_FEATURES if vendor == CpuVendor::Amd => {
                if cpu_count > 1 {
                    entry.ecx |= ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZE_IDENTIFIERS if vendor == CpuVendor::Amd => {
                // ECX[15:12] ApicIdSize, ECX[7:0] NC = cores - 1.
                entry.ecx = set_bits(entry.ecx, 12, 4, id_bits(cpu_count));
                entry.ecx = set_bits(entry.ecx, 0, 8, count - 1);
            }
            LEAF_AMD_EXTENDED_APIC_ID => {
                entry.eax = apic_id;
                // EBX[7:0] core id, EBX[15:8] threads per core - 1 = 0.
                entry.ebx = set_bits(entry.ebx & !0xffff, 0, 8, apic_id);
                // ECX[7:0] node id 0, ECX[10:8] nodes per processor - 1 = 0.
                entry.ecx &= !0x7ff;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Cache leaves 4 and 0x8000_001d: L1/L2 are per core, L3 is shared by the whole socket.
fn fix_cache_leaf(entry: &mut kvm_cpuid_entry2, count: u32) {
    let cache_type = entry.eax & 0x1f;
    if cache_type == 0 {
        return;
    }
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    entry.eax = set_bits(entry.eax, 14, 12, sharing);
    if entry.function == LEAF_CACHE_PARAMETERS {
        // EAX[31:26]: cores per package - 1 (6 bits).
        entry.eax = set_bits(entry.eax, 26, 6, (count - 1).min(0x3f));
    }
}

/// Leaves 0xb and 0x1f: subleaf 0 is the SMT level (1 thread), subleaf 1 the core level
/// (`cpu_count` cores), all further subleaves are invalid.
fn fix_topology_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u32, cpu_count: u8) {
    let index = entry.index & 0xff;
    let (shift, processors, level_type) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (id_bits(cpu_count), u32::from(cpu_count), LEVEL_TYPE_CORE),
        _ => (0, 0, 0),
    };
    entry.eax = shift;
    entry.ebx = processors;
    entry.ecx = (level_type << 8) | index;
    entry.edx = apic_id;
}

/// Sets leaf 1's TSC-deadline bit if `supported` (`KVM_CAP_TSC_DEADLINE_TIMER`), clears it
/// otherwise. Older KVMs never report the bit in `KVM_GET_SUPPORTED_CPUID`.
pub fn set_tsc_deadline_timer(kvm_cpuid: &mut CpuId, supported: bool) -> Result<(), CpuidError> {
    let leaf = kvm_cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == LEAF_FEATURES)
        .ok_or(CpuidError::MissingLeaf(LEAF_FEATURES))?;
    if supported {
        leaf.ecx |= ECX_TSC_DEADLINE;
    } else {
        leaf.ecx &= !ECX_TSC_DEADLINE;
    }
    Ok(())
}

#[cfg(test)]
#[path = "cpuid_tests.rs"]
mod tests;
