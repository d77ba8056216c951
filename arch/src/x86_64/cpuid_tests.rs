use super::*;
use crate::x86_64::test_utils::kvm_vcpu;
use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};

fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags: if index > 0 {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

fn vendor_leaf(max_leaf: u32, vendor: &[u8; 12]) -> kvm_cpuid_entry2 {
    let word = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
    leaf(0, 0, [max_leaf, word(0), word(8), word(4)])
}

fn kvm_leaves() -> Vec<kvm_cpuid_entry2> {
    vec![
        leaf(
            0x4000_0000,
            0,
            [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
        ),
        leaf(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
    ]
}

fn intel_cpuid() -> CpuId {
    let mut entries = vec![
        vendor_leaf(0x1f, b"GenuineIntel"),
        // Host APIC id 0x17, 32 logical processors, CLFLUSH 0, HTT set.
        leaf(1, 0, [0x000a_06a7, 0x1720_0000, 0x7ffa_fbff, 0xbfeb_fbff]),
        leaf(4, 0, [0xfc00_4121, 0x01c0_003f, 0x3f, 0]),
        leaf(4, 1, [0xfc00_4122, 0x01c0_003f, 0x3f, 0]),
        leaf(4, 2, [0xfc00_4143, 0x03c0_003f, 0x3ff, 0]),
        leaf(4, 3, [0xfc03_c163, 0x02c0_003f, 0x7fff, 4]),
        leaf(4, 4, [0, 0, 0, 0]),
        leaf(6, 0, [0x0000_0077, 2, 0x9, 0]),
        leaf(0xb, 0, [1, 2, 0x100, 0x17]),
        leaf(0xb, 1, [6, 32, 0x201, 0x17]),
        leaf(0xb, 2, [0, 0, 2, 0x17]),
        leaf(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
        leaf(0x8000_0008, 0, [0x3027, 0, 0, 0]),
    ];
    entries.extend(kvm_leaves());
    CpuId::from_entries(&entries).unwrap()
}

fn amd_cpuid() -> CpuId {
    let mut entries = vec![
        vendor_leaf(0x10, b"AuthenticAMD"),
        leaf(1, 0, [0x00a2_0f12, 0x0510_0800, 0x7ed8_320b, 0x178b_fbff]),
        leaf(6, 0, [0x4, 0, 0x1, 0]),
        leaf(0x8000_0001, 0, [0x00a2_0f12, 0, 0x7599_1ff1, 0x2fd3_fbff]),
        leaf(0x8000_0008, 0, [0x3030, 0, 0x0003_700f, 0]),
        leaf(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
        leaf(0x8000_001d, 1, [0x0000_4143, 0x01c0_003f, 0x3ff, 2]),
        leaf(0x8000_001d, 2, [0x0001_c163, 0x03c0_003f, 0x7fff, 1]),
        leaf(0x8000_001d, 3, [0, 0, 0, 0]),
        leaf(0x8000_001e, 0, [0x17, 0x0000_0107, 0x0000_0100, 0]),
    ];
    entries.extend(kvm_leaves());
    CpuId::from_entries(&entries).unwrap()
}

fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
    *cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
        .unwrap()
}

fn kvm_leaves_of(cpuid: &CpuId) -> Vec<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .filter(|e| (0x4000_0000..0x4000_0100).contains(&e.function))
        .copied()
        .collect()
}

#[test]
fn vendor_detection() {
    assert_eq!(cpu_vendor(&intel_cpuid()).unwrap(), CpuVendor::Intel);
    assert_eq!(cpu_vendor(&amd_cpuid()).unwrap(), CpuVendor::Amd);
    let hygon = CpuId::from_entries(&[vendor_leaf(0xd, b"HygonGenuine")]).unwrap();
    assert_eq!(cpu_vendor(&hygon).unwrap(), CpuVendor::Amd);
    let other = CpuId::from_entries(&[vendor_leaf(0xd, b"CentaurHauls")]).unwrap();
    assert_eq!(cpu_vendor(&other).unwrap(), CpuVendor::Other);
}

#[test]
fn intel_leaf_1() {
    let mut cpuid = intel_cpuid();
    filter_cpuid(&mut cpuid, 2, 4).unwrap();
    let l1 = get(&cpuid, 1, 0);
    assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
    assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
    assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line size");
    assert_ne!(l1.edx & EDX_HTT, 0);
    assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
    // Everything else passes through.
    assert_eq!(l1.eax, 0x000a_06a7);
    assert_eq!(l1.ecx & !ECX_HYPERVISOR, 0x7ffa_fbff);
}

#[test]
fn intel_cache_and_topology_leaves() {
    let mut cpuid = intel_cpuid();
    filter_cpuid(&mut cpuid, 2, 4).unwrap();
    for index in 0..3 {
        let eax = get(&cpuid, 4, index).eax;
        assert_eq!(eax >> 26, 3, "cores per package - 1, subleaf {index}");
        assert_eq!((eax >> 14) & 0xfff, 0, "L1/L2 sharing, subleaf {index}");
        assert_eq!(eax & 0x3fff, get(&intel_cpuid(), 4, index).eax & 0x3fff);
    }
    let l3 = get(&cpuid, 4, 3).eax;
    assert_eq!(((l3 >> 14) & 0xfff, l3 >> 26), (3, 3));
    assert_eq!(get(&cpuid, 4, 4).eax, 0, "terminating subleaf untouched");

    let smt = get(&cpuid, 0xb, 0);
    assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
    let core = get(&cpuid, 0xb, 1);
    assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
    let end = get(&cpuid, 0xb, 2);
    assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 2));

    let pm = get(&cpuid, 6, 0);
    assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (EAX_ARAT, 0, 0, 0));

    // AMD-only fields are left alone on Intel.
    assert_eq!(get(&cpuid, 0x8000_0001, 0).ecx, 0x121);
    assert_eq!(get(&cpuid, 0x8000_0008, 0).ecx, 0);
}

#[test]
fn intel_single_cpu() {
    let mut cpuid = intel_cpuid();
    filter_cpuid(&mut cpuid, 0, 1).unwrap();
    let l1 = get(&cpuid, 1, 0);
    assert_eq!(l1.ebx >> 24, 0);
    assert_eq!((l1.ebx >> 16) & 0xff, 1);
    assert_eq!(l1.edx & EDX_HTT, 0);
    let core = get(&cpuid, 0xb, 1);
    assert_eq!((core.eax, core.ebx, core.edx), (0, 1, 0));
    assert_eq!(get(&cpuid, 4, 3).eax >> 26, 0);
}

#[test]
fn topology_shift_rounds_up() {
    let mut cpuid = intel_cpuid();
    filter_cpuid(&mut cpuid, 4, 5).unwrap();
    assert_eq!(get(&cpuid, 0xb, 1).eax, 3);
    assert_eq!(get(&cpuid, 0xb, 0).edx, 4);
    let mut many = intel_cpuid();
    filter_cpuid(&mut many, 200, 254).unwrap();
    assert_eq!(get(&many, 0xb, 1).eax, 8);
    assert_eq!(get(&many, 1, 0).ebx >> 24, 200);
    assert_eq!(get(&many, 4, 0).eax >> 26, 63, "6-bit field saturates");
}

#[test]
fn amd_topology() {
    let mut cpuid = amd_cpuid();
    filter_cpuid(&mut cpuid, 3, 4).unwrap();
    let l1 = get(&cpuid, 1, 0);
    assert_eq!((l1.ebx >> 24, (l1.ebx >> 16) & 0xff), (3, 4));
    assert_ne!(l1.edx & EDX_HTT, 0);
    assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);

    assert_ne!(get(&cpuid, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
    // NC = 3, ApicIdSize = 2, PerfTscSize bits kept.
    assert_eq!(get(&cpuid, 0x8000_0008, 0).ecx, 0x0003_2003);

    let ext = get(&cpuid, 0x8000_001e, 0);
    assert_eq!((ext.eax, ext.ebx, ext.ecx, ext.edx), (3, 3, 0, 0));

    assert_eq!((get(&cpuid, 0x8000_001d, 0).eax >> 14) & 0xfff, 0);
    assert_eq!((get(&cpuid, 0x8000_001d, 1).eax >> 14) & 0xfff, 0);
    assert_eq!((get(&cpuid, 0x8000_001d, 2).eax >> 14) & 0xfff, 3);

    let mut single = amd_cpuid();
    filter_cpuid(&mut single, 0, 1).unwrap();
    assert_eq!(get(&single, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
    assert_eq!(get(&single, 0x8000_0008, 0).ecx, 0x0003_0000);
}

#[test]
fn kvm_paravirt_leaves_are_kept() {
    for original in [intel_cpuid(), amd_cpuid()] {
        let mut cpuid = original.clone();
        filter_cpuid(&mut cpuid, 1, 2).unwrap();
        assert_eq!(kvm_leaves_of(&cpuid), kvm_leaves_of(&original));
        assert_eq!(kvm_leaves_of(&cpuid).len(), 2);
        assert_eq!(cpuid.as_slice().len(), original.as_slice().len());
    }
}

#[test]
fn filtering_is_idempotent() {
    let mut once = amd_cpuid();
    filter_cpuid(&mut once, 1, 3).unwrap();
    let mut twice = once.clone();
    filter_cpuid(&mut twice, 1, 3).unwrap();
    assert_eq!(once.as_slice(), twice.as_slice());
}

#[test]
fn bad_topology_and_missing_leaves() {
    let mut cpuid = intel_cpuid();
    assert_eq!(filter_cpuid(&mut cpuid, 0, 0), Err(CpuidError::NoCpus));
    assert_eq!(
        filter_cpuid(&mut cpuid, 4, 4),
        Err(CpuidError::VcpuIdOutOfRange {
            vcpu_id: 4,
            cpu_count: 4
        })
    );
    let mut no_vendor = CpuId::from_entries(&[leaf(1, 0, [0; 4])]).unwrap();
    assert_eq!(
        filter_cpuid(&mut no_vendor, 0, 1),
        Err(CpuidError::MissingLeaf(0))
    );
    let mut no_features = CpuId::from_entries(&[vendor_leaf(1, b"GenuineIntel")]).unwrap();
    assert_eq!(
        filter_cpuid(&mut no_features, 0, 1),
        Err(CpuidError::MissingLeaf(1))
    );
    assert_eq!(
        set_tsc_deadline_timer(&mut no_features, true),
        Err(CpuidError::MissingLeaf(1))
    );
}

#[test]
fn tsc_deadline_follows_kvm() {
    // filter_cpuid keeps the bit as KVM reported it, set or clear.
    let mut cpuid = intel_cpuid();
    filter_cpuid(&mut cpuid, 0, 1).unwrap();
    assert_ne!(get(&cpuid, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    let mut amd = amd_cpuid();
    filter_cpuid(&mut amd, 0, 1).unwrap();
    assert_eq!(get(&amd, 1, 0).ecx & ECX_TSC_DEADLINE, 0);

    set_tsc_deadline_timer(&mut cpuid, false).unwrap();
    assert_eq!(get(&cpuid, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    set_tsc_deadline_timer(&mut cpuid, true).unwrap();
    assert_ne!(get(&cpuid, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    set_tsc_deadline_timer(&mut cpuid, false).unwrap();
    assert_eq!(get(&cpuid, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
}

#[test]
fn kvm_accepts_the_filtered_cpuid() {
    let (kvm, _vm, vcpu) = kvm_vcpu();
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let mut cpuid = supported.clone();
    filter_cpuid(&mut cpuid, 0, 2).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let l1 = get(&cpuid, 1, 0);
    assert_eq!((l1.ebx >> 16) & 0xff, 2);
    assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
    assert_eq!(kvm_leaves_of(&cpuid), kvm_leaves_of(&supported));
    assert!(
        !kvm_leaves_of(&cpuid).is_empty(),
        "KVM reports its signature leaf"
    );
}
