//! The guest and virtual-host images, built (or found in the cache) by the scripts in
//! `resources/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::guest_test::KernelVariant;
use crate::HarnessError;

/// The repository's `resources/` directory.
pub fn resources_dir() -> PathBuf {
    // This crate lives in <repo>/tests/harness.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../resources")
}

/// Runs a builder script from `resources/` and returns the artefact directory it prints. Its
/// progress messages go to this process's stderr, so a first kernel build is visible.
pub fn build_artefact(script: &str) -> Result<PathBuf, HarnessError> {
    let path = resources_dir().join(script);
    let output = Command::new(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|error| HarnessError::Setup(format!("cannot run {}: {error}", path.display())))?;
    if !output.status.success() {
        return Err(HarnessError::Setup(format!(
            "{} failed ({}); its messages are above",
            path.display(),
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout.lines().last().map(str::trim).unwrap_or_default();
    if dir.is_empty() || !Path::new(dir).is_dir() {
        return Err(HarnessError::Setup(format!(
            "{} did not print an artefact directory (stdout: {stdout:?})",
            path.display()
        )));
    }
    Ok(PathBuf::from(dir))
}

/// Builds once per process and remembers the result (or the error).
fn memoized(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    script: &str,
) -> Result<PathBuf, HarnessError> {
    cell.get_or_init(|| build_artefact(script).map_err(|error| error.to_string()))
        .clone()
        .map_err(HarnessError::Setup)
}

/// The guest kernel builds and the base initramfs.
#[derive(Debug, Clone)]
pub struct GuestImages {
    kernel_dir: PathBuf,
    initramfs_dir: PathBuf,
}

impl GuestImages {
    /// Builds or finds the guest kernel and base initramfs.
    pub fn get() -> Result<Self, HarnessError> {
        static KERNEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static INITRAMFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        Ok(Self {
            kernel_dir: memoized(&KERNEL, "build-kernel")?,
            initramfs_dir: memoized(&INITRAMFS, "build-initramfs")?,
        })
    }

    /// The guest kernel file of a variant.
    pub fn kernel(&self, variant: KernelVariant) -> PathBuf {
        self.kernel_dir.join(variant.file_name())
    }

    /// The static vsock helper (`kiln-vsock`, also in the guest's `/usr/bin`), for host scripts.
    pub fn vsock_helper(&self) -> PathBuf {
        self.initramfs_dir.join("kiln-vsock")
    }

    /// The base initramfs (gzip newc cpio, padded to 4 bytes).
    pub fn initramfs(&self) -> PathBuf {
        self.initramfs_dir.join("initramfs.cpio.gz")
    }

    /// How much memory the guest kernel image occupies once loaded: the sum of the sizes in
    /// memory of the vmlinux ELF's loadable segments.
    pub fn kernel_memory_size(&self) -> Result<u64, HarnessError> {
        let path = self.kernel(KernelVariant::Vmlinux);
        let bytes = std::fs::read(&path)
            .map_err(|error| HarnessError::Setup(format!("{}: {error}", path.display())))?;
        elf_load_size(&bytes).ok_or_else(|| {
            HarnessError::Setup(format!("{} is not a 64-bit ELF file", path.display()))
        })
    }
}

/// Builds or finds the virtual KVM host (its artefact directory).
pub fn vhost_image() -> Result<PathBuf, HarnessError> {
    static VHOST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    memoized(&VHOST, "build-vhost")
}

/// Builds or finds the ext4 root file system image.
pub fn rootfs_image() -> Result<PathBuf, HarnessError> {
    static ROOTFS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    Ok(memoized(&ROOTFS, "build-rootfs")?.join("rootfs.ext4"))
}

/// Sums `p_memsz` of the PT_LOAD program headers of a little-endian ELF64 file.
pub fn elf_load_size(elf: &[u8]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?));
    // Magic, ELFCLASS64, little-endian.
    if elf.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut total = 0u64;
    for index in 0..phnum {
        let header = phoff.checked_add(index.checked_mul(phentsize)?)?;
        if u32_at(header)? == PT_LOAD {
            total = total.checked_add(u64_at(header + 0x28)?)?;
        }
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::elf_load_size;

    #[test]
    fn sums_loadable_segments_of_this_test_binary() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let size = elf_load_size(&exe).unwrap();
        assert!(size > 0 && size >= exe.len() as u64 / 100, "{size}");
    }

    #[test]
    fn rejects_non_elf() {
        assert_eq!(elf_load_size(b"#!/bin/sh\n"), None);
        assert_eq!(elf_load_size(b"\x7fELF\x02\x01"), None);
    }
}
