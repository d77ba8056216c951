//! Local APIC setup: the LINT0/LINT1 pins wired as on a PC (virtual wire mode).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the LAPIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the LAPIC register page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode: external interrupt (the 8259 PIC).
pub const APIC_MODE_EXTINT: u32 = 0x7;

const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_MODE_MASK: u32 = 0x7 << DELIVERY_MODE_SHIFT;

/// Errors while setting up the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum InterruptsError {
    /// `KVM_GET_LAPIC` failed.
    #[error("KVM_GET_LAPIC failed: {0}")]
    GetLapic(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed: {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
    /// A register offset outside the LAPIC page or not 4-byte aligned.
    #[error("invalid LAPIC register offset {0:#x}")]
    BadRegister(usize),
}

fn register_bytes(offset: usize) -> Result<std::ops::Range<usize>, InterruptsError> {
    let len = std::mem::size_of::<kvm_lapic_state>();
    match offset.checked_add(4) {
        Some(end) if end <= len && offset & 3 == 0 => Ok(offset..end),
        _ => Err(InterruptsError::BadRegister(offset)),
    }
}

/// Reads the 32-bit LAPIC register at `offset` from a `KVM_GET_LAPIC` snapshot.
pub fn lapic_register(lapic: &kvm_lapic_state, offset: usize) -> Result<u32, InterruptsError> {
    let mut bytes = [0u8; 4];
    for (byte, reg) in bytes.iter_mut().zip(&lapic.regs[register_bytes(offset)?]) {
        *byte = *reg as u8;
    }
    Ok(u32::from_le_bytes(bytes))
}

/// Writes the 32-bit LAPIC register at `offset` in a `KVM_SET_LAPIC` snapshot.
pub fn set_lapic_register(
    lapic: &mut kvm_lapic_state,
    offset: usize,
    value: u32,
) -> Result<(), InterruptsError> {
    let range = register_bytes(offset)?;
    for (reg, byte) in lapic.regs[range].iter_mut().zip(value.to_le_bytes()) {
        *reg = byte as libc::c_char;
    }
    Ok(())
}

/// Replaces the delivery mode bits (10:8) of an LVT register value.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !DELIVERY_MODE_MASK) | ((mode << DELIVERY_MODE_SHIFT) & DELIVERY_MODE_MASK)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI in `lapic`, keeping the other LVT bits.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) -> Result<(), InterruptsError> {
    let lvt0 = lapic_register(lapic, APIC_LVT0)?;
    set_lapic_register(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT))?;
    let lvt1 = lapic_register(lapic, APIC_LVT1)?;
    set_lapic_register(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI))
}

/// Configures `vcpu`'s LAPIC LINT0 as ExtINT and LINT1 as NMI. Needs the in-kernel irqchip.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), InterruptsError> {
    let mut lapic = vcpu.get_lapic().map_err(InterruptsError::GetLapic)?;
    set_lint_modes(&mut lapic)?;
    vcpu.set_lapic(&lapic).map_err(InterruptsError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::test_utils::kvm_vcpu;

    #[test]
    fn register_access_round_trips() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_register(&mut lapic, 0x3fc, 0x8123_4567).unwrap();
        assert_eq!(lapic_register(&lapic, 0x3fc).unwrap(), 0x8123_4567);
        assert_eq!(lapic.regs[0x3fc] as u8, 0x67);
        assert_eq!(lapic.regs[0x3ff] as u8, 0x81);
        assert!(matches!(
            lapic_register(&lapic, 0x400),
            Err(InterruptsError::BadRegister(0x400))
        ));
        assert!(lapic_register(&lapic, 0x351).is_err());
        assert!(set_lapic_register(&mut lapic, usize::MAX - 1, 0).is_err());
        assert!(set_lapic_register(&mut lapic, usize::MAX - 3, 0).is_err());
    }

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, level-triggered, vector 0x31 in LINT0; masked in LINT1.
        set_lapic_register(&mut lapic, APIC_LVT0, 0x0001_8031).unwrap();
        set_lapic_register(&mut lapic, APIC_LVT1, 0x0001_0700).unwrap();
        set_lint_modes(&mut lapic).unwrap();
        assert_eq!(lapic_register(&lapic, APIC_LVT0).unwrap(), 0x0001_8731);
        assert_eq!(lapic_register(&lapic, APIC_LVT1).unwrap(), 0x0001_0400);
        assert_eq!(with_delivery_mode(0xffff_ffff, 0), 0xffff_f8ff);
    }

    #[test]
    fn kvm_lapic_gets_the_lint_modes() {
        let (_kvm, _vm, vcpu) = kvm_vcpu();
        set_lint(&vcpu).unwrap();
        let lapic = vcpu.get_lapic().unwrap();
        let lvt0 = lapic_register(&lapic, APIC_LVT0).unwrap();
        let lvt1 = lapic_register(&lapic, APIC_LVT1).unwrap();
        assert_eq!((lvt0 >> 8) & 0x7, APIC_MODE_EXTINT);
        assert_eq!((lvt1 >> 8) & 0x7, APIC_MODE_NMI);
    }
}
