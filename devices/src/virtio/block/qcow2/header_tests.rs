//! Header parsing: a valid header, then every field broken in turn.

use super::*;

const CLUSTER: u64 = 65536;
const FILE_SIZE: u64 = 4 * CLUSTER;

fn put32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// A version 3 header: 64 KiB clusters, 1 GiB, refcount table at cluster 1, L1 at cluster 3.
fn valid() -> Vec<u8> {
    let mut bytes = vec![0u8; CLUSTER as usize];
    bytes[..4].copy_from_slice(&MAGIC);
    put32(&mut bytes, 4, 3);
    put32(&mut bytes, 20, 16);
    put64(&mut bytes, 24, 1 << 30);
    put32(&mut bytes, 36, 2);
    put64(&mut bytes, 40, 3 * CLUSTER);
    put64(&mut bytes, 48, CLUSTER);
    put32(&mut bytes, 56, 1);
    put32(&mut bytes, 96, 4);
    put32(&mut bytes, 100, 112);
    bytes
}

fn with_backing(bytes: &mut [u8], name: &str, format: Option<&str>) {
    let mut at = 112;
    if let Some(format) = format {
        put32(bytes, at, 0xe279_2aca);
        put32(bytes, at + 4, format.len() as u32);
        bytes[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
    }
    at += 8;
    put64(bytes, 8, at as u64);
    put32(bytes, 16, name.len() as u32);
    bytes[at..at + name.len()].copy_from_slice(name.as_bytes());
}

fn refused(bytes: &[u8], file_size: u64) -> HeaderError {
    Header::parse(bytes, file_size).unwrap_err()
}

#[test]
fn a_valid_header_parses() {
    let header = Header::parse(&valid(), FILE_SIZE).unwrap();
    assert_eq!(header.version, 3);
    assert_eq!(header.cluster_size(), CLUSTER);
    assert_eq!(header.size, 1 << 30);
    assert_eq!(header.refcount_order, 4);
    assert_eq!(header.compression, Compression::Zlib);
    assert_eq!(header.backing_file, None);
    assert!(!header.is_dirty() && !header.is_corrupt());
}

#[test]
fn backing_file_and_format_are_read() {
    let mut bytes = valid();
    with_backing(&mut bytes, "../base.raw", Some("raw"));
    let header = Header::parse(&bytes, FILE_SIZE).unwrap();
    assert_eq!(header.backing_file, Some("../base.raw".into()));
    assert_eq!(header.backing_format.as_deref(), Some("raw"));
}

#[test]
fn version_2_headers_parse() {
    let mut bytes = valid();
    put32(&mut bytes, 4, 2);
    bytes[72..112].fill(0xee); // not part of a version 2 header
    bytes[72..80].fill(0); // ... but read as the end of the (absent) extensions
    let header = Header::parse(&bytes, FILE_SIZE).unwrap();
    assert_eq!(header.version, 2);
    assert_eq!(header.refcount_order, 4);
    assert_eq!(header.header_length, 72);
}

#[test]
fn zstd_needs_its_feature_bit() {
    let mut bytes = valid();
    bytes[104] = 1;
    assert_eq!(refused(&bytes, FILE_SIZE), HeaderError::CompressionType(1));
    put64(&mut bytes, 72, incompatible::COMPRESSION_TYPE);
    assert_eq!(
        Header::parse(&bytes, FILE_SIZE).unwrap().compression,
        Compression::Zstd
    );
    bytes[104] = 2;
    assert_eq!(refused(&bytes, FILE_SIZE), HeaderError::CompressionType(2));
    bytes[104] = 0;
    assert_eq!(refused(&bytes, FILE_SIZE), HeaderError::CompressionType(0));
}

#[test]
fn every_bad_field_is_named() {
    type Breaker = fn(&mut Vec<u8>);
    let cases: Vec<(&str, Breaker, &str)> = vec![
        ("magic", |b| b[0] = b'X', "not a qcow2 image"),
        ("version", |b| put32(b, 4, 4), "version 4"),
        ("small clusters", |b| put32(b, 20, 8), "cluster_bits 8"),
        ("large clusters", |b| put32(b, 20, 22), "cluster_bits 22"),
        ("huge cluster bits", |b| put32(b, 20, 64), "cluster_bits 64"),
        ("short header", |b| put32(b, 100, 96), "header_length 96"),
        ("odd header", |b| put32(b, 100, 113), "header_length 113"),
        ("encrypted", |b| put32(b, 32, 2), "encrypted"),
        (
            "data file",
            |b| put64(b, 72, incompatible::EXTERNAL_DATA_FILE),
            "external data file",
        ),
        (
            "extended L2",
            |b| put64(b, 72, incompatible::EXTENDED_L2),
            "extended L2",
        ),
        (
            "unknown bits",
            |b| put64(b, 72, 1 << 40),
            "unknown incompatible feature bits 0x10000000000",
        ),
        ("refcount order", |b| put32(b, 96, 7), "refcount_order 7"),
        ("zero size", |b| put64(b, 24, 0), "virtual disk size 0"),
        ("odd size", |b| put64(b, 24, 1000), "virtual disk size 1000"),
        (
            "small L1",
            |b| put64(b, 24, 1 << 31),
            "l1_size 2 does not fit",
        ),
        ("huge L1", |b| put32(b, 36, u32::MAX), "l1_size 4294967295"),
        (
            "unaligned L1",
            |b| put64(b, 40, 3 * CLUSTER + 512),
            "L1 table offset 0x30200 is not aligned",
        ),
        (
            "L1 in header",
            |b| put64(b, 40, 0),
            "L1 table at 0x0 overlaps the header",
        ),
        (
            "L1 past end",
            |b| put64(b, 40, 8 * CLUSTER),
            "L1 table at 0x80000 (16 bytes) reaches past the end",
        ),
        (
            "L1 offset wraps",
            |b| put64(b, 40, u64::MAX - CLUSTER + 1),
            "reaches past the end",
        ),
        (
            "reftable in header",
            |b| put64(b, 48, 0),
            "refcount table at 0x0 overlaps the header",
        ),
        (
            "reftable past end",
            |b| put32(b, 56, 4),
            "refcount table at 0x10000 (262144 bytes)",
        ),
        (
            "no reftable",
            |b| put32(b, 56, 0),
            "refcount_table_clusters 0",
        ),
        (
            "huge reftable",
            |b| put32(b, 56, 1 << 20),
            "refcount_table_clusters 1048576",
        ),
        (
            "tables overlap",
            |b| put64(b, 48, 3 * CLUSTER),
            "L1 table and the refcount table overlap",
        ),
        ("snapshots", |b| put32(b, 60, 70000), "nb_snapshots 70000"),
        (
            "snapshot table past end",
            |b| {
                put32(b, 60, 1);
                put64(b, 64, 9 * CLUSTER)
            },
            "snapshot table at 0x90000",
        ),
        (
            "long backing name",
            |b| {
                put64(b, 8, 200);
                put32(b, 16, 1024)
            },
            "backing file name (1024 bytes at 0xc8)",
        ),
        (
            "backing name in header",
            |b| {
                put64(b, 8, 64);
                put32(b, 16, 4)
            },
            "backing file name (4 bytes at 0x40)",
        ),
        (
            "backing name past cluster",
            |b| {
                put64(b, 8, CLUSTER - 2);
                put32(b, 16, 4)
            },
            "lies outside the first cluster",
        ),
        (
            "empty backing name",
            |b| {
                put64(b, 8, 200);
                put32(b, 16, 0)
            },
            "is empty",
        ),
        (
            "extension overrun",
            |b| {
                put32(b, 112, 0x1234);
                put32(b, 116, 70000)
            },
            "header extension 0x1234 at byte 112",
        ),
        (
            "crypto extension",
            |b| {
                put32(b, 112, 0x0537_be77);
                put32(b, 116, 16)
            },
            "encryption header",
        ),
        (
            "data file extension",
            |b| {
                put32(b, 112, 0x4441_5441);
                put32(b, 116, 4)
            },
            "external data file",
        ),
    ];
    for (name, breaker, expected) in cases {
        let mut bytes = valid();
        breaker(&mut bytes);
        let err = refused(&bytes, FILE_SIZE);
        assert!(
            err.to_string().contains(expected),
            "{name}: expected '{expected}' in '{err}'"
        );
    }
}

#[test]
fn short_files_are_refused() {
    let bytes = valid();
    assert_eq!(refused(&bytes[..50], 50), HeaderError::TooShort(50));
    assert_eq!(refused(&bytes[..100], 100), HeaderError::TooShort(100));
    // The tables are past the end of a file that holds only the header cluster.
    assert!(matches!(
        refused(&bytes, CLUSTER),
        HeaderError::PastEnd { .. }
    ));
}
