//! Intel MultiProcessor Specification 1.4 table: how kernels without ACPI find the CPUs,
//! the IOAPIC and the legacy interrupt wiring.
//!
//! The floating pointer sits at [`EBDA_START`] (Linux scans the last KiB of base memory for
//! it) and the configuration table follows it directly. Everything lies in the e820-reserved
//! window below [`ACPI_TABLES_START`].

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError};

use super::layout::{ACPI_TABLES_START, APIC_START, EBDA_START, IOAPIC_START};
use super::memory::range_in_memory;
use crate::GuestMemoryMmap;

/// Most vCPUs the MP table (and the 8-bit xAPIC id space) can describe.
pub const MAX_SUPPORTED_CPUS: u8 = 254;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u8 = 24;
/// Local APIC version reported for every CPU.
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC reports 0x11).
pub const IOAPIC_VERSION: u8 = 0x11;
/// MP spec revision 1.4.
pub const MP_SPEC_REVISION: u8 = 4;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const IOAPIC_ENABLED: u8 = 1;
const INTERRUPT_INT: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus".
const INTERRUPT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
/// CPU signature: family 6.
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ALL_LOCAL_APICS: u8 = 0xff;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The vCPU count is 0 or above [`MAX_SUPPORTED_CPUS`].
    #[error("the MP table supports 1..={MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// The table would not fit between `EBDA_START` and the ACPI tables.
    #[error("MP table of {0} bytes does not fit below the ACPI tables")]
    TooLarge(usize),
    /// The table's range is not in guest RAM.
    #[error("guest memory does not cover the MP table at {EBDA_START:#x}")]
    OutsideMemory,
    /// Writing the table failed.
    #[error("cannot write the MP table: {0}")]
    Write(#[source] GuestMemoryError),
}

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct FloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    length_paragraphs: u8,
    spec_revision: u8,
    checksum: u8,
    features: [u8; 5],
}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ConfigTableHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_revision: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_address: u32,
    extended_table_length: u16,
    extended_table_checksum: u8,
    reserved: u8,
}

/// Processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct ProcessorEntry {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    cpu_flags: u8,
    cpu_signature: u32,
    feature_flags: u32,
    reserved: [u32; 2],
}

/// Bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct BusEntry {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct IoApicEntry {
    entry_type: u8,
    apic_id: u8,
    apic_version: u8,
    flags: u8,
    address: u32,
}

/// I/O interrupt assignment or local interrupt assignment entry (same layout).
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct InterruptEntry {
    entry_type: u8,
    interrupt_type: u8,
    flags: u16,
    source_bus_id: u8,
    source_bus_irq: u8,
    destination_apic_id: u8,
    destination_pin: u8,
}

// SAFETY: all of these are packed structs of plain integers: no padding, every bit pattern valid.
unsafe impl ByteValued for FloatingPointer {}
// SAFETY: as above.
unsafe impl ByteValued for ConfigTableHeader {}
// SAFETY: as above.
unsafe impl ByteValued for ProcessorEntry {}
// SAFETY: as above.
unsafe impl ByteValued for BusEntry {}
// SAFETY: as above.
unsafe impl ByteValued for IoApicEntry {}
// SAFETY: as above.
unsafe impl ByteValued for InterruptEntry {}

/// Value that makes the bytes of `data` sum to zero (mod 256) when added.
fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// IOAPIC id used in the MP table and the MADT: the first id after the CPUs'.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus.saturating_add(1)
}

/// Size in bytes of the floating pointer plus configuration table for `num_cpus`.
pub fn mptable_size(num_cpus: u8) -> usize {
    std::mem::size_of::<FloatingPointer>()
        + std::mem::size_of::<ConfigTableHeader>()
        + usize::from(num_cpus) * std::mem::size_of::<ProcessorEntry>()
        + std::mem::size_of::<BusEntry>()
        + std::mem::size_of::<IoApicEntry>()
        + (usize::from(IOAPIC_PINS) + 2) * std::mem::size_of::<InterruptEntry>()
}

/// The MP table bytes for `num_cpus`, to be placed at [`EBDA_START`].
pub fn build_mptable(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(MptableError::CpuCount(num_cpus));
    }
    let size = mptable_size(num_cpus);
    if EBDA_START + size as u64 > ACPI_TABLES_START {
        return Err(MptableError::TooLarge(size));
    }
    let ioapic = ioapic_id(num_cpus);

    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        entry_count += 1;
    };
    for cpu in 0..num_cpus {
        let bootstrap = if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        let processor = ProcessorEntry {
            entry_type: ENTRY_PROCESSOR,
            apic_id: cpu,
            apic_version: LAPIC_VERSION,
            cpu_flags: CPU_ENABLED | bootstrap,
            cpu_signature: CPU_SIGNATURE,
            feature_flags: CPU_FEATURES,
            reserved: [0; 2],
        };
        push(processor.as_slice());
    }
    let bus = BusEntry {
        entry_type: ENTRY_BUS,
        bus_id: ISA_BUS_ID,
        bus_type: *b"ISA   ",
    };
    push(bus.as_slice());
    let ioapic_entry = IoApicEntry {
        entry_type: ENTRY_IOAPIC,
        apic_id: ioapic,
        apic_version: IOAPIC_VERSION,
        flags: IOAPIC_ENABLED,
        address: IOAPIC_START as u32,
    };
    push(ioapic_entry.as_slice());
    for irq in 0..IOAPIC_PINS {
        let interrupt = InterruptEntry {
            entry_type: ENTRY_IO_INTERRUPT,
            interrupt_type: INTERRUPT_INT,
            flags: INTERRUPT_FLAGS_CONFORM,
            source_bus_id: ISA_BUS_ID,
            source_bus_irq: irq,
            destination_apic_id: ioapic,
            destination_pin: irq,
        };
        push(interrupt.as_slice());
    }
    for (interrupt_type, destination_apic_id, destination_pin) in [
        (INTERRUPT_EXTINT, 0, 0),
        (INTERRUPT_NMI, ALL_LOCAL_APICS, 1),
    ] {
        let local = InterruptEntry {
            entry_type: ENTRY_LOCAL_INTERRUPT,
            interrupt_type,
            flags: INTERRUPT_FLAGS_CONFORM,
            source_bus_id: ISA_BUS_ID,
            source_bus_irq: 0,
            destination_apic_id,
            destination_pin,
        };
        push(local.as_slice());
    }

    let header_size = std::mem::size_of::<ConfigTableHeader>();
    let mut header = ConfigTableHeader {
        signature: *b"PCMP",
        // Bounded by the size check above (< 256 KiB).
        base_table_length: (header_size + entries.len()) as u16,
        spec_revision: MP_SPEC_REVISION,
        oem_id: *b"KILN    ",
        product_id: *b"KILNVMM     ",
        entry_count,
        lapic_address: APIC_START as u32,
        ..Default::default()
    };
    let mut sum_input = header.as_slice().to_vec();
    sum_input.extend_from_slice(&entries);
    header.checksum = checksum(&sum_input);

    let fp_size = std::mem::size_of::<FloatingPointer>();
    let mut floating = FloatingPointer {
        signature: *b"_MP_",
        config_table: (EBDA_START + fp_size as u64) as u32,
        length_paragraphs: 1,
        spec_revision: MP_SPEC_REVISION,
        ..Default::default()
    };
    floating.checksum = checksum(floating.as_slice());

    let mut table = floating.as_slice().to_vec();
    table.extend_from_slice(header.as_slice());
    table.extend_from_slice(&entries);
    debug_assert_eq!(table.len(), size);
    Ok(table)
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let table = build_mptable(num_cpus)?;
    if !range_in_memory(mem, GuestAddress(EBDA_START), table.len()) {
        return Err(MptableError::OutsideMemory);
    }
    mem.write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes([bytes[offset], bytes[offset + 1]])
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    /// Walks the configuration table and counts entries by type.
    fn entry_types(config: &[u8]) -> [usize; 5] {
        let mut counts = [0; 5];
        let mut offset = 44;
        while offset < config.len() {
            let kind = usize::from(config[offset]);
            counts[kind] += 1;
            offset += if kind == 0 { 20 } else { 8 };
        }
        assert_eq!(offset, config.len());
        counts
    }

    fn check_table(num_cpus: u8) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        setup_mptable(&mem, num_cpus).unwrap();
        let mut table = vec![0u8; mptable_size(num_cpus)];
        mem.read_slice(&mut table, GuestAddress(EBDA_START))
            .unwrap();

        let floating = &table[..16];
        assert_eq!(&floating[..4], b"_MP_");
        assert_eq!(sum(floating), 0, "floating pointer checksum");
        assert_eq!((floating[8], floating[9]), (1, 4));
        let config_addr = u32_at(floating, 4) as u64;
        assert_eq!(config_addr, EBDA_START + 16);

        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        assert_eq!(usize::from(u16_at(config, 4)), config.len());
        assert_eq!(sum(config), 0, "configuration table checksum");
        assert_eq!(config[6], 4);
        assert_eq!(u32_at(config, 36), APIC_START as u32);
        assert_eq!(usize::from(u16_at(config, 34)), usize::from(num_cpus) + 28);
        assert_eq!(entry_types(config), [usize::from(num_cpus), 1, 1, 24, 2]);

        for cpu in 0..usize::from(num_cpus) {
            let entry = &config[44 + 20 * cpu..];
            assert_eq!(entry[1] as usize, cpu, "APIC id");
            assert_eq!(entry[2], LAPIC_VERSION);
            let expected_flags = if cpu == 0 { 3 } else { 1 };
            assert_eq!(entry[3], expected_flags, "cpu flags of cpu {cpu}");
        }
        let ioapic = &config[44 + 20 * usize::from(num_cpus) + 8..];
        assert_eq!(ioapic[0], 2);
        assert_eq!(ioapic[1], num_cpus + 1);
        assert_eq!(u32_at(ioapic, 4), IOAPIC_START as u32);
        let irq5 = &ioapic[8 + 5 * 8..];
        assert_eq!(
            (irq5[0], irq5[5], irq5[6], irq5[7]),
            (3, 5, num_cpus + 1, 5)
        );
    }

    #[test]
    fn one_cpu() {
        check_table(1);
    }

    #[test]
    fn four_cpus() {
        check_table(4);
    }

    #[test]
    fn max_cpus_fit_below_the_acpi_tables() {
        check_table(MAX_SUPPORTED_CPUS);
        assert!(EBDA_START + mptable_size(MAX_SUPPORTED_CPUS) as u64 <= ACPI_TABLES_START);
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(matches!(build_mptable(0), Err(MptableError::CpuCount(0))));
        assert!(matches!(
            build_mptable(255),
            Err(MptableError::CpuCount(255))
        ));
    }

    #[test]
    fn needs_guest_memory_for_the_table() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 1),
            Err(MptableError::OutsideMemory)
        ));
    }
}
