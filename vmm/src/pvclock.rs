//! The guest's own view of kvmclock: its pvclock structure (`pvclock_vcpu_time_info`, the
//! page `MSR_KVM_SYSTEM_TIME_NEW` points at) applied to a TSC value.
//!
//! A pause keeps the guest's time as one kvmclock value and one TSC value per vCPU, which a
//! resume or a restore sets back. They must be the same instant as the guest sees it: Linux's
//! clocksource watchdog compares the two clocks over each half second and marks the TSC unstable
//! when they disagree by more than about half a millisecond. `KVM_GET_CLOCK` and the TSC MSR
//! cannot be read at one instant (and where KVM stops a vCPU's TSC while the vCPU is not loaded,
//! as it does when the host's TSC is unstable, the TSC read stands still at the vCPU's exit
//! while kvmclock goes on), so the kvmclock value is derived from the TSC value instead, with
//! the guest's own formula.

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// `MSR_KVM_SYSTEM_TIME_NEW`: the guest physical address of its pvclock structure, bit 0 = on.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

/// Size of `pvclock_vcpu_time_info`.
const PVCLOCK_SIZE: usize = 32;

/// kvmclock in nanoseconds as the guest reads it at guest TSC `tsc`, from the pvclock
/// structure `system_time_msr` names; None when the guest has not enabled kvmclock, the
/// structure is not in guest memory or is being updated (odd version).
pub fn guest_kvmclock_at(memory: &GuestMemory, system_time_msr: u64, tsc: u64) -> Option<u64> {
    if system_time_msr & 1 == 0 {
        return None;
    }
    let mut raw = [0u8; PVCLOCK_SIZE];
    memory
        .read_slice(&mut raw, GuestAddress(system_time_msr & !1))
        .ok()?;
    kvmclock_from_pvclock(&raw, tsc)
}

/// The pvclock formula: `system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32`.
fn kvmclock_from_pvclock(raw: &[u8; PVCLOCK_SIZE], tsc: u64) -> Option<u64> {
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
    let version = u32_at(0);
    if version & 1 == 1 {
        return None;
    }
    let tsc_timestamp = u64_at(8);
    let system_time = u64_at(16);
    let mul = u32_at(24);
    let shift = raw[28] as i8;
    let mut delta = tsc.wrapping_sub(tsc_timestamp);
    if shift < 0 {
        delta = delta
            .checked_shr(u32::from(shift.unsigned_abs()))
            .unwrap_or(0);
    } else {
        delta = delta
            .checked_shl(u32::from(shift.unsigned_abs()))
            .unwrap_or(0);
    }
    let scaled = ((u128::from(delta) * u128::from(mul)) >> 32) as u64;
    Some(system_time.wrapping_add(scaled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pvclock(
        version: u32,
        tsc_timestamp: u64,
        system_time: u64,
        mul: u32,
        shift: i8,
    ) -> [u8; 32] {
        let mut raw = [0u8; 32];
        raw[0..4].copy_from_slice(&version.to_le_bytes());
        raw[8..16].copy_from_slice(&tsc_timestamp.to_le_bytes());
        raw[16..24].copy_from_slice(&system_time.to_le_bytes());
        raw[24..28].copy_from_slice(&mul.to_le_bytes());
        raw[28] = shift as u8;
        raw
    }

    #[test]
    fn a_2_ghz_tsc_advances_kvmclock_half_a_nanosecond_per_tick() {
        // 2 GHz: 0.5 ns per tick = mul 2^31, shift 0.
        let raw = pvclock(2, 1_000, 5_000_000_000, 1 << 31, 0);
        assert_eq!(kvmclock_from_pvclock(&raw, 1_000), Some(5_000_000_000));
        assert_eq!(
            kvmclock_from_pvclock(&raw, 1_000 + 2_000_000_000),
            Some(6_000_000_000)
        );
    }

    #[test]
    fn the_shift_applies_before_the_multiplier() {
        // 500 MHz: 2 ns per tick = (delta << 1) * 2^31 >> 32... shift 2 with mul 2^31 = 2 ns.
        let raw = pvclock(4, 0, 0, 1 << 31, 2);
        assert_eq!(kvmclock_from_pvclock(&raw, 500), Some(1_000));
        let raw = pvclock(4, 0, 0, 1 << 31, -1);
        assert_eq!(kvmclock_from_pvclock(&raw, 1_000), Some(250));
    }

    #[test]
    fn an_update_in_progress_or_a_disabled_clock_gives_nothing() {
        let raw = pvclock(3, 0, 0, 1 << 31, 0);
        assert_eq!(kvmclock_from_pvclock(&raw, 10), None);
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert_eq!(guest_kvmclock_at(&memory, 0x1000, 10), None);
        // Outside guest memory.
        assert_eq!(guest_kvmclock_at(&memory, 0x10_0001, 10), None);
    }

    #[test]
    fn the_structure_is_read_from_guest_memory() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        memory
            .write_slice(&pvclock(2, 100, 7_000, 1 << 31, 0), GuestAddress(0x2000))
            .unwrap();
        assert_eq!(guest_kvmclock_at(&memory, 0x2001, 300), Some(7_100));
    }

    #[test]
    fn garbage_from_the_guest_does_not_panic() {
        let raw = pvclock(0, u64::MAX, u64::MAX, u32::MAX, 127);
        assert!(kvmclock_from_pvclock(&raw, 0).is_some());
        let raw = pvclock(0, 0, u64::MAX, u32::MAX, -128);
        assert!(kvmclock_from_pvclock(&raw, u64::MAX).is_some());
    }
}
