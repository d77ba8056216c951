//! General purpose, segment/control and FPU registers of a vCPU at 64-bit kernel entry.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestAddress, GuestMemoryError};

use super::gdt::{
    segment_from_gdt, write_gdt_and_idt, BOOT_GDT, BOOT_GDT_LIMIT, BOOT_IDT_LIMIT, CODE_INDEX,
    DATA_INDEX, TSS_INDEX,
};
use super::layout::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, ZERO_PAGE_START};
use super::paging::setup_identity_page_tables;
use crate::GuestMemoryMmap;

/// CR0: protected mode enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: not write-through.
pub const X86_CR0_NW: u64 = 1 << 29;
/// CR0: cache disable.
pub const X86_CR0_CD: u64 = 1 << 30;
/// CR0: paging enable.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension, required for long mode.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS at entry: only the always-one bit 1 (interrupts off).
pub const BOOT_RFLAGS: u64 = 0x2;
/// x87 control word after FNINIT: all exceptions masked, 64-bit precision.
pub const BOOT_FCW: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked.
pub const BOOT_MXCSR: u32 = 0x1f80;

/// Errors while setting up vCPU registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables to guest memory failed.
    #[error("cannot write the boot GDT/IDT/page tables: {0}")]
    WriteBootTables(#[source] GuestMemoryError),
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
}

/// Writes everything the boot sregs point at (GDT, empty IDT, identity page tables) and
/// returns the CR3 value.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<u64, RegsError> {
    write_gdt_and_idt(mem).map_err(RegsError::WriteBootTables)?;
    setup_identity_page_tables(mem).map_err(RegsError::WriteBootTables)
}

/// The special registers for 64-bit entry, starting from the vCPU's current `defaults`.
///
/// Flat segments from the boot GDT, GDTR/IDTR at the boot tables, paging with the given `cr3`,
/// PAE and long mode on, caches enabled.
pub fn boot_sregs(defaults: &kvm_sregs, cr3: u64) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(BOOT_GDT[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = segment_from_gdt(BOOT_GDT[usize::from(TSS_INDEX)], TSS_INDEX);

    let mut sregs = *defaults;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = BOOT_GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = BOOT_IDT_LIMIT;
    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Writes the boot tables to guest memory and loads the 64-bit entry sregs into `vcpu`.
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<(), RegsError> {
    let cr3 = write_boot_tables(mem)?;
    let defaults = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    vcpu.set_sregs(&boot_sregs(&defaults, cr3))
        .map_err(RegsError::SetSregs)
}

/// General purpose registers for entering the kernel at `entry`.
///
/// RSI points at the zero page, as the 64-bit boot protocol requires.
pub fn boot_regs(entry: GuestAddress) -> kvm_regs {
    kvm_regs {
        rflags: BOOT_RFLAGS,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Loads [`boot_regs`] into `vcpu`.
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<(), RegsError> {
    vcpu.set_regs(&boot_regs(entry)).map_err(RegsError::SetRegs)
}

/// FPU state at entry: the x87 and SSE control words as after a reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: BOOT_FCW,
        mxcsr: BOOT_MXCSR,
        ..Default::default()
    }
}

/// Loads [`boot_fpu`] into `vcpu`.
///
/// KVM_SET_FPU does not transfer MXCSR; a new vCPU's MXCSR already holds the reset value 0x1f80.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    vcpu.set_fpu(&boot_fpu()).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::PML4_START;
    use crate::x86_64::test_utils::kvm_vcpu;
    use vm_memory::Bytes;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn sregs_enter_long_mode() {
        let defaults = kvm_sregs {
            cr0: 0x6000_0010,
            cr4: 0x40,
            ..Default::default()
        };
        let sregs = boot_sregs(&defaults, PML4_START);
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr4, 0x40 | X86_CR4_PAE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (BOOT_GDT_START, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x8, 1, 0));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!((seg.selector, seg.type_, seg.present), (0x10, 3, 1));
        }
        assert_eq!((sregs.tr.selector, sregs.tr.type_), (0x18, 0xb));
    }

    #[test]
    fn regs_and_fpu_values() {
        let regs = boot_regs(GuestAddress(0x100_0000));
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!((regs.rax, regs.rdi), (0, 0));
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn boot_tables_land_in_memory() {
        let mem = memory();
        assert_eq!(write_boot_tables(&mem).unwrap(), PML4_START);
        let gdt_code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt_code, BOOT_GDT[1]);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & 1, 1);
    }

    #[test]
    fn kvm_accepts_the_boot_registers() {
        let (_kvm, _vm, vcpu) = kvm_vcpu();
        let mut fpu = vcpu.get_fpu().unwrap();
        fpu.fcw = 0x40;
        vcpu.set_fpu(&fpu).unwrap();
        let mem = memory();
        setup_sregs(&mem, &vcpu).unwrap();
        setup_regs(&vcpu, GuestAddress(0x100_0000)).unwrap();
        setup_fpu(&vcpu).unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.selector, sregs.cs.l), (0x8, 1));
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, ZERO_PAGE_START));
        assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
        // MXCSR is only visible through the XSAVE area (legacy region, dword 6).
        assert_eq!(vcpu.get_xsave().unwrap().region[6], 0x1f80);
    }
}
