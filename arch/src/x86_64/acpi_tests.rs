use super::*;
use crate::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::arch_memory_regions;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&arch_memory_regions(128 << 20)).unwrap()
}

fn u16_at(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    count(haystack, needle) > 0
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Reads the table at `addr` from guest memory and checks signature, length and checksum.
fn read_table(mem: &GuestMemoryMmap, addr: u64, signature: &[u8; 4]) -> Vec<u8> {
    let mut header = [0u8; 36];
    mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
    assert_eq!(&header[..4], signature, "signature at {addr:#x}");
    let length = u32_at(&header, 4) as usize;
    assert!(length >= 36);
    let mut table = vec![0u8; length];
    mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
    assert_eq!(
        sum(&table),
        0,
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    assert!(addr >= ACPI_TABLES_START && addr + length as u64 <= HIMEM_START);
    table
}

struct Written {
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
}

fn write_and_walk(config: AcpiConfig) -> Written {
    let mem = memory();
    let rsdp_addr = setup_acpi_tables(&mem, config).unwrap();
    assert_eq!(rsdp_addr, GuestAddress(ACPI_TABLES_START));

    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36);

    let xsdt = read_table(&mem, u64_at(&rsdp, 24), b"XSDT");
    assert_eq!(xsdt.len(), 36 + 16);
    let fadt = read_table(&mem, u64_at(&xsdt, 36), b"FACP");
    let madt = read_table(&mem, u64_at(&xsdt, 44), b"APIC");
    let dsdt = read_table(&mem, u64_at(&fadt, 140), b"DSDT");
    Written {
        xsdt,
        fadt,
        madt,
        dsdt,
    }
}

fn default_config(num_cpus: u8) -> AcpiConfig {
    AcpiConfig {
        num_cpus,
        ..Default::default()
    }
}

#[test]
fn tables_chain_from_the_rsdp() {
    let tables = write_and_walk(default_config(2));
    assert_eq!(tables.xsdt[8], 1, "XSDT revision");
    assert_eq!(&tables.fadt[10..16], &OEM_ID);
    assert_eq!(&tables.madt[16..24], &OEM_TABLE_ID);
}

#[test]
fn fadt_describes_a_hardware_reduced_machine() {
    let fadt = write_and_walk(default_config(1)).fadt;
    assert_eq!(fadt.len(), 276);
    let flags = u32_at(&fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    let boot_arch = u16_at(&fadt, 109);
    assert_ne!(boot_arch & IAPC_BOOT_ARCH_VGA_NOT_PRESENT, 0);
    assert_ne!(boot_arch & IAPC_BOOT_ARCH_8042, 0);
    assert_ne!(boot_arch & IAPC_BOOT_ARCH_LEGACY_DEVICES, 0);

    // Generic address structures: SystemIO, 8 bits, offset 0, byte access, port.
    let gas = |offset: usize| {
        (
            fadt[offset],
            fadt[offset + 1],
            fadt[offset + 2],
            fadt[offset + 3],
            u64_at(&fadt, offset + 4),
        )
    };
    let port = |offset: u16| u64::from(ACPI_PM_PORT + offset);
    assert_eq!(gas(116), (1, 8, 0, 1, port(ACPI_RESET_OFFSET)), "RESET_REG");
    assert_eq!(fadt[128], ACPI_RESET_VALUE);
    assert_eq!(gas(244), (1, 8, 0, 1, port(ACPI_SLEEP_CONTROL_OFFSET)));
    assert_eq!(gas(256), (1, 8, 0, 1, port(ACPI_SLEEP_STATUS_OFFSET)));
    assert_eq!(&fadt[268..276], b"KILNVMM\0");
    // Only the 64-bit DSDT pointer is used.
    assert_eq!(u32_at(&fadt, 40), 0);
}

#[test]
fn madt_lists_cpus_ioapic_and_overrides() {
    let madt = write_and_walk(default_config(4)).madt;
    assert_eq!(u32_at(&madt, 36), APIC_START as u32);
    assert_eq!(u32_at(&madt, 40), MADT_PCAT_COMPAT);

    let mut lapic_ids = Vec::new();
    let mut ioapics = Vec::new();
    let mut overrides = Vec::new();
    let mut nmis = Vec::new();
    let mut offset = 44;
    while offset < madt.len() {
        let (kind, len) = (madt[offset], usize::from(madt[offset + 1]));
        let entry = &madt[offset..offset + len];
        match kind {
            0 => {
                assert_eq!(len, 8);
                assert_eq!(u32_at(entry, 4), 1, "LAPIC enabled");
                lapic_ids.push(entry[3]);
            }
            1 => ioapics.push((entry[2], u32_at(entry, 4), u32_at(entry, 8))),
            2 => overrides.push((entry[2], entry[3], u32_at(entry, 4), u16_at(entry, 8))),
            4 => nmis.push((entry[2], u16_at(entry, 3), entry[5])),
            other => panic!("unexpected MADT entry type {other}"),
        }
        offset += len;
    }
    assert_eq!(offset, madt.len());
    assert_eq!(lapic_ids, vec![0, 1, 2, 3]);
    assert_eq!(ioapics, vec![(5, IOAPIC_START as u32, 0)]);
    assert_eq!(overrides, vec![(0, 0, 2, 0)], "ISA IRQ0 -> GSI 2");
    assert_eq!(nmis, vec![(0xff, 0, 1)], "NMI on LINT1 of all CPUs");
}

#[test]
fn dsdt_has_s5_pvpanic_and_com1() {
    let dsdt = write_and_walk(default_config(1)).dsdt;
    assert_eq!(dsdt[8], 2, "DSDT revision (64-bit AML integers)");
    // Name(_S5_, Package(4) {5, 5, 0, 0})
    let s5 = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0, 0,
    ];
    assert!(contains(&dsdt, &s5), "_S5_ package");
    assert!(contains(&dsdt, b"\\_SB_"));

    assert!(contains(&dsdt, b"PEVT"));
    assert!(contains(&dsdt, b"_HID\x0dQEMU0001\x00"));
    // IO(Decode16, 0x505, 0x505, 1, 1)
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0x05, 0x05, 0x05, 0x05, 0x01, 0x01]
    ));

    assert!(contains(&dsdt, b"COM1"));
    // EISAID("PNP0501") as a DWord.
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
    ));
    // Extended interrupt: consumer, edge, active high, exclusive, IRQ 4.
    assert!(contains(
        &dsdt,
        &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]
    ));

    assert!(!contains(&dsdt, b"LNRO0005"));

    // The keyboard controller: EISAID("PNP0303"), ports 0x60 and 0x64, IRQ 1; no mouse.
    assert!(contains(&dsdt, b"PS2_"));
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x03, 0x03]));
    for port in [0x60, 0x64] {
        assert!(contains(
            &dsdt,
            &[0x47, 0x01, port, 0x00, port, 0x00, 0x01, 0x01]
        ));
    }
    assert!(contains(
        &dsdt,
        &[0x89, 0x06, 0x00, 0x03, 0x01, 0x01, 0, 0, 0]
    ));
    assert!(!contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0f, 0x13]), "PNP0F13");
}

#[test]
fn dsdt_describes_virtio_mmio_devices() {
    let devices: Vec<(u64, u64, u32)> = (0..3)
        .map(|i| {
            (
                VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE,
                VIRTIO_MMIO_SIZE,
                5 + i as u32,
            )
        })
        .collect();
    let config = AcpiConfig {
        virtio_mmio: devices.clone(),
        ..default_config(2)
    };
    let dsdt = write_and_walk(config).dsdt;
    assert_eq!(count(&dsdt, b"LNRO0005"), 3);
    for (index, (base, size, irq)) in devices.into_iter().enumerate() {
        assert!(contains(&dsdt, format!("V{index:03X}").as_bytes()));
        let mut window = vec![0x86, 0x09, 0x00, 0x01];
        window.extend_from_slice(&(base as u32).to_le_bytes());
        window.extend_from_slice(&(size as u32).to_le_bytes());
        assert!(contains(&dsdt, &window), "Memory32Fixed of device {index}");
        let mut interrupt = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        interrupt.extend_from_slice(&irq.to_le_bytes());
        assert!(contains(&dsdt, &interrupt), "Interrupt of device {index}");
    }
}

#[test]
fn legacy_device_selection() {
    let config = AcpiConfig {
        legacy_devices: LegacyDevices {
            serial: false,
            i8042: false,
            pvpanic: false,
        },
        ..default_config(1)
    };
    let tables = write_and_walk(config);
    assert_eq!(u16_at(&tables.fadt, 109) & IAPC_BOOT_ARCH_8042, 0);
    assert!(!contains(&tables.dsdt, b"PS2_"));
    assert!(!contains(&tables.dsdt, b"COM1"));
    assert!(!contains(&tables.dsdt, b"QEMU0001"));
    // The _S5_ object does not depend on the devices.
    assert!(contains(&tables.dsdt, b"_S5_"));
}

#[test]
fn tables_are_aligned_and_disjoint() {
    let config = AcpiConfig {
        virtio_mmio: vec![(VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE, 5); MAX_VIRTIO_MMIO_DEVICES],
        ..default_config(MAX_SUPPORTED_CPUS)
    };
    let tables = build_acpi_tables(&config).unwrap();
    assert_eq!(tables[0].addr, GuestAddress(ACPI_TABLES_START));
    for pair in tables.windows(2) {
        let end = pair[0].addr.0 + pair[0].bytes.len() as u64;
        assert!(end <= pair[1].addr.0, "tables overlap");
        assert_eq!(pair[1].addr.0 % 16, 0);
    }
    let last = tables.last().unwrap();
    assert!(last.addr.0 + last.bytes.len() as u64 <= HIMEM_START);
}

#[test]
fn invalid_configs_are_rejected() {
    assert_eq!(
        build_acpi_tables(&default_config(0)),
        Err(AcpiError::CpuCount(0))
    );
    assert_eq!(
        build_acpi_tables(&default_config(255)),
        Err(AcpiError::CpuCount(255))
    );
    let with_device = |device| AcpiConfig {
        virtio_mmio: vec![device],
        ..default_config(1)
    };
    for device in [
        (VIRTIO_MMIO_START, 0, 5),
        (0xffff_f000, 0x2000, 5),
        (1 << 32, 0x1000, 5),
        (u64::MAX, 0x1000, 5),
        (VIRTIO_MMIO_START, 0x1000, 24),
    ] {
        assert!(
            matches!(
                build_acpi_tables(&with_device(device)),
                Err(AcpiError::InvalidVirtioDevice { .. })
            ),
            "{device:x?}"
        );
    }
    let too_many = AcpiConfig {
        virtio_mmio: vec![(VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE, 5); MAX_VIRTIO_MMIO_DEVICES + 1],
        ..default_config(1)
    };
    assert_eq!(
        build_acpi_tables(&too_many),
        Err(AcpiError::TooManyVirtioDevices(MAX_VIRTIO_MMIO_DEVICES + 1))
    );
    let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0xe_1000)]).unwrap();
    assert_eq!(
        setup_acpi_tables(&small, default_config(1)),
        Err(AcpiError::OutsideMemory)
    );
}
