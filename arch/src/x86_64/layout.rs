//! The guest physical memory map shared by every part of Kiln.
//!
//! ```text
//! 0x0000_0000 ..             real-mode IVT / BDA (RAM, unused by a 64-bit boot)
//! 0x0000_0500                GDT
//! 0x0000_0520                IDT (empty; Linux installs its own)
//! 0x0000_7000                boot_params "zero page"
//! 0x0000_8ff0                initial stack pointer (grows down)
//! 0x0000_9000 .. 0x0000_c000 identity page tables: PML4, PDPT, PD (first 1 GiB, 2 MiB pages)
//! 0x0002_0000                kernel command line
//! 0x0009_fc00 .. 0x000a_0000 EBDA: MP table
//! 0x000a_0000 .. 0x0010_0000 legacy hole (reserved; ACPI tables at 0xe_0000)
//! 0x0010_0000 ..             kernel (HIMEM_START); RAM up to MMIO_GAP_START
//! 0xd000_0000 .. 0x1_0000_0000 32-bit MMIO gap: boot timer, then virtio-mmio devices
//! 0x1_0000_0000 ..           RAM above 4 GiB for guests larger than the space below the gap
//! ```

/// Where the GDT lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux boot_params structure ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the identity page tables.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the identity page tables.
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the x86 boot protocol accepts, including its NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Where ACPI tables (RSDP first) are written, inside the legacy hole.
pub const ACPI_TABLES_START: u64 = 0xe0000;
/// End of the legacy hole: first byte of high memory, where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB (768 MiB long).
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = (4 << 30) - MMIO_GAP_START;
/// First byte above 4 GiB.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Firecracker-compatible boot timer: the guest writes 123 here once it is up.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Size of the boot timer's MMIO window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First address handed out to virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// TSS address KVM needs on Intel hosts (three pages just below the IOAPIC/BIOS area).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// IOAPIC MMIO base (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;

/// COM1 port base.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1 IRQ line.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 keyboard controller ports 0x60..=0x64.
pub const I8042_PORT_BASE: u16 = 0x60;
/// i8042 keyboard IRQ line (there is no IRQ 12 for a mouse: virtio-mmio devices use it).
pub const I8042_KEYBOARD_IRQ: u32 = 1;
/// pvpanic-style port: the guest writes here when its kernel panics.
pub const PVPANIC_PORT: u16 = 0x505;
/// ACPI hardware-reduced sleep control/status and reset register port.
pub const ACPI_PM_PORT: u16 = 0x600;
/// First IRQ line handed to virtio-mmio devices.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// Last IRQ line handed to virtio-mmio devices (IOAPIC has 24 pins).
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// ACPI hardware-reduced registers, one byte each at `ACPI_PM_PORT + offset`.
/// FADT SLEEP_CONTROL_REG: the guest writes `(SLP_TYP << 2) | SLP_EN` here to power off.
pub const ACPI_SLEEP_CONTROL_OFFSET: u16 = 0;
/// FADT SLEEP_STATUS_REG.
pub const ACPI_SLEEP_STATUS_OFFSET: u16 = 1;
/// FADT RESET_REG: writing `ACPI_RESET_VALUE` here resets the VM.
pub const ACPI_RESET_OFFSET: u16 = 2;
/// Number of ports the ACPI PM device decodes.
pub const ACPI_PM_PORT_LEN: u16 = 3;
/// Value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 1;
/// SLP_TYP value the DSDT's `_S5_` object advertises for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// SLP_EN bit in the sleep control register.
pub const ACPI_SLEEP_ENABLE_BIT: u8 = 1 << 5;
