//! The initramfs of a `kiln run -- CMD` guest, assembled at start into a memfd: `kiln-init` as
//! `/init`, the command's spec, a static busybox when the host has one, and the `--copy` files.
//! No root, no mounts and no files on the host.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kiln_init::{CommandSpec, COPY_STAGING, SPEC_PATH};

use super::cpio::CpioWriter;
use super::RunError;

/// The guest init, built static by build.rs.
static KILN_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kiln-init"));

/// Where Kiln looks for a busybox to put in the guest, before `PATH`.
const BUSYBOX_PLACES: [&str; 3] = ["/bin/busybox", "/usr/bin/busybox", "/usr/sbin/busybox"];

/// `--copy HOST:GUEST`: a host file or directory that appears at an absolute guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySpec {
    /// On the host.
    pub host: PathBuf,
    /// In the guest (absolute).
    pub guest: String,
}

impl std::str::FromStr for CopySpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (host, guest) = text
            .split_once(':')
            .ok_or_else(|| format!("'{text}' is not HOST:GUEST"))?;
        if host.is_empty() {
            return Err(format!("'{text}' names no host path"));
        }
        if !guest.starts_with('/') {
            return Err(format!("the guest path '{guest}' is not absolute"));
        }
        if guest.split('/').any(|part| part == "..") {
            return Err(format!("the guest path '{guest}' contains '..'"));
        }
        Ok(Self {
            host: PathBuf::from(host),
            guest: guest.to_string(),
        })
    }
}

/// The archive, ready to load: an unlinked memfd (`/proc/self/fd/N` names it) and its length.
pub struct Initramfs {
    /// The memfd; keep it open until the VM is built.
    pub file: File,
    /// Its length in bytes.
    pub length: u64,
    /// Whether a busybox went in.
    pub busybox: Option<PathBuf>,
}

impl Initramfs {
    /// A path the kernel loader can open.
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Assembles the initramfs for `spec`, with `copies` at their guest paths (or staged under
/// [`COPY_STAGING`] when the command runs in a root disk, which has its own busybox or not).
pub fn build(spec: &CommandSpec, copies: &[CopySpec]) -> Result<Initramfs, RunError> {
    let memfd = create_memfd()?;
    let mut archive = CpioWriter::new(BufWriter::with_capacity(1 << 20, memfd));
    let io = |what: &str| {
        let what = what.to_string();
        move |err: std::io::Error| RunError::Initramfs(format!("{what}: {err}"))
    };
    archive.file("init", 0o755, KILN_INIT).map_err(io("init"))?;
    for dir in ["dev", "proc", "sys", "tmp", "root", "kiln"] {
        archive.directory(dir, 0o755).map_err(io(dir))?;
    }
    archive
        .char_device("dev/console", 0o600, 5, 1)
        .map_err(io("dev/console"))?;
    let encoded = spec
        .encode()
        .map_err(|err| RunError::Usage(err.to_string()))?;
    archive
        .file(SPEC_PATH, 0o644, &encoded)
        .map_err(io(SPEC_PATH))?;
    let busybox = if spec.root.is_none() {
        find_static_busybox()
    } else {
        None
    };
    if let Some(path) = &busybox {
        add_busybox(&mut archive, path)?;
    }
    for copy in copies {
        let guest = match spec.root {
            Some(_) => format!("{COPY_STAGING}{}", copy.guest),
            None => copy.guest.clone(),
        };
        add_tree(&mut archive, &copy.host, &guest)?;
    }
    let (writer, length) = archive.finish().map_err(io("finishing the archive"))?;
    let file = writer
        .into_inner()
        .map_err(|err| RunError::Initramfs(format!("writing the archive: {}", err.error())))?;
    Ok(Initramfs {
        file,
        length,
        busybox,
    })
}

fn create_memfd() -> Result<File, RunError> {
    let name = CString::new("kiln-initramfs").expect("no NUL");
    // SAFETY: a NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(RunError::Initramfs(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A statically linked busybox on this host, if there is one: the guest has no libc.
pub fn find_static_busybox() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("busybox"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    BUSYBOX_PLACES
        .iter()
        .map(PathBuf::from)
        .chain(on_path)
        .find(|path| is_static_elf(path))
}

/// True for an x86-64 ELF executable without a program interpreter (`PT_INTERP`).
fn is_static_elf(path: &Path) -> bool {
    let mut head = vec![0u8; 4096];
    let Ok(mut file) = File::open(path) else {
        return false;
    };
    let Ok(read) = file.read(&mut head) else {
        return false;
    };
    head.truncate(read);
    elf_is_static(&head)
}

/// `head` is the start of an ELF64 little-endian file whose program headers are all in it.
fn elf_is_static(head: &[u8]) -> bool {
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (entry_size, count) = (u16_at(0x36), u16_at(0x38));
    if entry_size < 4 || count == 0 {
        return false;
    }
    (0..count).all(|index| {
        let at = phoff.saturating_add(index * entry_size);
        match head.get(at..at + 4) {
            Some(kind) => u32::from_le_bytes(kind.try_into().expect("4 bytes")) != 3,
            None => false,
        }
    })
}

fn add_busybox<W: std::io::Write>(
    archive: &mut CpioWriter<W>,
    path: &Path,
) -> Result<(), RunError> {
    let binary = fs::read(path)
        .map_err(|err| RunError::Initramfs(format!("reading {}: {err}", path.display())))?;
    archive
        .file("bin/busybox", 0o755, &binary)
        .map_err(|err| RunError::Initramfs(format!("bin/busybox: {err}")))?;
    let applets = std::process::Command::new(path)
        .arg("--list")
        .output()
        .map_err(|err| RunError::Initramfs(format!("{} --list: {err}", path.display())))?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" || applet == "init" {
            continue;
        }
        archive
            .symlink(&format!("bin/{applet}"), b"busybox")
            .map_err(|err| RunError::Initramfs(format!("bin/{applet}: {err}")))?;
    }
    Ok(())
}

/// Adds the host file, symlink or directory (recursively) at `host` as `guest`.
fn add_tree<W: std::io::Write>(
    archive: &mut CpioWriter<W>,
    host: &Path,
    guest: &str,
) -> Result<(), RunError> {
    let copy_error = |err: std::io::Error| RunError::Copy(host.to_path_buf(), err.to_string());
    let metadata = fs::symlink_metadata(host).map_err(copy_error)?;
    let mode = metadata.permissions().mode() & 0o7777;
    let kind = metadata.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(host).map_err(copy_error)?;
        archive
            .symlink(guest, target.as_os_str().as_bytes())
            .map_err(copy_error)
    } else if kind.is_dir() {
        archive.directory(guest, mode).map_err(copy_error)?;
        let mut entries: Vec<_> = fs::read_dir(host)
            .map_err(copy_error)?
            .collect::<Result<_, _>>()
            .map_err(copy_error)?;
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name();
            let name = name
                .to_str()
                .ok_or_else(|| RunError::Copy(entry.path(), "the name is not UTF-8".to_string()))?;
            add_tree(archive, &entry.path(), &format!("{guest}/{name}"))?;
        }
        Ok(())
    } else if kind.is_file() {
        let data = fs::read(host).map_err(copy_error)?;
        archive.file(guest, mode, &data).map_err(copy_error)
    } else {
        Err(RunError::Copy(
            host.to_path_buf(),
            "not a regular file, directory or symlink".to_string(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_specs_need_an_absolute_guest_path() {
        let spec: CopySpec = "data/x.txt:/opt/x.txt".parse().unwrap();
        assert_eq!(spec.host, PathBuf::from("data/x.txt"));
        assert_eq!(spec.guest, "/opt/x.txt");
        for bad in ["x.txt", ":/x", "x:relative", "x:/a/../b"] {
            assert!(bad.parse::<CopySpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn static_elf_detection_reads_the_program_headers() {
        assert!(!elf_is_static(b"#!/bin/sh\n"));
        let kiln_init_is_static = elf_is_static(&KILN_INIT[..4096.min(KILN_INIT.len())]);
        assert!(kiln_init_is_static, "the embedded kiln-init must be static");
        let this = fs::read("/proc/self/exe").unwrap();
        assert!(
            !elf_is_static(&this[..4096]),
            "the test binary is dynamically linked"
        );
    }

    #[test]
    fn missing_copy_sources_are_reported_with_their_path() {
        let spec = CommandSpec {
            argv: vec!["true".into()],
            ..CommandSpec::default()
        };
        let copies = [CopySpec {
            host: PathBuf::from("/nonexistent/kiln-copy"),
            guest: "/x".into(),
        }];
        match build(&spec, &copies) {
            Err(RunError::Copy(path, why)) => {
                assert_eq!(path, PathBuf::from("/nonexistent/kiln-copy"));
                assert!(why.contains("No such file"), "{why}");
            }
            other => panic!("expected a copy error, got {:?}", other.map(|i| i.length)),
        }
    }
}
