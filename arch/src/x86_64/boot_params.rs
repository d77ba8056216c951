//! The Linux `boot_params` "zero page" and its e820 memory map.
//!
//! With the 64-bit boot protocol the kernel finds everything it needs from the loader through
//! the zero page whose address is in RSI at entry: command line, initrd, RSDP and the e820 map.

use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE, KEEP_SEGMENTS,
    LOADED_HIGH, XLF_KERNEL_64,
};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
};

use super::layout::{
    CMDLINE_MAX_SIZE, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MMIO_GAP_START,
    ZERO_PAGE_START,
};
use super::memory::range_in_memory;
use crate::GuestMemoryMmap;

/// `boot_flag` value the kernel checks for (the old boot sector signature).
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS" in little endian.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Physical alignment a relocatable kernel needs (the x86_64 default, 16 MiB).
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory (MP and ACPI tables, the legacy hole).
pub const E820_RESERVED: u32 = 2;

/// Errors while building or writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// The command line size is 0 or larger than the boot protocol allows.
    #[error("command line of {0} bytes (with NUL) is not in 1..={CMDLINE_MAX_SIZE}")]
    CmdlineSize(usize),
    /// The command line does not lie in guest RAM.
    #[error("command line at {addr:#x} ({size} bytes) is outside guest memory")]
    CmdlineOutsideMemory {
        /// Guest address of the command line.
        addr: u64,
        /// Size including the NUL terminator.
        size: usize,
    },
    /// The initrd does not lie in guest RAM.
    #[error("initrd at {addr:#x} ({size} bytes) is outside guest memory")]
    InitrdOutsideMemory {
        /// Guest address of the initrd.
        addr: u64,
        /// Size of the initrd.
        size: usize,
    },
    /// The initrd ends above the kernel's `initrd_addr_max`.
    #[error("initrd ends at {end:#x}, above the kernel's initrd_addr_max {max:#x}")]
    InitrdAboveAddrMax {
        /// Last byte of the initrd.
        end: u64,
        /// The kernel's `initrd_addr_max`.
        max: u32,
    },
    /// The bzImage setup header does not allow a 64-bit entry.
    #[error(
        "kernel setup header (magic {magic:#x}, protocol {version:#x}) does not advertise \
         a 64-bit entry point (needs \"HdrS\" and XLF_KERNEL_64)"
    )]
    KernelNot64Bit {
        /// The header's `header` field.
        magic: u32,
        /// The header's boot protocol version.
        version: u16,
    },
    /// Guest RAM does not cover the low megabyte the boot structures live in.
    #[error("guest memory must cover [0, {HIMEM_START:#x}) with RAM")]
    MemoryTooSmall,
    /// A RAM region overlaps the 32-bit MMIO gap.
    #[error("guest RAM region [{start:#x}, {end:#x}) overlaps the MMIO gap")]
    RamInMmioGap {
        /// First byte of the region.
        start: u64,
        /// End (exclusive) of the region.
        end: u64,
    },
    /// More e820 entries than the zero page holds.
    #[error("{0} e820 entries do not fit in the zero page")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("cannot write boot_params to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// What the loader tells the kernel through the zero page.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootParamsConfig {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: GuestAddress,
    /// Size of the command line including its NUL terminator.
    pub cmdline_size: usize,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(GuestAddress, usize)>,
    /// The setup header of a bzImage kernel; `None` for an ELF `vmlinux`.
    pub setup_header: Option<setup_header>,
    /// Guest address of the ACPI RSDP, if ACPI tables were written.
    pub rsdp_addr: Option<GuestAddress>,
}

/// One e820 memory map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

impl E820Entry {
    fn new(start: u64, end: u64, kind: u32) -> Self {
        E820Entry {
            addr: start,
            size: end - start,
            kind,
        }
    }
}

/// The e820 map for `mem`: its RAM regions as RAM, except `[EBDA_START, HIMEM_START)`, which is
/// reserved because the MP and ACPI tables live there.
pub fn e820_table(mem: &GuestMemoryMmap) -> Result<Vec<E820Entry>, BootParamsError> {
    if !range_in_memory(mem, GuestAddress(0), HIMEM_START as usize) {
        return Err(BootParamsError::MemoryTooSmall);
    }
    let mut entries = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start < FIRST_ADDR_PAST_32BITS && end > MMIO_GAP_START {
            return Err(BootParamsError::RamInMmioGap { start, end });
        }
        // Split the region around the reserved window [EBDA_START, HIMEM_START).
        let pieces = [
            (start, end.min(EBDA_START), E820_RAM),
            (start.max(EBDA_START), end.min(HIMEM_START), E820_RESERVED),
            (start.max(HIMEM_START), end, E820_RAM),
        ];
        entries.extend(
            pieces
                .into_iter()
                .filter(|(piece_start, piece_end, _)| piece_start < piece_end)
                .map(|(piece_start, piece_end, kind)| E820Entry::new(piece_start, piece_end, kind)),
        );
    }
    if entries.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries(entries.len()));
    }
    Ok(entries)
}

fn split_u64(value: u64) -> (u32, u32) {
    (value as u32, (value >> 32) as u32)
}

/// Builds the zero page for `config` without writing it (see [`configure_boot_params`]).
pub fn build_boot_params(
    mem: &GuestMemoryMmap,
    config: &BootParamsConfig,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params::default();

    if let Some(header) = config.setup_header {
        if header.header != KERNEL_HDR_MAGIC || header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootParamsError::KernelNot64Bit {
                magic: header.header,
                version: header.version,
            });
        }
        params.hdr = header;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    // The kernel sits at HIMEM_START and the vCPU enters with flat segments already loaded.
    params.hdr.loadflags |= LOADED_HIGH | KEEP_SEGMENTS;

    let cmdline_size = config.cmdline_size;
    if cmdline_size == 0 || cmdline_size > CMDLINE_MAX_SIZE {
        return Err(BootParamsError::CmdlineSize(cmdline_size));
    }
    if !range_in_memory(mem, config.cmdline_addr, cmdline_size) {
        return Err(BootParamsError::CmdlineOutsideMemory {
            addr: config.cmdline_addr.raw_value(),
            size: cmdline_size,
        });
    }
    let (cmdline_low, cmdline_high) = split_u64(config.cmdline_addr.raw_value());
    params.hdr.cmd_line_ptr = cmdline_low;
    params.ext_cmd_line_ptr = cmdline_high;
    // The boot protocol counts the command line without its terminator.
    params.hdr.cmdline_size = (cmdline_size - 1) as u32;

    if let Some((addr, size)) = config.initrd {
        let outside = || BootParamsError::InitrdOutsideMemory {
            addr: addr.raw_value(),
            size,
        };
        if size == 0 || !range_in_memory(mem, addr, size) {
            return Err(outside());
        }
        let last = addr.raw_value() + (size as u64 - 1);
        let max = params.hdr.initrd_addr_max;
        if config.setup_header.is_some() && max != 0 && last > u64::from(max) {
            return Err(BootParamsError::InitrdAboveAddrMax { end: last, max });
        }
        let (image_low, image_high) = split_u64(addr.raw_value());
        let (size_low, size_high) = split_u64(size as u64);
        params.hdr.ramdisk_image = image_low;
        params.ext_ramdisk_image = image_high;
        params.hdr.ramdisk_size = size_low;
        params.ext_ramdisk_size = size_high;
    }

    if let Some(rsdp) = config.rsdp_addr {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }

    let table = e820_table(mem)?;
    for (slot, entry) in params.e820_table.iter_mut().zip(&table) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    // e820_table() guarantees at most E820_MAX_ENTRIES_ZEROPAGE (128) entries.
    params.e820_entries = table.len() as u8;

    Ok(params)
}

/// Writes the zero page for `config` at [`ZERO_PAGE_START`].
pub fn configure_boot_params(
    mem: &GuestMemoryMmap,
    config: BootParamsConfig,
) -> Result<(), BootParamsError> {
    let params = build_boot_params(mem, &config)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootParamsError::Write)?;
    log::debug!(
        "boot_params at {ZERO_PAGE_START:#x}: {} e820 entries, initrd {:?}, rsdp {:?}",
        params.e820_entries,
        config.initrd,
        config.rsdp_addr
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::CMDLINE_START;
    use crate::memory::arch_memory_regions;

    const MIB: u64 = 1 << 20;

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&arch_memory_regions(size)).unwrap()
    }

    fn config() -> BootParamsConfig {
        BootParamsConfig {
            cmdline_addr: GuestAddress(CMDLINE_START),
            cmdline_size: 12,
            ..Default::default()
        }
    }

    fn read_back(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
    }

    fn e820_of(params: &boot_params) -> Vec<E820Entry> {
        params.e820_table[..usize::from(params.e820_entries)]
            .iter()
            .map(|e| E820Entry {
                addr: e.addr,
                size: e.size,
                kind: e.r#type,
            })
            .collect()
    }

    #[test]
    fn zero_page_fields_for_small_memory() {
        let mem = memory(128 * MIB);
        let cfg = BootParamsConfig {
            initrd: Some((GuestAddress(0x700_0000), 0x1234)),
            rsdp_addr: Some(GuestAddress(0xe0000)),
            ..config()
        };
        configure_boot_params(&mem, cfg).unwrap();
        let params = read_back(&mem);

        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, u32::from_le_bytes(*b"HdrS"));
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(
            hdr.loadflags & (LOADED_HIGH | KEEP_SEGMENTS),
            LOADED_HIGH | KEEP_SEGMENTS
        );
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 11);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_eq!({ params.ext_ramdisk_image }, 0);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe0000);

        assert_eq!(
            e820_of(&params),
            vec![
                E820Entry::new(0, EBDA_START, E820_RAM),
                E820Entry::new(EBDA_START, HIMEM_START, E820_RESERVED),
                E820Entry::new(HIMEM_START, 128 * MIB, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_for_memory_above_4g() {
        let size = (4 << 30) + 64 * MIB;
        let mem = memory(size);
        let table = e820_table(&mem).unwrap();
        assert_eq!(
            table,
            vec![
                E820Entry::new(0, EBDA_START, E820_RAM),
                E820Entry::new(EBDA_START, HIMEM_START, E820_RESERVED),
                E820Entry::new(HIMEM_START, MMIO_GAP_START, E820_RAM),
                E820Entry::new(
                    FIRST_ADDR_PAST_32BITS,
                    FIRST_ADDR_PAST_32BITS + size - MMIO_GAP_START,
                    E820_RAM
                ),
            ]
        );
        // The map covers exactly the guest's memory.
        let covered: u64 = table.iter().map(|e| e.size).sum();
        assert_eq!(covered, size);
        configure_boot_params(&mem, config()).unwrap();
        assert_eq!(e820_of(&read_back(&mem)), table);
    }

    #[test]
    fn no_rsdp_or_initrd_leaves_fields_zero() {
        let mem = memory(128 * MIB);
        configure_boot_params(&mem, config()).unwrap();
        let params = read_back(&mem);
        assert_eq!({ params.acpi_rsdp_addr }, 0);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
        assert_eq!({ params.hdr.ramdisk_size }, 0);
    }

    #[test]
    fn bzimage_header_is_kept_and_checked() {
        let mem = memory(128 * MIB);
        let header = setup_header {
            header: KERNEL_HDR_MAGIC,
            version: 0x020f,
            xloadflags: XLF_KERNEL_64,
            initrd_addr_max: 0x37ff_ffff,
            kernel_alignment: 0x20_0000,
            loadflags: 0x80,
            ..Default::default()
        };
        let cfg = BootParamsConfig {
            setup_header: Some(header),
            ..config()
        };
        let params = build_boot_params(&mem, &cfg).unwrap();
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!(params.hdr.loadflags, 0x80 | LOADED_HIGH | KEEP_SEGMENTS);

        let old = setup_header {
            xloadflags: 0,
            ..header
        };
        let err = build_boot_params(
            &mem,
            &BootParamsConfig {
                setup_header: Some(old),
                ..config()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootParamsError::KernelNot64Bit { .. }));

        let small_max = setup_header {
            initrd_addr_max: 0x100_0000,
            ..header
        };
        let err = build_boot_params(
            &mem,
            &BootParamsConfig {
                setup_header: Some(small_max),
                initrd: Some((GuestAddress(0x200_0000), 4096)),
                ..config()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootParamsError::InitrdAboveAddrMax { .. }));
    }

    #[test]
    fn bad_inputs_are_rejected() {
        let mem = memory(128 * MIB);
        let check = |cfg: BootParamsConfig| build_boot_params(&mem, &cfg).unwrap_err();
        assert!(matches!(
            check(BootParamsConfig {
                cmdline_size: 0,
                ..config()
            }),
            BootParamsError::CmdlineSize(0)
        ));
        assert!(matches!(
            check(BootParamsConfig {
                cmdline_size: CMDLINE_MAX_SIZE + 1,
                ..config()
            }),
            BootParamsError::CmdlineSize(_)
        ));
        assert!(matches!(
            check(BootParamsConfig {
                cmdline_addr: GuestAddress(128 * MIB - 4),
                ..config()
            }),
            BootParamsError::CmdlineOutsideMemory { .. }
        ));
        assert!(matches!(
            check(BootParamsConfig {
                initrd: Some((GuestAddress(128 * MIB - 4096), 8192)),
                ..config()
            }),
            BootParamsError::InitrdOutsideMemory { .. }
        ));
        assert!(matches!(
            check(BootParamsConfig {
                initrd: Some((GuestAddress(u64::MAX - 10), 100)),
                ..config()
            }),
            BootParamsError::InitrdOutsideMemory { .. }
        ));
    }

    #[test]
    fn memory_map_errors() {
        let tiny = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            e820_table(&tiny),
            Err(BootParamsError::MemoryTooSmall)
        ));
        let into_gap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MMIO_GAP_START as usize + 4096)])
                .unwrap();
        assert!(matches!(
            e820_table(&into_gap),
            Err(BootParamsError::RamInMmioGap { .. })
        ));
    }
}
