//! L1 and L2 table entries (qcow2 spec, "Cluster mapping"), decoded with every reserved bit
//! checked: an entry that breaks the format is a [`Corrupt`] error for the request that met it.

use std::io;

/// The cluster's refcount is exactly one: it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (version 3).
pub const ZERO: u64 = 1;
/// Bits 9 to 55: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entries: everything but the offset and COPIED is reserved.
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Standard L2 entries: bits 1-8 and 56-61 are reserved.
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// A corruption found in the image's metadata.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("qcow2 metadata is corrupt: {0}")]
pub struct Corrupt(pub String);

impl From<Corrupt> for io::Error {
    fn from(corrupt: Corrupt) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, corrupt)
    }
}

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this image: the backing file's data, or zeros without one.
    Unallocated,
    /// Reads as zeros. `host` is a preallocated cluster kept for it (0: none).
    Zero {
        /// Preallocated host cluster, or 0.
        host: u64,
        /// Whether that cluster's refcount is exactly one.
        copied: bool,
    },
    /// A host cluster.
    Data {
        /// Host offset of the cluster.
        host: u64,
        /// Whether its refcount is exactly one (it may be written in place).
        copied: bool,
    },
    /// Compressed data: `len` bytes at `host` (an upper bound; the end may be past the file).
    Compressed {
        /// Host byte offset of the compressed data.
        host: u64,
        /// Its length, up to the end of its last 512-byte sector.
        len: u64,
    },
}

impl Mapping {
    /// The host bytes this mapping holds a reference to, as `(first byte, length)`, for
    /// freeing their clusters when the mapping is replaced.
    pub fn host_range(&self, cluster_size: u64) -> Option<(u64, u64)> {
        match *self {
            Mapping::Unallocated | Mapping::Zero { host: 0, .. } => None,
            Mapping::Zero { host, .. } | Mapping::Data { host, .. } => Some((host, cluster_size)),
            Mapping::Compressed { host, len } => {
                let start = host & !511;
                Some((start, host + len - start))
            }
        }
    }
}

/// Decodes L1 entry `index`: the L2 table's offset (0: none) and whether it is COPIED.
pub fn decode_l1(entry: u64, index: usize, cluster_size: u64) -> Result<(u64, bool), Corrupt> {
    let offset = entry & OFFSET_MASK;
    if entry & L1_RESERVED != 0 || !offset.is_multiple_of(cluster_size) {
        return Err(Corrupt(format!(
            "L1 entry {index} ({entry:#018x}) has reserved bits set or an unaligned L2 table offset"
        )));
    }
    Ok((offset, entry & COPIED != 0))
}

/// Decodes an L2 entry for guest cluster `guest_cluster` of an image with `cluster_bits`.
pub fn decode_l2(
    entry: u64,
    guest_cluster: u64,
    cluster_bits: u32,
    version: u32,
) -> Result<Mapping, Corrupt> {
    let cluster_size = 1u64 << cluster_bits;
    let corrupt = |what: &str| {
        Corrupt(format!(
            "the L2 entry of guest cluster {guest_cluster} ({entry:#018x}) {what}"
        ))
    };
    if entry & COMPRESSED != 0 {
        if entry & COPIED != 0 {
            return Err(corrupt("is compressed and marked COPIED"));
        }
        let size_shift = 62 - (cluster_bits - 8);
        let offset_mask = (1u64 << size_shift) - 1;
        let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
        let host = entry & offset_mask;
        let sectors = ((entry >> size_shift) & sectors_mask) + 1;
        let len = sectors * 512 - (host & 511);
        if host < cluster_size {
            return Err(corrupt("points compressed data into the header"));
        }
        return Ok(Mapping::Compressed { host, len });
    }
    if entry & L2_RESERVED != 0 {
        return Err(corrupt("has reserved bits set"));
    }
    let host = entry & OFFSET_MASK;
    let copied = entry & COPIED != 0;
    if host != 0 && !host.is_multiple_of(cluster_size) {
        return Err(corrupt("has an unaligned host offset"));
    }
    if entry & ZERO != 0 {
        if version < 3 {
            return Err(corrupt(
                "has the zero flag, which version 2 images do not have",
            ));
        }
        return Ok(Mapping::Zero { host, copied });
    }
    if host == 0 {
        if copied {
            return Err(corrupt("is unallocated but marked COPIED"));
        }
        return Ok(Mapping::Unallocated);
    }
    Ok(Mapping::Data { host, copied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries_decode() {
        assert_eq!(decode_l2(0, 0, 16, 3), Ok(Mapping::Unallocated));
        assert_eq!(
            decode_l2(COPIED | 0x5_0000, 0, 16, 3),
            Ok(Mapping::Data {
                host: 0x5_0000,
                copied: true
            })
        );
        assert_eq!(
            decode_l2(0x5_0000, 0, 16, 3),
            Ok(Mapping::Data {
                host: 0x5_0000,
                copied: false
            })
        );
        assert_eq!(
            decode_l2(ZERO, 0, 16, 3),
            Ok(Mapping::Zero {
                host: 0,
                copied: false
            })
        );
        assert_eq!(
            decode_l2(ZERO | COPIED | 0x3_0000, 0, 16, 3),
            Ok(Mapping::Zero {
                host: 0x3_0000,
                copied: true
            })
        );
    }

    #[test]
    fn compressed_entries_decode() {
        // 64 KiB clusters: offset in bits 0..54, (sectors - 1) in bits 54..62.
        let entry = COMPRESSED | (2u64 << 54) | 0x1_0200;
        assert_eq!(
            decode_l2(entry, 0, 16, 3),
            Ok(Mapping::Compressed {
                host: 0x1_0200,
                len: 3 * 512
            })
        );
        let unaligned = COMPRESSED | 0x1_0010;
        assert_eq!(
            decode_l2(unaligned, 0, 16, 3),
            Ok(Mapping::Compressed {
                host: 0x1_0010,
                len: 512 - 0x10
            })
        );
        assert_eq!(
            Mapping::Compressed {
                host: 0x1_0010,
                len: 512 - 0x10
            }
            .host_range(65536),
            Some((0x1_0000, 512))
        );
    }

    #[test]
    fn bad_entries_are_corruption() {
        for (entry, version, what) in [
            (COPIED, 3, "unallocated but marked COPIED"),
            (0x5_0000 | 2, 3, "reserved bits"),
            (0x5_0000 | (1 << 56), 3, "reserved bits"),
            (0x5_1000, 3, "unaligned"),
            (ZERO, 2, "version 2"),
            (COMPRESSED | COPIED | 0x1_0000, 3, "marked COPIED"),
            (COMPRESSED | 0x200, 3, "into the header"),
        ] {
            let err = decode_l2(entry, 7, 16, version).unwrap_err();
            assert!(err.0.contains(what), "{entry:#x}: {err}");
            assert!(err.0.contains("guest cluster 7"), "{err}");
        }
        assert!(decode_l1(0x1_0000 | 1, 3, 65536).is_err());
        assert!(decode_l1(0x1_8000, 3, 65536).is_err());
        assert_eq!(decode_l1(COPIED | 0x2_0000, 0, 65536), Ok((0x2_0000, true)));
    }
}
