//! Opening a qcow2 image: the header, the L1 and refcount tables (every entry checked), and the
//! backing chain (each file opened read-only, loops and over-long chains refused).

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::entry::decode_l1;
use super::header::{has_magic, Header, HeaderError, AUTOCLEAR_OFFSET, MAX_CLUSTER_BITS};
use super::image::{Backing, Qcow2Image};
use super::io::read_up_to;
use super::meta::Metadata;
use crate::virtio::block::disk::{open_locked, DiskError};

/// Most backing files below an image.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Whether the backing file an image names may be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingPolicy {
    /// The format was given: follow the chain.
    Follow,
    /// The format was guessed from the contents (which a guest may have written): refuse an
    /// image that names a backing file, rather than open host files it names.
    Refuse,
}

/// Why a qcow2 image cannot be used. The messages name the problem.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The header is malformed or uses something Kiln does not support.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// Reading the header or a table failed.
    #[error("cannot read the {what}: {source}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A bad L1 or refcount table entry.
    #[error("{0}")]
    Table(String),
    /// The dirty bit is set.
    #[error("the image's dirty bit is set (it was in use with lazy refcounts when its writer stopped), so its refcounts cannot be trusted; repair it with `qemu-img check -r all`, or attach it readonly")]
    Dirty,
    /// The corrupt bit is set.
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all`, or attach it readonly")]
    MarkedCorrupt,
    /// Clearing the autoclear bits failed.
    #[error("cannot clear the image's autoclear feature bits: {0}")]
    Autoclear(io::Error),
    /// A detected image names a backing file.
    #[error("the image names a backing file ('{}'), but its format was detected, not given; Kiln follows backing files only when the format is given (format=qcow2 in --disk or \"format\": \"qcow2\" in the config; for a backing file, a backing format recorded in the image above it, e.g. with `qemu-img rebase -u -F qcow2 -b BASE IMAGE`)", .0.to_string_lossy())]
    DetectedWithBacking(OsString),
    /// A QEMU protocol instead of a file name.
    #[error("the backing file '{}' names a QEMU protocol, not a file; Kiln opens only files", .0.to_string_lossy())]
    BackingProtocol(OsString),
    /// A backing format other than raw or qcow2.
    #[error("the backing file format '{0}' is not supported (raw and qcow2 are)")]
    BackingFormat(String),
    /// Too many backing files.
    #[error("the backing chain is deeper than {MAX_BACKING_DEPTH} images")]
    ChainTooDeep,
    /// A backing file that is already in the chain.
    #[error("the backing chain loops: '{}' is already part of it", .0.display())]
    ChainLoop(PathBuf),
    /// The backing file cannot be used.
    #[error("backing file '{}' ('{}'): {source}", .name.to_string_lossy(), .resolved.display())]
    Backing {
        /// The name in the header.
        name: OsString,
        /// Where Kiln looked for it.
        resolved: PathBuf,
        /// What is wrong with it.
        source: Box<DiskError>,
    },
}

/// Opens the qcow2 image in `file` (already opened and locked; `file_size` bytes).
pub fn open_image(
    file: File,
    path: &Path,
    file_size: u64,
    readonly: bool,
    policy: BackingPolicy,
) -> Result<Qcow2Image, Qcow2Error> {
    let mut chain: Vec<(u64, u64)> = identity(&file).into_iter().collect();
    open_in_chain(file, path, file_size, readonly, policy, &mut chain)
}

fn identity(file: &File) -> Option<(u64, u64)> {
    file.metadata().ok().map(|meta| (meta.dev(), meta.ino()))
}

fn open_in_chain(
    file: File,
    path: &Path,
    file_size: u64,
    readonly: bool,
    policy: BackingPolicy,
    chain: &mut Vec<(u64, u64)>,
) -> Result<Qcow2Image, Qcow2Error> {
    let header = read_header(&file, file_size)?;
    if !readonly && header.is_corrupt() {
        return Err(Qcow2Error::MarkedCorrupt);
    }
    if !readonly && header.is_dirty() {
        return Err(Qcow2Error::Dirty);
    }
    let (l1, reftable) = load_tables(&file, &header, file_size)?;
    if !readonly && header.autoclear_features != 0 {
        // Kiln does not keep bitmaps (or anything else autoclear bits vouch for) up to date,
        // so, as the spec requires of such writers, it clears the bits before writing.
        file.write_all_at(&[0u8; 8], AUTOCLEAR_OFFSET)
            .and_then(|()| file.sync_data())
            .map_err(Qcow2Error::Autoclear)?;
    }
    let backing = match (&header.backing_file, policy) {
        (None, _) => None,
        (Some(name), BackingPolicy::Refuse) => {
            return Err(Qcow2Error::DetectedWithBacking(name.clone()))
        }
        (Some(name), BackingPolicy::Follow) => Some(open_backing(
            path,
            name,
            header.backing_format.as_deref(),
            chain,
        )?),
    };
    let meta = Metadata::new(&header, l1, reftable, file_size);
    Ok(Qcow2Image::new(
        file,
        path.to_path_buf(),
        readonly,
        meta,
        backing,
    ))
}

/// Reads the first cluster (or as much of the file as there is) and parses the header.
fn read_header(file: &File, file_size: u64) -> Result<Header, Qcow2Error> {
    let read = |len: u64| {
        let mut bytes = vec![0u8; len.min(file_size) as usize];
        let got = read_up_to(file, &mut bytes, 0).map_err(|source| Qcow2Error::Read {
            what: "header",
            source,
        })?;
        bytes.truncate(got);
        Ok::<_, Qcow2Error>(bytes)
    };
    let mut bytes = read(64 << 10)?;
    if bytes.len() >= 24 {
        let cluster_bits = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        if cluster_bits <= MAX_CLUSTER_BITS && (1u64 << cluster_bits) > bytes.len() as u64 {
            bytes = read(1 << cluster_bits)?;
        }
    }
    Ok(Header::parse(&bytes, file_size)?)
}

fn read_table(
    file: &File,
    offset: u64,
    entries: u64,
    what: &'static str,
) -> Result<Vec<u64>, Qcow2Error> {
    let mut bytes = vec![0u8; (entries * 8) as usize];
    file.read_exact_at(&mut bytes, offset)
        .map_err(|source| Qcow2Error::Read { what, source })?;
    Ok(bytes
        .chunks_exact(8)
        .map(|chunk| u64::from_be_bytes(chunk.try_into().unwrap_or_default()))
        .collect())
}

/// Loads the L1 and refcount tables and checks every entry: aligned, inside the file, not on
/// top of the header, another table or each other.
fn load_tables(
    file: &File,
    header: &Header,
    file_size: u64,
) -> Result<(Vec<u64>, Vec<u64>), Qcow2Error> {
    let cluster_size = header.cluster_size();
    let l1 = read_table(
        file,
        header.l1_table_offset,
        u64::from(header.l1_size),
        "L1 table",
    )?;
    let reftable_bytes = u64::from(header.refcount_table_clusters) * cluster_size;
    let reftable = read_table(
        file,
        header.refcount_table_offset,
        reftable_bytes / 8,
        "refcount table",
    )?;
    let tables = [
        (
            "the L1 table",
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
        ),
        (
            "the refcount table",
            header.refcount_table_offset,
            reftable_bytes,
        ),
    ];
    let inside = |offset: u64| {
        tables
            .iter()
            .find(|(_, start, len)| offset + cluster_size > *start && offset < start + len)
            .map(|(name, _, _)| *name)
    };
    let mut used: HashSet<u64> = HashSet::new();
    for (index, &entry) in l1.iter().enumerate() {
        let (offset, _) =
            decode_l1(entry, index, cluster_size).map_err(|err| Qcow2Error::Table(err.0))?;
        if offset == 0 {
            continue;
        }
        let problem = if offset + cluster_size > file_size {
            Some(format!("past the end of the file ({file_size} bytes)"))
        } else if let Some(table) = inside(offset) {
            Some(format!("inside {table}"))
        } else if !used.insert(offset) {
            Some("that another L1 entry uses too".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Qcow2Error::Table(format!(
                "L1 entry {index} points at an L2 table at {offset:#x} {problem}"
            )));
        }
    }
    for (index, &entry) in reftable.iter().enumerate() {
        if entry == 0 {
            continue;
        }
        let problem = if entry & 511 != 0 {
            Some("has reserved bits set".to_string())
        } else if !entry.is_multiple_of(cluster_size) {
            Some("is not aligned to a cluster".to_string())
        } else if entry
            .checked_add(cluster_size)
            .is_none_or(|end| end > file_size)
        {
            Some(format!("is past the end of the file ({file_size} bytes)"))
        } else if let Some(table) = inside(entry) {
            Some(format!("is inside {table}"))
        } else if !used.insert(entry) {
            Some("is also used by an L2 table or another refcount block".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Qcow2Error::Table(format!(
                "refcount table entry {index}: the refcount block at {entry:#x} {problem}"
            )));
        }
    }
    Ok((l1, reftable))
}

/// Where QEMU looks for a backing file: an absolute name as it is, a relative one next to the
/// image that names it (its directory as given, symlinks not resolved).
pub fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

/// QEMU reads `proto:...` (a colon before any slash) as a protocol, not a file.
fn is_protocol(name: &OsStr) -> bool {
    name.as_bytes()
        .iter()
        .find(|&&b| b == b':' || b == b'/')
        .is_some_and(|&b| b == b':')
}

fn open_backing(
    image: &Path,
    name: &OsString,
    format: Option<&str>,
    chain: &mut Vec<(u64, u64)>,
) -> Result<Backing, Qcow2Error> {
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(Qcow2Error::ChainTooDeep);
    }
    if is_protocol(name) {
        return Err(Qcow2Error::BackingProtocol(name.clone()));
    }
    let resolved = resolve_backing(image, Path::new(name));
    let wrap = |source: DiskError| Qcow2Error::Backing {
        name: name.clone(),
        resolved: resolved.clone(),
        source: Box::new(source),
    };
    // Before opening: an image already in the chain may hold a lock this open would fail on.
    if let Ok(meta) = std::fs::metadata(&resolved) {
        if chain.contains(&(meta.dev(), meta.ino())) {
            return Err(Qcow2Error::ChainLoop(resolved));
        }
    }
    let (file, size) = open_locked(&resolved, true).map_err(wrap)?;
    if let Some(id) = identity(&file) {
        if chain.contains(&id) {
            return Err(Qcow2Error::ChainLoop(resolved));
        }
        chain.push(id);
    }
    let qcow2_policy = match format {
        Some("qcow2") => Some(BackingPolicy::Follow),
        Some("raw") | Some("file") => None,
        Some(other) => return Err(Qcow2Error::BackingFormat(other.to_string())),
        None => {
            let mut magic = [0u8; 4];
            let got = read_up_to(&file, &mut magic, 0).map_err(|source| {
                wrap(DiskError::Unreadable {
                    path: resolved.clone(),
                    source,
                })
            })?;
            has_magic(&magic[..got]).then_some(BackingPolicy::Refuse)
        }
    };
    match qcow2_policy {
        None => Ok(Backing::Raw {
            file,
            path: resolved,
            size,
        }),
        Some(policy) => open_in_chain(file, &resolved, size, true, policy, chain)
            .map(|image| Backing::Qcow2(Box::new(image)))
            .map_err(|source| {
                wrap(DiskError::Qcow2 {
                    path: resolved.clone(),
                    source: Box::new(source),
                })
            }),
    }
}
