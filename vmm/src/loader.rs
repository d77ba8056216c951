//! Putting the kernel, the initrd and the command line into guest memory.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;
use kiln_arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};

/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Why the guest could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened or read.
    #[error("cannot read {what} '{path}': {source}")]
    Read {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The kernel is neither format Kiln boots.
    #[error("kernel image '{0}' is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    /// The kernel does not fit in guest memory.
    #[error(
        "kernel image '{path}' ({size} bytes) does not fit in {memory_mib} MiB of guest memory"
    )]
    KernelTooLarge {
        /// Its path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Guest memory size.
        memory_mib: u64,
    },
    /// linux-loader refused the kernel.
    #[error("cannot load kernel image '{path}' ({format}): {reason}")]
    Kernel {
        /// Its path.
        path: PathBuf,
        /// "ELF" or "bzImage".
        format: &'static str,
        /// linux-loader's message.
        reason: String,
    },
    /// The initrd does not fit.
    #[error("initrd '{path}': {reason}")]
    Initrd {
        /// Its path.
        path: PathBuf,
        /// Why (does not fit, read error).
        reason: String,
    },
    /// The command line could not be built or written.
    #[error("kernel command line: {0}")]
    Cmdline(String),
}

/// The kernel format, told apart by magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux`.
    Elf,
    /// A `bzImage` (boot sector with the "HdrS" setup header).
    BzImage,
}

/// What the boot code needs to know about the loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Format that was loaded.
    pub format: KernelFormat,
    /// Where the boot CPU starts, in 64-bit mode.
    pub entry: GuestAddress,
    /// First byte after the kernel image.
    pub end: u64,
    /// A bzImage's setup header, copied into boot_params.
    pub setup_header: Option<setup_header>,
}

fn read_error<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> LoadError + 'a {
    move |source| LoadError::Read {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Tells an ELF from a bzImage by their magic bytes.
pub fn detect_kernel_format(header: &[u8]) -> Option<KernelFormat> {
    if header.starts_with(b"\x7fELF") {
        return Some(KernelFormat::Elf);
    }
    // boot_flag 0xaa55 at 0x1fe and the "HdrS" setup header signature at 0x202.
    if header.len() >= 0x206
        && header[0x1fe..0x200] == [0x55, 0xaa]
        && &header[0x202..0x206] == b"HdrS"
    {
        return Some(KernelFormat::BzImage);
    }
    None
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(memory: &GuestMemory, path: &Path) -> Result<LoadedKernel, LoadError> {
    let mut file = File::open(path).map_err(read_error("kernel image", path))?;
    let size = file
        .metadata()
        .map_err(read_error("kernel image", path))?
        .len();
    let memory_size: u64 = memory.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    if size >= memory_size.saturating_sub(HIMEM_START) {
        return Err(LoadError::KernelTooLarge {
            path: path.to_path_buf(),
            size,
            memory_mib: memory_size >> 20,
        });
    }
    let mut header = vec![0u8; 0x400];
    let read = read_prefix(&mut file, &mut header).map_err(read_error("kernel image", path))?;
    header.truncate(read);
    let format = detect_kernel_format(&header)
        .ok_or_else(|| LoadError::UnknownKernelFormat(path.to_path_buf()))?;
    let high = Some(GuestAddress(HIMEM_START));
    let (result, format_name) = match format {
        KernelFormat::Elf => (Elf::load(memory, None, &mut file, high), "ELF"),
        KernelFormat::BzImage => (BzImage::load(memory, None, &mut file, high), "bzImage"),
    };
    let loaded = result.map_err(|err| LoadError::Kernel {
        path: path.to_path_buf(),
        format: format_name,
        reason: err.to_string(),
    })?;
    let entry = match format {
        // linux-loader reports an ELF's entry point as its load address.
        KernelFormat::Elf => loaded.kernel_load,
        KernelFormat::BzImage => loaded
            .kernel_load
            .checked_add(BZIMAGE_64BIT_ENTRY_OFFSET)
            .ok_or_else(|| LoadError::Kernel {
                path: path.to_path_buf(),
                format: format_name,
                reason: "entry point overflows".into(),
            })?,
    };
    Ok(LoadedKernel {
        format,
        entry,
        end: loaded.kernel_end,
        setup_header: loaded.setup_header,
    })
}

fn read_prefix(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Loads the initrd as high as fits in low memory; returns where and how large.
pub fn load_initrd(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
) -> Result<(GuestAddress, usize), LoadError> {
    let initrd_error = |reason: String| LoadError::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(read_error("initrd", path))?;
    let size = file.metadata().map_err(read_error("initrd", path))?.len();
    let size = usize::try_from(size).map_err(|_| initrd_error("too large".into()))?;
    if size == 0 {
        return Err(initrd_error("the file is empty".into()));
    }
    let address = kiln_arch::memory::initrd_load_address(memory, size, kernel_end)
        .map_err(|err| initrd_error(err.to_string()))?;
    memory
        .read_exact_volatile_from(address, &mut file, size)
        .map_err(|err| initrd_error(format!("cannot read it into guest memory: {err}")))?;
    Ok((address, size))
}

/// Writes the command line; returns its size including the NUL terminator.
pub fn load_cmdline(memory: &GuestMemory, text: &str) -> Result<usize, LoadError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|err| LoadError::Cmdline(err.to_string()))?;
    cmdline
        .insert_str(text)
        .map_err(|err| LoadError::Cmdline(err.to_string()))?;
    linux_loader::loader::load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|err| LoadError::Cmdline(err.to_string()))?;
    let written = cmdline
        .as_cstring()
        .map_err(|err| LoadError::Cmdline(err.to_string()))?;
    Ok(written.as_bytes_with_nul().len())
}

/// Reads back a NUL-terminated string from guest memory (tests and diagnostics).
pub fn read_guest_cstring(memory: &GuestMemory, address: GuestAddress, max: usize) -> String {
    let mut bytes = vec![0u8; max];
    if memory.read_slice(&mut bytes, address).is_err() {
        return String::new();
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(max);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn formats_are_told_apart() {
        assert_eq!(
            detect_kernel_format(b"\x7fELF\x02\x01"),
            Some(KernelFormat::Elf)
        );
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_kernel_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_kernel_format(b"#!/bin/sh\n"), None);
        assert_eq!(detect_kernel_format(&[]), None);
    }

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("kiln-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn garbage_kernel_is_refused_clearly() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let path = temp_file("garbage-kernel", &[0x42; 4096]);
        let err = load_kernel(&memory, &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LoadError::UnknownKernelFormat(_)), "{err}");
        assert!(err
            .to_string()
            .contains("neither an ELF vmlinux nor a bzImage"));
    }

    #[test]
    fn truncated_elf_is_refused_clearly() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let path = temp_file("truncated-elf", b"\x7fELF\x02\x01\x01");
        let err = load_kernel(&memory, &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(
            matches!(err, LoadError::Kernel { format: "ELF", .. }),
            "{err}"
        );
    }

    #[test]
    fn kernel_larger_than_memory_is_refused() {
        let memory = create_guest_memory(32 << 20).unwrap();
        let path = temp_file("huge-kernel", &vec![0u8; 33 << 20]);
        let err = load_kernel(&memory, &path).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LoadError::KernelTooLarge { .. }), "{err}");
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let memory = create_guest_memory(32 << 20).unwrap();
        let path = temp_file("huge-initrd", &vec![0u8; 40 << 20]);
        let err = load_initrd(&memory, &path, HIMEM_START + (1 << 20)).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, LoadError::Initrd { .. }), "{err}");
    }

    #[test]
    fn initrd_lands_in_memory_intact() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let contents: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let path = temp_file("initrd", &contents);
        let (address, size) = load_initrd(&memory, &path, HIMEM_START + (4 << 20)).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(size, contents.len());
        assert_eq!(address.raw_value() % 4096, 0);
        assert!(address.raw_value() + size as u64 <= 64 << 20);
        let mut back = vec![0u8; size];
        memory.read_slice(&mut back, address).unwrap();
        assert_eq!(back, contents);
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let memory = create_guest_memory(64 << 20).unwrap();
        let size = load_cmdline(&memory, "console=ttyS0 quiet").unwrap();
        assert_eq!(size, "console=ttyS0 quiet".len() + 1);
        assert_eq!(
            read_guest_cstring(&memory, GuestAddress(CMDLINE_START), 64),
            "console=ttyS0 quiet"
        );
    }
}
