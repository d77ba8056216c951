//! End-to-end check of the boot state: a few instructions run on a real vCPU set up by this
//! crate, in 64-bit mode, with RSI at the zero page and RSP on the boot stack.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::boot_params::{configure_boot_params, BootParamsConfig};
use super::layout::{BOOT_STACK_POINTER, CMDLINE_START, HIMEM_START, ZERO_PAGE_START};
use super::memory::arch_memory_regions;
use super::test_utils::kvm_vcpu;
use super::{acpi, cpuid, interrupts, mptable, msr, regs};
use crate::GuestMemoryMmap;

/// push rsi; mov eax, [rsi + 0x202]; mov dx, 0x3f8; out dx, eax; hlt
const GUEST_CODE: [u8; 14] = [
    0x56, 0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xef, 0xf4, 0xf4,
];

#[test]
fn vcpu_enters_64_bit_mode_with_the_zero_page_in_rsi() {
    let (kvm, vm, mut vcpu) = kvm_vcpu();
    let mem = GuestMemoryMmap::from_ranges(&arch_memory_regions(64 << 20)).unwrap();
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).unwrap();
        let memory_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`, which
        // outlives the VM in this test.
        unsafe { vm.set_user_memory_region(memory_region) }.unwrap();
    }

    mem.write_slice(b"console=ttyS0\0", GuestAddress(CMDLINE_START))
        .unwrap();
    mem.write_slice(&GUEST_CODE, GuestAddress(HIMEM_START))
        .unwrap();
    mptable::setup_mptable(&mem, 1).unwrap();
    let rsdp = acpi::setup_acpi_tables(
        &mem,
        acpi::AcpiConfig {
            num_cpus: 1,
            ..Default::default()
        },
    )
    .unwrap();
    configure_boot_params(
        &mem,
        BootParamsConfig {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 14,
            rsdp_addr: Some(rsdp),
            ..Default::default()
        },
    )
    .unwrap();

    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    cpuid::filter_cpuid(&mut cpuid, 0, 1).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    msr::setup_msrs(&vcpu).unwrap();
    regs::setup_regs(&vcpu, GuestAddress(HIMEM_START)).unwrap();
    regs::setup_sregs(&mem, &vcpu).unwrap();
    regs::setup_fpu(&vcpu).unwrap();
    interrupts::set_lint(&vcpu).unwrap();

    match vcpu.run().unwrap() {
        VcpuExit::IoOut(port, data) => {
            assert_eq!(port, 0x3f8);
            assert_eq!(
                data, b"HdrS",
                "the guest read boot_params.hdr.header via RSI"
            );
        }
        other => panic!("unexpected exit {other:?}"),
    }
    // A 64-bit push of RSI landed just below the boot stack pointer.
    let pushed: u64 = mem.read_obj(GuestAddress(BOOT_STACK_POINTER - 8)).unwrap();
    assert_eq!(pushed, ZERO_PAGE_START);
    assert_eq!(vcpu.get_regs().unwrap().rsp, BOOT_STACK_POINTER - 8);
}
