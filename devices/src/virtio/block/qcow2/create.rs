//! New qcow2 images: a copy-on-write overlay over a base image (`kiln image create`), or an
//! empty image. Version 3, 16-bit refcounts and (unless asked otherwise) 64 KiB clusters, as
//! `qemu-img create` makes them.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use super::open::resolve_backing;
use crate::virtio::block::disk::{DiskError, DiskFormat, DiskImage};

/// 64 KiB clusters, QEMU's default.
pub const DEFAULT_CLUSTER_BITS: u32 = 16;
const HEADER_LENGTH: usize = 112;
const BACKING_FORMAT_EXTENSION: u32 = 0xe279_2aca;

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct OverlayOptions {
    /// The base image, as it will be recorded: absolute, or relative to the new image's
    /// directory (as with `qemu-img create -b`).
    pub backing: Option<PathBuf>,
    /// The base image's format; detected from its contents when not given (and then a qcow2
    /// base that names a backing file of its own is refused, as `kiln run` does).
    pub backing_format: Option<DiskFormat>,
    /// Virtual size in bytes; the base image's size when not given.
    pub size: Option<u64>,
    /// log2 of the cluster size, 9 to 21; [`DEFAULT_CLUSTER_BITS`] when not given.
    pub cluster_bits: Option<u32>,
}

/// Why an image could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The target exists already.
    #[error("'{0}' exists already; Kiln does not overwrite images")]
    Exists(PathBuf),
    /// Writing the new image failed.
    #[error("cannot write '{path}': {source}")]
    Io {
        /// The new image.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The base image cannot be used.
    #[error("base image: {0}")]
    Backing(#[from] DiskError),
    /// Neither a size nor a base image.
    #[error("give a size or a base image")]
    NoSize,
    /// A size Kiln cannot make.
    #[error("size {0} is not a positive multiple of 512 bytes, or too large")]
    Size(u64),
    /// A cluster size out of range.
    #[error("cluster_bits {0} is out of range (9 to 21)")]
    ClusterBits(u32),
    /// The base image's name does not fit the header.
    #[error("the base image name is longer than {MAX_BACKING_NAME} bytes or than the header cluster has room for")]
    BackingName,
}

/// Creates the qcow2 image `path` as `options` say; returns its virtual size.
pub fn create_overlay(path: &Path, options: &OverlayOptions) -> Result<u64, CreateError> {
    let base_size = match &options.backing {
        Some(backing) => {
            if backing.as_os_str().len() > MAX_BACKING_NAME as usize {
                return Err(CreateError::BackingName);
            }
            let resolved = resolve_backing(path, backing);
            let base = DiskImage::open_as(&resolved, true, Some("base"), options.backing_format)?;
            Some((base.size(), base.format()))
        }
        None => None,
    };
    let size = options
        .size
        .or(base_size.map(|(size, _)| size))
        .ok_or(CreateError::NoSize)?;
    let cluster_bits = options.cluster_bits.unwrap_or(DEFAULT_CLUSTER_BITS);
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(CreateError::ClusterBits(cluster_bits));
    }
    let cluster_size = 1u64 << cluster_bits;
    let l2_coverage = cluster_size * (cluster_size / 8);
    let l1_entries = size.div_ceil(l2_coverage);
    let l1_clusters = (l1_entries * 8).div_ceil(cluster_size).max(1);
    let used_clusters = 3 + l1_clusters;
    // One refcount block (16-bit refcounts) must count every cluster made here.
    let fits = used_clusters <= cluster_size / 2 && l1_entries * 8 <= MAX_L1_BYTES;
    if size == 0 || !size.is_multiple_of(512) || !fits {
        return Err(CreateError::Size(size));
    }
    let reftable_offset = cluster_size;
    let refblock_offset = 2 * cluster_size;
    let l1_offset = 3 * cluster_size;

    let mut header = vec![0u8; cluster_size as usize];
    let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC);
    put(4, &3u32.to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &size.to_be_bytes());
    put(36, &(l1_entries as u32).to_be_bytes());
    put(40, &l1_offset.to_be_bytes());
    put(48, &reftable_offset.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &(HEADER_LENGTH as u32).to_be_bytes());
    let mut at = HEADER_LENGTH;
    if let (Some(backing), Some((_, format))) = (&options.backing, base_size) {
        let format = match format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        put(at, &BACKING_FORMAT_EXTENSION.to_be_bytes());
        put(at + 4, &(format.len() as u32).to_be_bytes());
        put(at + 8, format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
        // The end-of-extensions marker is the 8 zero bytes already there.
        at += 8;
        let name = backing.as_os_str().as_bytes();
        if at + name.len() > cluster_size as usize {
            return Err(CreateError::BackingName);
        }
        put(8, &(at as u64).to_be_bytes());
        put(16, &(name.len() as u32).to_be_bytes());
        put(at, name);
    }

    let io_error = |source| CreateError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|err| match err.kind() {
            io::ErrorKind::AlreadyExists => CreateError::Exists(path.to_path_buf()),
            _ => io_error(err),
        })?;
    let mut refblock = vec![0u8; cluster_size as usize];
    for cluster in 0..used_clusters as usize {
        refblock[cluster * 2..cluster * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.set_len(used_clusters * cluster_size)
        .and_then(|()| file.write_all_at(&header, 0))
        .and_then(|()| file.write_all_at(&refblock_offset.to_be_bytes(), reftable_offset))
        .and_then(|()| file.write_all_at(&refblock, refblock_offset))
        .and_then(|()| file.sync_all())
        .map_err(|err| {
            // Half an image is no image.
            let _ = std::fs::remove_file(path);
            io_error(err)
        })?;
    Ok(size)
}
