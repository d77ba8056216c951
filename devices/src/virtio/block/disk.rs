//! A raw disk image (a regular file or a block device): opened, locked and checked before the
//! guest starts, then read and written with `pread`/`pwrite` straight between it and guest
//! memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BS};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use kiln_arch::GuestMemoryMmap;

use super::{ID_BYTES, SECTOR_SIZE};

/// Why a disk image cannot be used. The messages name the file and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Nothing at the path.
    #[error("'{0}' does not exist")]
    NotFound(PathBuf),
    /// The path is a directory.
    #[error("'{0}' is a directory, not a disk image")]
    Directory(PathBuf),
    /// The path is a character device, socket, FIFO...
    #[error("'{0}' is neither a regular file nor a block device")]
    NotRegularFile(PathBuf),
    /// The file could not be opened for writing.
    #[error("cannot open '{path}' for writing: {source}; add 'readonly' to attach it read-only")]
    NotWritable {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file could not be opened or examined.
    #[error("cannot read '{path}': {source}")]
    Unreadable {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is empty.
    #[error("'{0}' is empty; a disk image needs at least one 512-byte sector")]
    Empty(PathBuf),
    /// The file size is not a whole number of sectors.
    #[error("'{path}' is {size} bytes, which is not a multiple of the 512-byte sector size (resize it, e.g. with `truncate -s`)")]
    NotSectorMultiple {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// Another process holds a conflicting lock.
    #[error(
        "'{0}' is in use by another process (another Kiln?); a read-write disk needs it to itself"
    )]
    InUse(PathBuf),
    /// Another process holds a conflicting lock on a file wanted read-only.
    #[error("'{0}' is attached read-write by another process (another Kiln?)")]
    InUseReadWrite(PathBuf),
    /// Locking failed for another reason.
    #[error("cannot lock '{path}': {source}")]
    Lock {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The serial given is too long.
    #[error("disk id '{0}' is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
}

/// An open, locked raw disk image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    write_through: AtomicBool,
    stats: Arc<DiskStats>,
}

/// Request counters of a disk, shared with whoever reports them (they outlive the image when
/// it is replaced, see [`DiskImage::with_stats`]).
#[derive(Debug, Default)]
pub struct DiskStats {
    read_count: AtomicU64,
    read_bytes: AtomicU64,
    write_count: AtomicU64,
    write_bytes: AtomicU64,
    flush_count: AtomicU64,
}

/// [`DiskStats`] read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskTotals {
    /// Read requests completed.
    pub read_count: u64,
    /// Bytes read into the guest.
    pub read_bytes: u64,
    /// Write requests completed.
    pub write_count: u64,
    /// Bytes written from the guest.
    pub write_bytes: u64,
    /// `fdatasync`s (guest flushes and write-through writes).
    pub flush_count: u64,
}

impl DiskStats {
    /// A read request of `bytes` completed.
    pub fn record_read(&self, bytes: u64) {
        self.read_count.fetch_add(1, Ordering::Relaxed);
        self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A write request of `bytes` completed.
    pub fn record_write(&self, bytes: u64) {
        self.write_count.fetch_add(1, Ordering::Relaxed);
        self.write_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> DiskTotals {
        DiskTotals {
            read_count: self.read_count.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            write_count: self.write_count.load(Ordering::Relaxed),
            write_bytes: self.write_bytes.load(Ordering::Relaxed),
            flush_count: self.flush_count.load(Ordering::Relaxed),
        }
    }
}

/// The serial number Kiln gives a disk without an explicit id: its file name, cut to
/// [`ID_BYTES`].
pub fn default_id(path: &Path) -> Vec<u8> {
    let name = path
        .file_name()
        .map(|name| name.as_encoded_bytes().to_vec())
        .unwrap_or_else(|| path.as_os_str().as_encoded_bytes().to_vec());
    name.into_iter().take(ID_BYTES).collect()
}

impl DiskImage {
    /// Opens the image at `path` (a regular file or a block device) read-write (or read-only),
    /// takes an advisory lock on it (exclusive for read-write, shared for read-only) and checks
    /// its size. `id` is the serial reported to the guest (at most [`ID_BYTES`] bytes; None:
    /// derived from the file name).
    pub fn open(path: &Path, readonly: bool, id: Option<&str>) -> Result<Self, DiskError> {
        let id = match id {
            Some(id) if id.len() > ID_BYTES => return Err(DiskError::IdTooLong(id.to_string())),
            Some(id) => id.as_bytes().to_vec(),
            None => default_id(path),
        };
        let unreadable = |source| DiskError::Unreadable {
            path: path.to_path_buf(),
            source,
        };
        let block_device = match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Err(DiskError::Directory(path.to_path_buf())),
            Ok(meta) if meta.is_file() => false,
            Ok(meta) if meta.file_type().is_block_device() => true,
            Ok(_) => return Err(DiskError::NotRegularFile(path.to_path_buf())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(DiskError::NotFound(path.to_path_buf()))
            }
            Err(err) => return Err(unreadable(err)),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| {
                if readonly {
                    unreadable(source)
                } else {
                    DiskError::NotWritable {
                        path: path.to_path_buf(),
                        source,
                    }
                }
            })?;
        lock(&file, path, readonly)?;
        let size = if block_device {
            // A block device's metadata says 0 bytes; its end is its size.
            (&file).seek(SeekFrom::End(0)).map_err(unreadable)?
        } else {
            file.metadata().map_err(unreadable)?.len()
        };
        if size == 0 {
            return Err(DiskError::Empty(path.to_path_buf()));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::NotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let mut padded = [0u8; ID_BYTES];
        padded[..id.len()].copy_from_slice(&id);
        Ok(Self {
            file,
            path: path.to_path_buf(),
            sectors: size / SECTOR_SIZE,
            readonly,
            id: padded,
            write_through: AtomicBool::new(false),
            stats: Arc::default(),
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Whether the guest may only read.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// The serial, NUL-padded to [`ID_BYTES`].
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Reads `len` bytes at byte `offset` of the image into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        memory: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        for slice in guest_slices(memory, addr, len)? {
            pread_exact(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to byte `offset` of the image.
    pub fn write_from_guest(
        &self,
        memory: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        for slice in guest_slices(memory, addr, len)? {
            pwrite_all(&self.file, &slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Makes written data durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.stats.flush_count.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data()
    }

    /// Whether every write must be durable before it completes (the driver has no FLUSH).
    pub fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Acquire)
    }

    /// Sets write-through mode, from the features the driver negotiated.
    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Release);
    }

    /// How many times the image was made durable (guest flushes and write-through writes).
    pub fn flush_count(&self) -> u64 {
        self.stats.flush_count.load(Ordering::Relaxed)
    }

    /// The disk's request counters.
    pub fn stats(&self) -> &Arc<DiskStats> {
        &self.stats
    }

    /// Counts into `stats` from now on (an image that replaces another keeps its counters).
    pub fn with_stats(mut self, stats: Arc<DiskStats>) -> Self {
        self.stats = stats;
        self
    }
}

/// A piece of guest memory with its dirty-page bitmap.
type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// The host mappings of `addr..addr + len`, all of them or an error: no I/O starts on a range
/// that is only partly guest memory.
fn guest_slices(
    memory: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> io::Result<Vec<GuestSlice<'_>>> {
    memory
        .get_slices(addr, len)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))
}

fn lock(file: &File, path: &Path, readonly: bool) -> Result<(), DiskError> {
    let operation = if readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    let ret = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) if readonly => Err(DiskError::InUseReadWrite(path.to_path_buf())),
        Some(libc::EWOULDBLOCK) => Err(DiskError::InUse(path.to_path_buf())),
        _ => Err(DiskError::Lock {
            path: path.to_path_buf(),
            source: err,
        }),
    }
}

/// `pread` until `slice` is full; end of file is an error (the image shrank under us).
fn pread_exact(file: &File, slice: &GuestSlice<'_>, offset: u64) -> io::Result<()> {
    // The kernel writes guest memory behind vm-memory's back: record it for diff snapshots.
    slice.bitmap().mark_dirty(0, slice.len());
    let guard = slice.ptr_guard_mut();
    let mut done = 0usize;
    while done < slice.len() {
        let file_offset = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the pointer and length describe the part of `slice` not yet filled, which
        // vm-memory guarantees is mapped guest memory for the slice's lifetime; the kernel
        // writes into it like a DMA engine would, so no Rust reference to it exists.
        let ret = unsafe {
            libc::pread(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset,
            )
        };
        match ret {
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// `pwrite` all of `slice`.
fn pwrite_all(file: &File, slice: &GuestSlice<'_>, offset: u64) -> io::Result<()> {
    let guard = slice.ptr_guard();
    let mut done = 0usize;
    while done < slice.len() {
        let file_offset = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the pointer and length describe the part of `slice` not yet written, which
        // vm-memory guarantees is mapped guest memory for the slice's lifetime; the kernel only
        // reads from it.
        let ret = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset,
            )
        };
        match ret {
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::test_utils::{guest_memory, TempImage};
    use vm_memory::Bytes;

    #[test]
    fn opens_and_reports_geometry_and_id() {
        let image = TempImage::new("geometry", 4096);
        let disk = DiskImage::open(image.path(), false, Some("serial-1")).unwrap();
        assert_eq!(disk.sectors(), 8);
        assert_eq!(disk.size(), 4096);
        assert!(!disk.readonly());
        assert_eq!(&disk.id()[..9], b"serial-1\0");
        assert_eq!(disk.id()[8..], [0u8; 12]);
    }

    #[test]
    fn default_id_is_the_file_name_cut_to_20_bytes() {
        assert_eq!(default_id(Path::new("/images/rootfs.ext4")), b"rootfs.ext4");
        assert_eq!(
            default_id(Path::new("/a/debian-bookworm-rootfs-amd64.ext4")),
            b"debian-bookworm-root"
        );
        let image = TempImage::new("derived-id", 512);
        let disk = DiskImage::open(image.path(), true, None).unwrap();
        let expected = default_id(image.path());
        assert_eq!(&disk.id()[..expected.len()], &expected[..]);
    }

    #[test]
    fn refuses_bad_images_with_clear_errors() {
        let dir = std::env::temp_dir();
        let missing = dir.join(format!("kiln-no-such-image-{}", std::process::id()));
        let err = DiskImage::open(&missing, false, None).unwrap_err();
        assert!(matches!(err, DiskError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("does not exist"));

        let err = DiskImage::open(&dir, true, None).unwrap_err();
        assert!(matches!(err, DiskError::Directory(_)), "{err}");

        // A character device.
        let err = DiskImage::open(Path::new("/dev/null"), true, None).unwrap_err();
        assert!(matches!(err, DiskError::NotRegularFile(_)), "{err}");

        let empty = TempImage::new("empty", 0);
        let err = DiskImage::open(empty.path(), false, None).unwrap_err();
        assert!(matches!(err, DiskError::Empty(_)), "{err}");

        let odd = TempImage::new("odd", 1000);
        let err = DiskImage::open(odd.path(), false, None).unwrap_err();
        assert!(
            matches!(err, DiskError::NotSectorMultiple { size: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1000 bytes"));

        let err =
            DiskImage::open(odd.path(), false, Some("a-serial-that-is-too-long")).unwrap_err();
        assert!(matches!(err, DiskError::IdTooLong(_)), "{err}");
    }

    /// A loop device over a temporary image, detached on drop.
    struct LoopDevice {
        device: PathBuf,
        _image: TempImage,
    }

    impl LoopDevice {
        /// None when this host cannot attach one (not root, no loop driver, no losetup).
        fn attach(size: u64) -> Option<Self> {
            let image = TempImage::new("loop", size);
            let output = std::process::Command::new("losetup")
                .args(["--find", "--show"])
                .arg(image.path())
                .output()
                .ok()?;
            if !output.status.success() {
                return None;
            }
            let device = String::from_utf8(output.stdout).ok()?.trim().to_string();
            Some(Self {
                device: PathBuf::from(device),
                _image: image,
            })
        }
    }

    impl Drop for LoopDevice {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("--detach")
                .arg(&self.device)
                .status();
        }
    }

    #[test]
    fn block_devices_are_disks_too() {
        let Some(device) = LoopDevice::attach(3 * 512 * 1024) else {
            eprintln!(
                "note: no loop device could be attached here; block device path not exercised"
            );
            return;
        };
        let disk = DiskImage::open(&device.device, false, None).unwrap();
        assert_eq!(disk.sectors(), 3 * 1024);
        assert_eq!(&disk.id()[..4], b"loop");
        let memory = guest_memory();
        memory
            .write_slice(&[0x5c; 4096], GuestAddress(0x1000))
            .unwrap();
        disk.write_from_guest(&memory, GuestAddress(0x1000), 4096, 512 * 1024)
            .unwrap();
        disk.flush().unwrap();
        disk.read_to_guest(&memory, GuestAddress(0x4000), 4096, 512 * 1024)
            .unwrap();
        let mut back = [0u8; 4096];
        memory.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
        assert_eq!(back, [0x5c; 4096]);
        let err = DiskImage::open(&device.device, true, None).unwrap_err();
        assert!(matches!(err, DiskError::InUseReadWrite(_)), "{err}");
    }

    #[test]
    fn read_write_locks_are_exclusive_and_read_only_locks_shared() {
        let image = TempImage::new("locks", 512);
        {
            let _writer = DiskImage::open(image.path(), false, None).unwrap();
            let err = DiskImage::open(image.path(), false, None).unwrap_err();
            assert!(matches!(err, DiskError::InUse(_)), "{err}");
            let err = DiskImage::open(image.path(), true, None).unwrap_err();
            assert!(matches!(err, DiskError::InUseReadWrite(_)), "{err}");
        }
        let _reader = DiskImage::open(image.path(), true, None).unwrap();
        let _second_reader = DiskImage::open(image.path(), true, None).unwrap();
        let err = DiskImage::open(image.path(), false, None).unwrap_err();
        assert!(matches!(err, DiskError::InUse(_)), "{err}");
    }

    #[test]
    fn read_only_images_are_opened_read_only() {
        let image = TempImage::new("ro-open", 512);
        let disk = DiskImage::open(image.path(), true, None).unwrap();
        let memory = guest_memory();
        memory
            .write_slice(&[0xaa; 512], GuestAddress(0x1000))
            .unwrap();
        // The descriptor itself refuses writes: proof the file was not opened for writing.
        let err = disk
            .write_from_guest(&memory, GuestAddress(0x1000), 512, 0)
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        assert_eq!(std::fs::read(image.path()).unwrap(), vec![0u8; 512]);
    }

    #[test]
    fn data_moves_between_file_and_guest_memory() {
        let image = TempImage::new("rw", 2048);
        let disk = DiskImage::open(image.path(), false, None).unwrap();
        let memory = guest_memory();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        memory.write_slice(&pattern, GuestAddress(0x2000)).unwrap();
        disk.write_from_guest(&memory, GuestAddress(0x2000), 1024, 512)
            .unwrap();
        disk.flush().unwrap();
        let on_disk = std::fs::read(image.path()).unwrap();
        assert_eq!(&on_disk[512..1536], &pattern[..]);
        assert_eq!(&on_disk[..512], &[0u8; 512][..]);

        disk.read_to_guest(&memory, GuestAddress(0x8000), 1024, 512)
            .unwrap();
        let mut back = vec![0u8; 1024];
        memory.read_slice(&mut back, GuestAddress(0x8000)).unwrap();
        assert_eq!(back, pattern);
    }

    #[test]
    fn reading_past_the_end_of_a_shrunk_file_fails() {
        let image = TempImage::new("shrunk", 1024);
        let disk = DiskImage::open(image.path(), false, None).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(image.path())
            .unwrap()
            .set_len(512)
            .unwrap();
        let memory = guest_memory();
        let err = disk
            .read_to_guest(&memory, GuestAddress(0x1000), 1024, 0)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn accesses_outside_guest_memory_fail_without_io() {
        let image = TempImage::new("outside", 1024);
        std::fs::write(image.path(), [0x5a; 1024]).unwrap();
        let disk = DiskImage::open(image.path(), false, None).unwrap();
        let memory = guest_memory();
        let end = crate::virtio::block::test_utils::MEMORY_SIZE;
        // Straddling the end of guest memory: the part inside is not touched either.
        let err = disk
            .read_to_guest(&memory, GuestAddress(end - 512), 1024, 0)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let mut tail = [0xffu8; 512];
        memory
            .read_slice(&mut tail, GuestAddress(end - 512))
            .unwrap();
        assert_eq!(tail, [0u8; 512]);
        memory
            .write_slice(&[1u8; 512], GuestAddress(end - 512))
            .unwrap();
        assert!(disk
            .write_from_guest(&memory, GuestAddress(end - 512), 1024, 0)
            .is_err());
        assert!(disk
            .write_from_guest(&memory, GuestAddress(end + 4096), 512, 0)
            .is_err());
        assert_eq!(std::fs::read(image.path()).unwrap(), vec![0x5a; 1024]);
    }
}
