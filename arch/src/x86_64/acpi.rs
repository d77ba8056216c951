//! ACPI tables for a hardware-reduced Kiln machine: RSDP, XSDT, FADT, MADT and DSDT.
//!
//! The tables are laid out from [`ACPI_TABLES_START`] (RSDP first, where Linux's legacy scan
//! also finds it) in the e820-reserved window below [`HIMEM_START`]. The FADT declares a
//! hardware-reduced platform whose sleep and reset registers are the ACPI PM device's ports,
//! the MADT lists the LAPICs and the IOAPIC, and the DSDT describes the devices Linux should
//! bind through ACPI (COM1, pvpanic, virtio-mmio).

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use super::layout::{
    ACPI_PM_PORT, ACPI_RESET_OFFSET, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE,
    ACPI_SLEEP_CONTROL_OFFSET, ACPI_SLEEP_STATUS_OFFSET, ACPI_TABLES_START, APIC_START,
    HIMEM_START, I8042_PORT_BASE, IOAPIC_START, PVPANIC_PORT, SERIAL_IRQ, SERIAL_PORT_BASE,
};
use super::memory::range_in_memory;
use super::mptable::{ioapic_id, IOAPIC_PINS, MAX_SUPPORTED_CPUS};
use crate::GuestMemoryMmap;

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"KILN  ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"KILNVMM ";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
pub const HYPERVISOR_VENDOR: [u8; 8] = *b"KILNVMM\0";
/// Most virtio-mmio devices the DSDT can name (`V000`..`V0FF`).
pub const MAX_VIRTIO_MMIO_DEVICES: usize = 256;

/// IAPC_BOOT_ARCH: the platform has user-visible ISA/LPC devices (COM1, i8042).
pub const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IAPC_BOOT_ARCH: an 8042 keyboard controller is present.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH: do not probe for VGA.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: there is no CMOS RTC.
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel irqchip does).
pub const MADT_PCAT_COMPAT: u32 = 1;

/// Alignment of each table.
const TABLE_ALIGNMENT: u64 = 16;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// MADT revision of ACPI 6.x.
const MADT_REVISION: u8 = 5;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags "conforms to the bus" for polarity and trigger mode.
const MPS_INTI_CONFORM: u16 = 0;
const ALL_PROCESSORS: u8 = 0xff;

/// Errors while building or writing the ACPI tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    /// The vCPU count is 0 or above [`MAX_SUPPORTED_CPUS`].
    #[error("ACPI tables support 1..={MAX_SUPPORTED_CPUS} vCPUs, not {0}")]
    CpuCount(u8),
    /// More virtio-mmio devices than the DSDT can name.
    #[error("{0} virtio-mmio devices, at most {MAX_VIRTIO_MMIO_DEVICES} are supported")]
    TooManyVirtioDevices(usize),
    /// A virtio-mmio window that `Memory32Fixed` cannot describe, or an IRQ without a pin.
    #[error("virtio-mmio device at {base:#x} (size {size:#x}, IRQ {irq}) is invalid: {reason}")]
    InvalidVirtioDevice {
        /// Window base.
        base: u64,
        /// Window size.
        size: u64,
        /// IRQ (IOAPIC pin).
        irq: u32,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The tables would run past `HIMEM_START`.
    #[error("ACPI tables end at {0:#x}, past the reserved window ending at {HIMEM_START:#x}")]
    TooLarge(u64),
    /// The table window is not in guest RAM.
    #[error("guest memory does not cover the ACPI tables at {ACPI_TABLES_START:#x}")]
    OutsideMemory,
    /// Writing a table failed.
    #[error("cannot write ACPI table at {addr:#x}: {reason}")]
    Write {
        /// Guest address of the table.
        addr: u64,
        /// The guest memory error, as text (keeps this error comparable).
        reason: String,
    },
}

/// Which legacy devices the guest has, and so which ones ACPI describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegacyDevices {
    /// COM1 at 0x3f8, IRQ 4: a `PNP0501` device in the DSDT.
    pub serial: bool,
    /// The i8042 controller: the FADT 8042 flag and a `PNP0303` device (keyboard only, IRQ 1).
    /// On by default: a guest with an i8042 driver then finds the keyboard that Ctrl-Alt-Del is
    /// sent through. The controller answers the probe at once (~6 ms for the controller, ~15 ms
    /// for the keyboard in the virtual KVM host); with it off, Linux skips the probe when its
    /// PNP support is built in, and `reboot=k` still works.
    pub i8042: bool,
    /// The pvpanic port: a `QEMU0001` device Linux's pvpanic driver binds to.
    pub pvpanic: bool,
}

impl Default for LegacyDevices {
    fn default() -> Self {
        LegacyDevices {
            serial: true,
            i8042: true,
            pvpanic: true,
        }
    }
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (LAPIC ids `0..num_cpus`).
    pub num_cpus: u8,
    /// Legacy devices to describe.
    pub legacy_devices: LegacyDevices,
    /// virtio-mmio devices as `(base, size, irq)`; each becomes an `LNRO0005` device.
    pub virtio_mmio: Vec<(u64, u64, u32)>,
}

/// One table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTable {
    /// Guest address of the table.
    pub addr: GuestAddress,
    /// The table's bytes.
    pub bytes: Vec<u8>,
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

fn align(addr: u64) -> u64 {
    addr.next_multiple_of(TABLE_ALIGNMENT)
}

fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn check_virtio_device(base: u64, size: u64, irq: u32) -> Result<(), AcpiError> {
    let invalid = |reason| AcpiError::InvalidVirtioDevice {
        base,
        size,
        irq,
        reason,
    };
    if size == 0 || size > u64::from(u32::MAX) {
        return Err(invalid("window size must be in 1..4 GiB"));
    }
    // Memory32Fixed holds a 32-bit base and a 32-bit length.
    match base.checked_add(size) {
        Some(end) if end <= 1 << 32 => {}
        _ => return Err(invalid("window must lie below 4 GiB")),
    }
    if irq >= u32::from(IOAPIC_PINS) {
        return Err(invalid("IRQ is not an IOAPIC pin"));
    }
    Ok(())
}

/// The DSDT's AML body: `\_S5_` and the devices under `\_SB_`.
fn dsdt_body(config: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if config.virtio_mmio.len() > MAX_VIRTIO_MMIO_DEVICES {
        return Err(AcpiError::TooManyVirtioDevices(config.virtio_mmio.len()));
    }
    let mut body = aml_bytes(&aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE, &ACPI_S5_SLEEP_TYPE, &0u8, &0u8]),
    ));

    let mut devices: Vec<u8> = Vec::new();
    let legacy = config.legacy_devices;
    if legacy.serial {
        devices.extend(serial_device());
    }
    if legacy.i8042 {
        devices.extend(i8042_device());
    }
    if legacy.pvpanic {
        devices.extend(pvpanic_device());
    }
    for (index, &(base, size, irq)) in config.virtio_mmio.iter().enumerate() {
        devices.extend(virtio_mmio_device(index, base, size, irq)?);
    }
    body.extend(aml::Scope::raw("\\_SB_".into(), devices));
    Ok(body)
}

/// COM1: `PNP0501` with its eight ports and IRQ 4.
fn serial_device() -> Vec<u8> {
    let io = aml::IO::new(SERIAL_PORT_BASE, SERIAL_PORT_BASE, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    aml_bytes(&aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &0u8),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The i8042 keyboard controller: `PNP0303` with ports 0x60 and 0x64 and IRQ 1.
fn i8042_device() -> Vec<u8> {
    let data = aml::IO::new(I8042_PORT_BASE, I8042_PORT_BASE, 1, 1);
    let command = aml::IO::new(I8042_PORT_BASE + 4, I8042_PORT_BASE + 4, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, 1);
    let crs = aml::ResourceTemplate::new(vec![&data, &command, &irq]);
    aml_bytes(&aml::Device::new(
        "PS2_".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// The pvpanic port: `QEMU0001` with one I/O port, as Linux's pvpanic-mmio driver expects.
fn pvpanic_device() -> Vec<u8> {
    let io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let crs = aml::ResourceTemplate::new(vec![&io]);
    aml_bytes(&aml::Device::new(
        "PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    ))
}

/// AML for virtio-mmio device number `index` (named `V000`, `V001`, ...): `_HID` "LNRO0005",
/// `_UID` `index`, `_CRS` with its MMIO window and an edge-triggered interrupt (Kiln signals
/// virtio interrupts through irqfds without resampling).
pub fn virtio_mmio_device(
    index: usize,
    base: u64,
    size: u64,
    irq: u32,
) -> Result<Vec<u8>, AcpiError> {
    if index >= MAX_VIRTIO_MMIO_DEVICES {
        return Err(AcpiError::TooManyVirtioDevices(index + 1));
    }
    check_virtio_device(base, size, irq)?;
    let name = format!("V{index:03X}");
    // check_virtio_device() keeps base + size within 4 GiB.
    let window = aml::Memory32Fixed::new(true, base as u32, size as u32);
    let interrupt = aml::Interrupt::new(true, true, false, false, irq);
    let crs = aml::ResourceTemplate::new(vec![&window, &interrupt]);
    let uid = index as u32;
    Ok(aml_bytes(&aml::Device::new(
        name.as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )))
}

fn build_dsdt(config: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&dsdt_body(config)?);
    Ok(dsdt.as_slice().to_vec())
}

fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(
        *b"APIC",
        44,
        MADT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            cpu,
            cpu,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(
        ioapic_id(num_cpus),
        IOAPIC_START as u32,
        0,
    )));
    // The PC convention: the 8254 timer (ISA IRQ 0) is wired to IOAPIC pin 2. Linux does not
    // route the PIT through the IOAPIC on a hardware-reduced platform, so this only keeps the
    // table what a PC's would be.
    let mut irq0_override = vec![MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0];
    irq0_override.extend_from_slice(&2u32.to_le_bytes());
    irq0_override.extend_from_slice(&MPS_INTI_CONFORM.to_le_bytes());
    madt.append_slice(&irq0_override);
    let mut nmi = vec![MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&MPS_INTI_CONFORM.to_le_bytes());
    nmi.push(1); // LINT1
    madt.append_slice(&nmi);
    madt.as_slice().to_vec()
}

fn build_fadt(dsdt_addr: u64, legacy: LegacyDevices) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    let mut boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    if legacy.serial || legacy.i8042 {
        boot_arch |= IAPC_BOOT_ARCH_LEGACY_DEVICES;
    }
    if legacy.i8042 {
        boot_arch |= IAPC_BOOT_ARCH_8042;
    }
    fadt.iapc_boot_arch = boot_arch.into();
    fadt.reset_reg = io_port_gas(ACPI_PM_PORT + ACPI_RESET_OFFSET);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(ACPI_PM_PORT + ACPI_SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_port_gas(ACPI_PM_PORT + ACPI_SLEEP_STATUS_OFFSET);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    aml_bytes(&fadt.finalize())
}

/// Builds all tables for `config`, laid out from [`ACPI_TABLES_START`]; the first is the RSDP.
pub fn build_acpi_tables(config: &AcpiConfig) -> Result<Vec<AcpiTable>, AcpiError> {
    if config.num_cpus == 0 || config.num_cpus > MAX_SUPPORTED_CPUS {
        return Err(AcpiError::CpuCount(config.num_cpus));
    }
    let madt = build_madt(config.num_cpus);
    let dsdt = build_dsdt(config)?;
    // The XSDT has two entries (FADT, MADT) and the FADT a fixed size, so every address is
    // known before the tables that point at each other are built.
    let rsdp_addr = ACPI_TABLES_START;
    let xsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let end = dsdt_addr + dsdt.len() as u64;
    if end > HIMEM_START {
        return Err(AcpiError::TooLarge(end));
    }

    let fadt = build_fadt(dsdt_addr, config.legacy_devices);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let table = |addr, bytes| AcpiTable {
        addr: GuestAddress(addr),
        bytes,
    };
    Ok(vec![
        table(rsdp_addr, aml_bytes(&rsdp)),
        table(xsdt_addr, aml_bytes(&xsdt)),
        table(fadt_addr, fadt),
        table(madt_addr, madt),
        table(dsdt_addr, dsdt),
    ])
}

/// Writes the ACPI tables for `config` to guest memory and returns the RSDP's address.
pub fn setup_acpi_tables(
    mem: &GuestMemoryMmap,
    config: AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let window = (HIMEM_START - ACPI_TABLES_START) as usize;
    if !range_in_memory(mem, GuestAddress(ACPI_TABLES_START), window) {
        return Err(AcpiError::OutsideMemory);
    }
    let tables = build_acpi_tables(&config)?;
    for table in &tables {
        mem.write_slice(&table.bytes, table.addr)
            .map_err(|err: GuestMemoryError| AcpiError::Write {
                addr: table.addr.0,
                reason: err.to_string(),
            })?;
    }
    log::debug!(
        "ACPI tables for {} vCPUs and {} virtio-mmio devices at {ACPI_TABLES_START:#x}",
        config.num_cpus,
        config.virtio_mmio.len()
    );
    Ok(GuestAddress(ACPI_TABLES_START))
}

#[cfg(test)]
#[path = "acpi_tests.rs"]
mod tests;
