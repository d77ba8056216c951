//! A disk image (a regular file or a block device): opened, locked and checked before the
//! guest starts. Raw images are read and written with `pread`/`pwrite` straight between the
//! file and guest memory; qcow2 images go through [`Qcow2Image`], which does the same for
//! allocated clusters.

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

use super::qcow2::{open_image, BackingPolicy, Qcow2Error, Qcow2Image};
use super::request::Segment;
use super::{ID_BYTES, SECTOR_SIZE};

/// How an image file stores the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// Byte for byte.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// The name used in `--disk format=` and configs.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!(
                "unknown disk format '{other}'; expected raw or qcow2"
            )),
        }
    }
}

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
    /// A qcow2 image Kiln cannot use.
    #[error("'{path}': {source}")]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        source: Box<Qcow2Error>,
    },
}

/// Where a disk's data is.
#[derive(Debug)]
enum Backend {
    /// A raw file: guest sector N is at byte N * 512.
    Raw(File),
    /// A qcow2 image.
    Qcow2(Box<Qcow2Image>),
}

/// An open, locked disk image.
#[derive(Debug)]
pub struct DiskImage {
    backend: Backend,
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
    /// derived from the file name). The format is detected: see [`DiskImage::open_as`].
    pub fn open(path: &Path, readonly: bool, id: Option<&str>) -> Result<Self, DiskError> {
        Self::open_as(path, readonly, id, None)
    }

    /// [`DiskImage::open`] with the format given, or detected when None: an image that starts
    /// with the qcow2 magic is qcow2, anything else raw. A detected qcow2 image that names a
    /// backing file is refused: its first bytes may be what a guest wrote to a raw disk, and
    /// Kiln must not open host files a guest named.
    pub fn open_as(
        path: &Path,
        readonly: bool,
        id: Option<&str>,
        format: Option<DiskFormat>,
    ) -> Result<Self, DiskError> {
        let id = match id {
            Some(id) if id.len() > ID_BYTES => return Err(DiskError::IdTooLong(id.to_string())),
            Some(id) => id.as_bytes().to_vec(),
            None => default_id(path),
        };
        let (file, size) = open_locked(path, readonly)?;
        let detected = match format {
            Some(format) => format,
            None => detect(&file).map_err(|source| DiskError::Unreadable {
                path: path.to_path_buf(),
                source,
            })?,
        };
        let (backend, bytes) = match detected {
            DiskFormat::Raw => {
                if size == 0 {
                    return Err(DiskError::Empty(path.to_path_buf()));
                }
                if !size.is_multiple_of(SECTOR_SIZE) {
                    return Err(DiskError::NotSectorMultiple {
                        path: path.to_path_buf(),
                        size,
                    });
                }
                (Backend::Raw(file), size)
            }
            DiskFormat::Qcow2 => {
                let policy = if format.is_some() {
                    BackingPolicy::Follow
                } else {
                    BackingPolicy::Refuse
                };
                let image = open_image(file, path, size, readonly, policy).map_err(|source| {
                    DiskError::Qcow2 {
                        path: path.to_path_buf(),
                        source: Box::new(source),
                    }
                })?;
                let bytes = image.size();
                (Backend::Qcow2(Box::new(image)), bytes)
            }
        };
        let mut padded = [0u8; ID_BYTES];
        padded[..id.len()].copy_from_slice(&id);
        Ok(Self {
            backend,
            path: path.to_path_buf(),
            sectors: bytes / SECTOR_SIZE,
            readonly,
            id: padded,
            write_through: AtomicBool::new(false),
            stats: Arc::default(),
        })
    }

    /// The image's format.
    pub fn format(&self) -> DiskFormat {
        match self.backend {
            Backend::Raw(_) => DiskFormat::Raw,
            Backend::Qcow2(_) => DiskFormat::Qcow2,
        }
    }

    /// The qcow2 image, if the disk is one.
    pub fn qcow2(&self) -> Option<&Qcow2Image> {
        match &self.backend {
            Backend::Qcow2(image) => Some(image),
            Backend::Raw(_) => None,
        }
    }

    /// Whether discard and write-zeroes are offered: the format does them in its metadata
    /// (qcow2 version 3 zero clusters) on a writable disk.
    pub fn supports_discard(&self) -> bool {
        self.qcow2()
            .is_some_and(|image| image.supports_zero_clusters())
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
        match &self.backend {
            Backend::Raw(file) => {
                let mut offset = offset;
                for slice in guest_slices(memory, addr, len)? {
                    pread_exact(file, &slice, offset)?;
                    offset += slice.len() as u64;
                }
                Ok(())
            }
            Backend::Qcow2(image) => image.read(&guest_slices(memory, addr, len)?, offset),
        }
    }

    /// Writes `len` bytes of guest memory at `addr` to byte `offset` of the image.
    pub fn write_from_guest(
        &self,
        memory: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(file) => {
                let mut offset = offset;
                for slice in guest_slices(memory, addr, len)? {
                    pwrite_all(file, &slice, offset)?;
                    offset += slice.len() as u64;
                }
                Ok(())
            }
            Backend::Qcow2(image) => image.write(&guest_slices(memory, addr, len)?, offset),
        }
    }

    /// Reads the disk from byte `offset` into `segments` of guest memory, in order.
    pub fn read_segments(
        &self,
        memory: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(_) => {
                let mut offset = offset;
                for segment in segments {
                    self.read_to_guest(memory, segment.addr, segment.len as usize, offset)?;
                    offset += u64::from(segment.len);
                }
                Ok(())
            }
            // One call for the whole request: clusters are looked up (and allocated) once.
            Backend::Qcow2(image) => image.read(&segment_slices(memory, segments)?, offset),
        }
    }

    /// Writes `segments` of guest memory, in order, to the disk from byte `offset`.
    pub fn write_segments(
        &self,
        memory: &GuestMemoryMmap,
        segments: &[Segment],
        offset: u64,
    ) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(_) => {
                let mut offset = offset;
                for segment in segments {
                    self.write_from_guest(memory, segment.addr, segment.len as usize, offset)?;
                    offset += u64::from(segment.len);
                }
                Ok(())
            }
            Backend::Qcow2(image) => image.write(&segment_slices(memory, segments)?, offset),
        }
    }

    /// Makes `len` bytes at `offset` read as zeros (`unmap`: their space may be freed).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
            Backend::Qcow2(image) => image.write_zeroes(offset, len, unmap),
        }
    }

    /// Frees the space of `len` bytes at `offset` where the format can.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.backend {
            Backend::Raw(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
            Backend::Qcow2(image) => image.discard(offset, len),
        }
    }

    /// Makes written data durable (`fdatasync`; for qcow2, metadata included).
    pub fn flush(&self) -> io::Result<()> {
        self.stats.flush_count.fetch_add(1, Ordering::Relaxed);
        match &self.backend {
            Backend::Raw(file) => file.sync_data(),
            Backend::Qcow2(image) => image.flush(),
        }
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

/// Every segment's host mappings, in order.
fn segment_slices<'m>(
    memory: &'m GuestMemoryMmap,
    segments: &[Segment],
) -> io::Result<Vec<GuestSlice<'m>>> {
    let mut slices = Vec::with_capacity(segments.len());
    for segment in segments {
        slices.extend(guest_slices(memory, segment.addr, segment.len as usize)?);
    }
    Ok(slices)
}

/// The format an image's first bytes suggest.
fn detect(file: &File) -> io::Result<DiskFormat> {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(if super::qcow2::header::has_magic(&magic[..got]) {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    })
}

/// Opens `path` (a regular file or a block device) read-write or read-only and locks it
/// (exclusive, or shared); returns the file and its size.
pub(crate) fn open_locked(path: &Path, readonly: bool) -> Result<(File, u64), DiskError> {
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
    Ok((file, size))
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
    if pread_until_eof(file, slice, offset)? < slice.len() {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

/// `pread` into `slice` until it is full or the file ends; returns the bytes read.
pub(crate) fn pread_until_eof(
    file: &File,
    slice: &GuestSlice<'_>,
    offset: u64,
) -> io::Result<usize> {
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
        // vm-memory guarantees is mapped memory for the slice's lifetime; the kernel writes
        // into it like a DMA engine would, so no Rust reference to it exists.
        let ret = unsafe {
            libc::pread(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                slice.len() - done,
                file_offset,
            )
        };
        match ret {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(done)
}

/// `pwrite` all of `slice`.
pub(crate) fn pwrite_all(file: &File, slice: &GuestSlice<'_>, offset: u64) -> io::Result<()> {
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
#[path = "disk_tests.rs"]
mod tests;
