//! qcow2 tests against images made and checked by QEMU's own tools (`qemu-img`, `qemu-io`
//! from Debian's qemu-utils): what QEMU writes Kiln reads, what Kiln writes QEMU reads, and
//! `qemu-img check` finds every image Kiln leaves consistent.

mod bad_input;
mod consistency;
mod data;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::io::buffer_slice;
use super::Qcow2Image;
use crate::virtio::block::disk::{DiskError, DiskFormat, DiskImage};

/// A directory for one test's images, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-qcow2-{}-{}-{name}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(tool: &str, args: &[&OsStr]) -> Vec<u8> {
    let output = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|err| {
            panic!("cannot run {tool} ({err}); these tests need Debian's qemu-utils")
        });
    assert!(
        output.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Runs `qemu-img` with `args` (each a string or a path); panics with its message on failure.
pub fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> String {
    let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
    String::from_utf8_lossy(&run("qemu-img", &args)).into_owned()
}

/// Runs one `qemu-io` command on a qcow2 image.
pub fn qemu_io(image: &Path, command: &str) {
    run(
        "qemu-io",
        &[
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-c"),
            OsStr::new(command),
            image.as_os_str(),
        ],
    );
}

/// What `qemu-img check` says.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub allocated_clusters: u64,
}

pub fn check(image: &Path) -> CheckReport {
    let output = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(image)
        .output()
        .expect("cannot run qemu-img (Debian's qemu-utils)");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "qemu-img check gave no report ({err}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let field = |name: &str| json.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    CheckReport {
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        allocated_clusters: field("allocated-clusters"),
    }
}

/// Asserts `qemu-img check` finds no corruption and at most `max_leaks` leaked clusters.
pub fn assert_consistent(image: &Path, max_leaks: u64) -> CheckReport {
    let report = check(image);
    assert_eq!(report.corruptions, 0, "{}: {report:?}", image.display());
    assert_eq!(report.check_errors, 0, "{}: {report:?}", image.display());
    assert!(report.leaks <= max_leaks, "{}: {report:?}", image.display());
    report
}

/// The guest-visible contents of an image, by `qemu-img convert`.
pub fn contents(image: &Path) -> Vec<u8> {
    let out = image.with_extension("converted.raw");
    qemu_img(&[
        OsStr::new("convert"),
        OsStr::new("-O"),
        OsStr::new("raw"),
        image.as_os_str(),
        out.as_os_str(),
    ]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

/// Deterministic bytes that differ per seed and position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Compressible bytes: runs of a few values.
pub fn compressible(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / 37) % 11) as u8).collect()
}

/// Opens `path` as qcow2 through [`DiskImage`] (locks and all).
pub fn open(path: &Path, readonly: bool) -> DiskImage {
    DiskImage::open_as(path, readonly, Some("test"), Some(DiskFormat::Qcow2))
        .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()))
}

/// The error opening `path` gives.
pub fn open_error(path: &Path, readonly: bool, format: Option<DiskFormat>) -> DiskError {
    match DiskImage::open_as(path, readonly, Some("test"), format) {
        Ok(_) => panic!("{} opened, but should have been refused", path.display()),
        Err(err) => err,
    }
}

pub fn qcow2(disk: &DiskImage) -> &Qcow2Image {
    disk.qcow2().expect("a qcow2 disk")
}

pub fn read(image: &Qcow2Image, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image
        .read(&[buffer_slice(&mut buf)], offset)
        .unwrap_or_else(|err| panic!("read of {len} bytes at {offset}: {err}"));
    buf
}

pub fn write(image: &Qcow2Image, offset: u64, data: &[u8]) {
    let mut copy = data.to_vec();
    image
        .write(&[buffer_slice(&mut copy)], offset)
        .unwrap_or_else(|err| panic!("write of {} bytes at {offset}: {err}", data.len()));
}

/// A big-endian u64 of a file.
pub fn peek_u64(path: &Path, offset: u64) -> u64 {
    let mut bytes = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut bytes, offset)
        .unwrap();
    u64::from_be_bytes(bytes)
}

/// Overwrites a big-endian u64 of a file.
pub fn poke_u64(path: &Path, offset: u64, value: u64) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_be_bytes(), offset).unwrap();
}

/// Overwrites a big-endian u32 of a file.
pub fn poke_u32(path: &Path, offset: u64, value: u32) {
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_be_bytes(), offset).unwrap();
}

/// Host offset of the L2 table of L1 entry `index`.
pub fn l2_table_offset(path: &Path, index: u64) -> u64 {
    let l1 = peek_u64(path, 40);
    peek_u64(path, l1 + index * 8) & super::entry::OFFSET_MASK
}

/// `qemu-img create -f qcow2 [-o OPTIONS] [-b BACKING -F FORMAT] PATH [SIZE]`.
pub fn create(path: &Path, options: &str, backing: Option<(&str, &str)>, size: Option<&str>) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if !options.is_empty() {
        args.extend(["-o".into(), options.into()]);
    }
    if let Some((name, format)) = backing {
        args.extend(["-b".into(), name.into(), "-F".into(), format.into()]);
    }
    args.push(path.to_string_lossy().into_owned());
    if let Some(size) = size {
        args.push(size.into());
    }
    qemu_img(&args);
}

/// `qemu-img convert -O qcow2 [-c] [-o OPTIONS] RAW PATH`.
pub fn convert_to_qcow2(raw: &Path, path: &Path, options: &str, compress: bool) {
    let mut args: Vec<String> = vec!["convert".into(), "-q".into(), "-O".into(), "qcow2".into()];
    if compress {
        args.push("-c".into());
    }
    if !options.is_empty() {
        args.extend(["-o".into(), options.into()]);
    }
    args.push(raw.to_string_lossy().into_owned());
    args.push(path.to_string_lossy().into_owned());
    qemu_img(&args);
}
