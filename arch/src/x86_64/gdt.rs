//! The boot GDT and conversions from its descriptors to `kvm_segment`s.
//!
//! A 64-bit kernel entered directly only needs a flat 64-bit code segment, a flat data segment
//! and a TSS descriptor for TR; Linux loads its own GDT early in `startup_64`.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{BOOT_GDT_START, BOOT_IDT_START};
use crate::GuestMemoryMmap;

/// Access/flags of a 64-bit code segment: present, DPL 0, execute/read, accessed; L=1, G=1.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags of a flat data segment: present, DPL 0, read/write, accessed; D/B=1, G=1.
pub const DATA_FLAGS: u16 = 0xc093;
/// Access/flags of a busy 64-bit TSS: present, type 0xb; G=1.
pub const TSS_FLAGS: u16 = 0x808b;

/// Index of the code segment in [`BOOT_GDT`].
pub const CODE_INDEX: u8 = 1;
/// Index of the data segment in [`BOOT_GDT`].
pub const DATA_INDEX: u8 = 2;
/// Index of the TSS descriptor in [`BOOT_GDT`].
pub const TSS_INDEX: u8 = 3;

/// Encodes a segment descriptor from its access/flags word, base and 20-bit limit.
///
/// `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL nibble in bits 12..16, the
/// way they sit in bits 40..56 of the descriptor.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The boot GDT: null, 64-bit code, data, TSS (Firecracker's layout).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(CODE64_FLAGS, 0, 0xfffff),
    gdt_entry(DATA_FLAGS, 0, 0xfffff),
    gdt_entry(TSS_FLAGS, 0, 0xfffff),
];

/// GDTR limit for [`BOOT_GDT`].
pub const BOOT_GDT_LIMIT: u16 = (BOOT_GDT.len() * 8 - 1) as u16;
/// IDTR limit of the empty boot IDT (one zero descriptor slot).
pub const BOOT_IDT_LIMIT: u16 = 7;

fn bits(entry: u64, shift: u32, width: u32) -> u8 {
    ((entry >> shift) & ((1 << width) - 1)) as u8
}

/// Base address encoded in a descriptor.
pub fn descriptor_base(entry: u64) -> u64 {
    ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff)
}

/// Limit of a descriptor in bytes (scaled by 4 KiB when the G bit is set).
pub fn descriptor_limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    if bits(entry, 55, 1) == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The `kvm_segment` for descriptor `entry` at GDT index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bits(entry, 47, 1);
    kvm_segment {
        base: descriptor_base(entry),
        limit: descriptor_limit(entry),
        selector: u16::from(index) * 8,
        type_: bits(entry, 40, 4),
        s: bits(entry, 44, 1),
        dpl: bits(entry, 45, 2),
        present,
        avl: bits(entry, 52, 1),
        l: bits(entry, 53, 1),
        db: bits(entry, 54, 1),
        g: bits(entry, 55, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes [`BOOT_GDT`] at [`BOOT_GDT_START`] and an empty IDT at [`BOOT_IDT_START`].
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap) -> Result<(), GuestMemoryError> {
    for (index, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * index as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_gdt_encodings() {
        assert_eq!(BOOT_GDT[0], 0);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x008f_8b00_0000_ffff);
        assert_eq!(BOOT_GDT_LIMIT, 31);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let entry = gdt_entry(0x409b, 0x1234_5678, 0xabcde);
        assert_eq!(descriptor_base(entry), 0x1234_5678);
        // G is clear in 0x409b: the limit is in bytes.
        assert_eq!(descriptor_limit(entry), 0xabcde);
        let paged = gdt_entry(0xc093, 0, 0xfffff);
        assert_eq!(descriptor_limit(paged), 0xffff_ffff);
    }

    #[test]
    fn code_segment_is_64_bit() {
        let cs = segment_from_gdt(BOOT_GDT[CODE_INDEX as usize], CODE_INDEX);
        assert_eq!(cs.selector, 0x8);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(
            (cs.s, cs.dpl, cs.present, cs.l, cs.db, cs.g),
            (1, 0, 1, 1, 0, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.unusable), (0, 0xffff_ffff, 0));
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = segment_from_gdt(BOOT_GDT[DATA_INDEX as usize], DATA_INDEX);
        assert_eq!(ds.selector, 0x10);
        assert_eq!(ds.type_, 0x3);
        assert_eq!((ds.s, ds.present, ds.l, ds.db, ds.g), (1, 1, 0, 1, 1));

        let tss = segment_from_gdt(BOOT_GDT[TSS_INDEX as usize], TSS_INDEX);
        assert_eq!(tss.selector, 0x18);
        assert_eq!(tss.type_, 0xb);
        assert_eq!((tss.s, tss.present, tss.g), (0, 1, 1));

        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn tables_are_written_to_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_obj(0xffff_ffff_ffff_ffffu64, GuestAddress(BOOT_IDT_START))
            .unwrap();
        write_gdt_and_idt(&mem).unwrap();
        for (index, expected) in BOOT_GDT.iter().enumerate() {
            let entry: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * index as u64))
                .unwrap();
            assert_eq!(entry, *expected);
        }
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }
}
