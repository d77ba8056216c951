//! The qcow2 header (qcow2 spec, "Header" and "Header extensions"): parsed from the first
//! cluster of the file and checked against the file's size before anything else is read. Every
//! defect is a [`HeaderError`] whose message names it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Size of a version 2 header; a version 3 header starts the same way.
pub const V2_HEADER_SIZE: usize = 72;
/// Smallest version 3 header.
pub const V3_MIN_HEADER_SIZE: usize = 104;
/// Smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (QEMU's limit too).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table Kiln loads: 32 MiB, QEMU's limit.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table Kiln loads: 8 MiB, QEMU's limit.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// Most internal snapshots an image may list (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Byte offset of `refcount_table_offset` (followed by `refcount_table_clusters`).
pub const REFTABLE_FIELDS_OFFSET: u64 = 48;
/// Byte offset of `autoclear_features`.
pub const AUTOCLEAR_OFFSET: u64 = 88;

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be stale (lazy refcounts were in use and the image was not closed).
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in a separate file.
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is present and not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Header extension types Kiln reads.
mod extension {
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Full disk encryption header.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (the default).
    Zlib,
    /// Zstandard.
    Zstd,
}

/// What the header says, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes (a whole number of sectors).
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Where the L1 table starts.
    pub l1_table_offset: u64,
    /// Where the refcount table starts.
    pub refcount_table_offset: u64,
    /// Clusters of refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Incompatible feature bits (only ones Kiln understands get this far).
    pub incompatible_features: u64,
    /// Autoclear feature bits; a writer that does not maintain them must clear them.
    pub autoclear_features: u64,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// The backing file name as stored (a path, relative to the image's directory or absolute).
    pub backing_file: Option<OsString>,
    /// The backing file format extension, if present.
    pub backing_format: Option<String>,
}

/// A header Kiln refuses. Each message names the field and the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    #[error("the file is {0} bytes, too short for a qcow2 header")]
    TooShort(u64),
    /// No qcow2 magic.
    #[error("not a qcow2 image (the file does not start with the qcow2 magic QFI\\xfb)")]
    BadMagic,
    /// Versions other than 2 and 3.
    #[error("qcow2 version {0} is not supported (only versions 2 and 3 are)")]
    Version(u32),
    /// Cluster size outside 512 B ... 2 MiB.
    #[error("cluster_bits {0} is out of range: clusters must be 512 bytes to 2 MiB (9 to 21)")]
    ClusterBits(u32),
    /// A version 3 header length that is too short, too long or unaligned.
    #[error("header_length {0} is invalid: it must be a multiple of 8, at least 104 and at most the cluster size")]
    HeaderLength(u32),
    /// Encrypted images.
    #[error(
        "the image is encrypted (crypt_method {0}); Kiln does not support encrypted qcow2 images"
    )]
    Encrypted(u32),
    /// LUKS header extension without crypt_method.
    #[error("the image has an encryption header extension; Kiln does not support encrypted qcow2 images")]
    EncryptionHeader,
    /// External data file.
    #[error("the image keeps its data in an external data file; Kiln does not support external data files")]
    ExternalDataFile,
    /// Subclusters.
    #[error("the image uses extended L2 entries (subclusters); Kiln does not support them")]
    ExtendedL2,
    /// Incompatible bits nobody knows.
    #[error("the image has unknown incompatible feature bits {0:#x}; Kiln cannot use it safely")]
    UnknownIncompatible(u64),
    /// compression_type and its feature bit disagree, or the type is unknown.
    #[error("compression type {0} is not supported (or disagrees with the compression type feature bit); Kiln reads zlib (0) and zstd (1)")]
    CompressionType(u8),
    /// refcount_order above 6.
    #[error("refcount_order {0} is out of range (0 to 6: 1- to 64-bit refcounts)")]
    RefcountOrder(u32),
    /// Virtual size 0 or not whole sectors.
    #[error("the virtual disk size {0} is not a positive multiple of 512 bytes")]
    Size(u64),
    /// The L1 table cannot cover the virtual size, or is too big.
    #[error("l1_size {l1_size} does not fit the virtual size {size} (needs {needed} entries, at most {max})")]
    L1Size {
        /// Entries in the header.
        l1_size: u32,
        /// Virtual size.
        size: u64,
        /// Entries the size needs.
        needed: u64,
        /// Most Kiln accepts.
        max: u64,
    },
    /// A table offset that is not cluster-aligned.
    #[error("the {what} offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    Unaligned {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A table in the header cluster.
    #[error("the {what} at {offset:#x} overlaps the header")]
    OverlapsHeader {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// Two tables overlapping each other.
    #[error("the {first} and the {second} overlap")]
    Overlap {
        /// One table.
        first: &'static str,
        /// The other.
        second: &'static str,
    },
    /// A table reaching past the end of the file.
    #[error("the {what} at {offset:#x} ({len} bytes) reaches past the end of the file ({file_size} bytes)")]
    PastEnd {
        /// Which table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// Refcount table of 0 clusters or more than 8 MiB.
    #[error("refcount_table_clusters {0} is out of range (1 to 8 MiB of table)")]
    RefcountTableSize(u32),
    /// Snapshot count over the limit.
    #[error("nb_snapshots {0} is more than the {MAX_SNAPSHOTS} Kiln accepts")]
    Snapshots(u32),
    /// The backing file name field is bad.
    #[error("the backing file name ({len} bytes at {offset:#x}) is empty, longer than 1023 bytes, overlaps the header or lies outside the first cluster")]
    BackingName {
        /// Where it is.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A header extension that runs past its space or is malformed.
    #[error("header extension {kind:#x} at byte {offset} is malformed: {problem}")]
    Extension {
        /// Its type.
        kind: u32,
        /// Where it starts.
        offset: usize,
        /// What is wrong.
        problem: &'static str,
    },
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// Whether `bytes` (the start of a file) begins with the qcow2 magic.
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// A byte range of the file that holds metadata, for the overlap checks.
#[derive(Debug, Clone, Copy)]
struct Region {
    what: &'static str,
    offset: u64,
    len: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }

    fn overlaps(&self, other: &Region) -> bool {
        self.len > 0 && other.len > 0 && self.offset < other.end() && other.offset < self.end()
    }
}

impl Header {
    /// Parses and checks the header at the start of `bytes` (the first cluster of the file, or
    /// the whole file if shorter; at most 2 MiB is needed) of a file of `file_size` bytes.
    pub fn parse(bytes: &[u8], file_size: u64) -> Result<Self, HeaderError> {
        if bytes.len() < V2_HEADER_SIZE {
            return Err(HeaderError::TooShort(file_size));
        }
        if !has_magic(bytes) {
            return Err(HeaderError::BadMagic);
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Version(version));
        }
        let cluster_bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(HeaderError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;
        let (incompatible_features, autoclear_features, refcount_order, header_length) =
            if version == 3 {
                if bytes.len() < V3_MIN_HEADER_SIZE {
                    return Err(HeaderError::TooShort(file_size));
                }
                (
                    be64(bytes, 72),
                    be64(bytes, 88),
                    be32(bytes, 96),
                    be32(bytes, 100),
                )
            } else {
                (0, 0, 4, V2_HEADER_SIZE as u32)
            };
        if version == 3
            && (header_length < V3_MIN_HEADER_SIZE as u32
                || !header_length.is_multiple_of(8)
                || u64::from(header_length) > cluster_size)
        {
            return Err(HeaderError::HeaderLength(header_length));
        }
        if bytes.len() < header_length as usize {
            return Err(HeaderError::TooShort(file_size));
        }
        let crypt_method = be32(bytes, 32);
        if crypt_method != 0 {
            return Err(HeaderError::Encrypted(crypt_method));
        }
        if incompatible_features & incompatible::EXTERNAL_DATA_FILE != 0 {
            return Err(HeaderError::ExternalDataFile);
        }
        if incompatible_features & incompatible::EXTENDED_L2 != 0 {
            return Err(HeaderError::ExtendedL2);
        }
        let known = incompatible::DIRTY
            | incompatible::CORRUPT
            | incompatible::EXTERNAL_DATA_FILE
            | incompatible::COMPRESSION_TYPE
            | incompatible::EXTENDED_L2;
        if incompatible_features & !known != 0 {
            return Err(HeaderError::UnknownIncompatible(
                incompatible_features & !known,
            ));
        }
        let compression_byte = if header_length > V3_MIN_HEADER_SIZE as u32 {
            bytes[104]
        } else {
            0
        };
        let type_bit = incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        let compression = match (compression_byte, type_bit) {
            (0, false) => Compression::Zlib,
            (1, true) => Compression::Zstd,
            (other, _) => return Err(HeaderError::CompressionType(other)),
        };
        if refcount_order > 6 {
            return Err(HeaderError::RefcountOrder(refcount_order));
        }

        let size = be64(bytes, 24);
        if size == 0 || !size.is_multiple_of(512) {
            return Err(HeaderError::Size(size));
        }
        let l1_size = be32(bytes, 36);
        let l2_coverage = cluster_size * (cluster_size / 8);
        let needed = size.div_ceil(l2_coverage);
        let max = MAX_L1_BYTES / 8;
        if u64::from(l1_size) < needed || u64::from(l1_size) > max {
            return Err(HeaderError::L1Size {
                l1_size,
                size,
                needed,
                max,
            });
        }
        let l1_table_offset = be64(bytes, 40);
        let refcount_table_offset = be64(bytes, 48);
        let refcount_table_clusters = be32(bytes, 56);
        let reftable_bytes = u64::from(refcount_table_clusters) * cluster_size;
        if refcount_table_clusters == 0 || reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(HeaderError::RefcountTableSize(refcount_table_clusters));
        }
        let nb_snapshots = be32(bytes, 60);
        let snapshots_offset = be64(bytes, 64);
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(HeaderError::Snapshots(nb_snapshots));
        }

        let header = Region {
            what: "header",
            offset: 0,
            len: cluster_size,
        };
        let l1 = Region {
            what: "L1 table",
            offset: l1_table_offset,
            len: u64::from(l1_size) * 8,
        };
        let reftable = Region {
            what: "refcount table",
            offset: refcount_table_offset,
            len: reftable_bytes,
        };
        let snapshots = Region {
            what: "snapshot table",
            offset: snapshots_offset,
            // Its length depends on its entries; at least the first must be in the file.
            len: if nb_snapshots > 0 { 40 } else { 0 },
        };
        for region in [l1, reftable, snapshots] {
            if region.len == 0 {
                continue;
            }
            if !region.offset.is_multiple_of(cluster_size) {
                return Err(HeaderError::Unaligned {
                    what: region.what,
                    offset: region.offset,
                    cluster_size,
                });
            }
            if region.overlaps(&header) {
                return Err(HeaderError::OverlapsHeader {
                    what: region.what,
                    offset: region.offset,
                });
            }
            if region.offset.checked_add(region.len).is_none() || region.end() > file_size {
                return Err(HeaderError::PastEnd {
                    what: region.what,
                    offset: region.offset,
                    len: region.len,
                    file_size,
                });
            }
        }
        if l1.overlaps(&reftable) {
            return Err(HeaderError::Overlap {
                first: l1.what,
                second: reftable.what,
            });
        }

        let backing_file_offset = be64(bytes, 8);
        let backing_file_size = be32(bytes, 16);
        let backing_file = if backing_file_offset == 0 {
            None
        } else {
            let bad = HeaderError::BackingName {
                offset: backing_file_offset,
                len: backing_file_size,
            };
            let end = backing_file_offset.checked_add(u64::from(backing_file_size));
            let inside = end.is_some_and(|end| end <= cluster_size && end <= bytes.len() as u64);
            if backing_file_size == 0
                || backing_file_size > MAX_BACKING_NAME
                || backing_file_offset < u64::from(header_length)
                || !inside
            {
                return Err(bad);
            }
            let start = backing_file_offset as usize;
            let name = &bytes[start..start + backing_file_size as usize];
            if name.contains(&0) {
                return Err(bad);
            }
            Some(OsString::from_vec(name.to_vec()))
        };

        // Extensions run from the end of the header to the backing file name (or the end of
        // the first cluster).
        let extensions_end = if backing_file.is_some() {
            backing_file_offset as usize
        } else {
            (cluster_size as usize).min(bytes.len())
        };
        let backing_format = parse_extensions(bytes, header_length as usize, extensions_end)?;

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            refcount_order,
            incompatible_features,
            autoclear_features,
            header_length,
            compression,
            backing_file,
            backing_format,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompatible::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & incompatible::CORRUPT != 0
    }
}

/// Walks the header extensions in `bytes[start..end]`; returns the backing format, if named.
fn parse_extensions(bytes: &[u8], start: usize, end: usize) -> Result<Option<String>, HeaderError> {
    let mut backing_format = None;
    let mut at = start;
    // Without room for an extension header there are no extensions (version 2 images made by
    // old tools end the header area here).
    while at + 8 <= end {
        let kind = be32(bytes, at);
        let len = be32(bytes, at + 4) as usize;
        if kind == 0 {
            break;
        }
        let malformed = |problem| HeaderError::Extension {
            kind,
            offset: at,
            problem,
        };
        let data_start = at + 8;
        let padded = len.div_ceil(8) * 8;
        if data_start + padded > end {
            return Err(malformed("it runs past the space for header extensions"));
        }
        let data = &bytes[data_start..data_start + len];
        match kind {
            extension::BACKING_FORMAT => {
                let name = std::str::from_utf8(data)
                    .map_err(|_| malformed("the backing format name is not text"))?;
                backing_format = Some(name.trim_end_matches('\0').to_string());
            }
            extension::CRYPTO => return Err(HeaderError::EncryptionHeader),
            extension::DATA_FILE => return Err(HeaderError::ExternalDataFile),
            // Feature names, bitmaps and anything newer: nothing Kiln needs.
            _ => {}
        }
        at = data_start + padded;
    }
    Ok(backing_format)
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
