//! Images Kiln must refuse before a guest starts (each with a message naming the problem), and
//! corruption met while running (an I/O error for that request, nothing worse).

use std::fs;
use std::io;

use super::*;
use crate::virtio::block::qcow2::MAX_BACKING_DEPTH;

const MIB: usize = 1 << 20;

/// A valid 4 MiB image (64 KiB clusters) with data in its first 2 MiB.
fn valid_image(scratch: &Scratch, name: &str) -> PathBuf {
    let raw = scratch.path(&format!("{name}.raw"));
    let mut data = pattern(1, 4 * MIB);
    data[2 * MIB..].fill(0);
    fs::write(&raw, data).unwrap();
    let image = scratch.path(name);
    convert_to_qcow2(&raw, &image, "", false);
    image
}

fn assert_refused(path: &Path, readonly: bool, format: Option<DiskFormat>, expected: &str) {
    let err = open_error(path, readonly, format).to_string();
    assert!(
        err.contains(expected),
        "{}: expected '{expected}' in: {err}",
        path.display()
    );
    assert!(
        err.contains(&path.display().to_string()),
        "the message should name the image: {err}"
    );
}

#[test]
fn broken_tables_are_refused_by_name() {
    let scratch = Scratch::new("tables");
    let l1_entry = |image: &Path| peek_u64(image, 40);
    let reftable = |image: &Path| peek_u64(image, 48);
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, &str)> = vec![
        (
            "L1 entry past the end",
            Box::new(move |p: &Path| poke_u64(p, l1_entry(p), (1 << 63) | (1 << 40))),
            "L1 entry 0 points at an L2 table at 0x10000000000 past the end of the file",
        ),
        (
            "L1 entry reserved bits",
            Box::new(move |p: &Path| {
                let entry = peek_u64(p, l1_entry(p));
                poke_u64(p, l1_entry(p), entry | 2)
            }),
            "L1 entry 0",
        ),
        (
            "L1 entry in the refcount table",
            Box::new(move |p: &Path| poke_u64(p, l1_entry(p), (1 << 63) | reftable(p))),
            "inside the refcount table",
        ),
        (
            "L1 entry on the L1 table",
            Box::new(move |p: &Path| poke_u64(p, l1_entry(p), (1 << 63) | l1_entry(p))),
            "inside the L1 table",
        ),
        (
            "refcount block unaligned",
            Box::new(move |p: &Path| {
                let entry = peek_u64(p, reftable(p));
                poke_u64(p, reftable(p), entry + 4096)
            }),
            "refcount table entry 0: the refcount block at",
        ),
        (
            "refcount block reserved bits",
            Box::new(move |p: &Path| {
                let entry = peek_u64(p, reftable(p));
                poke_u64(p, reftable(p), entry | 1)
            }),
            "has reserved bits set",
        ),
        (
            "refcount block past the end",
            Box::new(move |p: &Path| poke_u64(p, reftable(p) + 8, 1 << 40)),
            "refcount table entry 1: the refcount block at 0x10000000000 is past the end",
        ),
        (
            "refcount block at the top of the address space",
            Box::new(move |p: &Path| poke_u64(p, reftable(p) + 8, !0xffff)),
            "refcount table entry 1: the refcount block at 0xffffffffffff0000 is past the end",
        ),
        (
            "refcount block on an L2 table",
            Box::new(move |p: &Path| {
                let l2 = peek_u64(p, l1_entry(p)) & !(1 << 63);
                poke_u64(p, reftable(p) + 8, l2)
            }),
            "is also used by an L2 table",
        ),
        (
            "the header claims more than the file holds",
            Box::new(|p: &Path| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(65536)
                    .unwrap()
            }),
            "reaches past the end of the file (65536 bytes)",
        ),
        (
            "cluster size",
            Box::new(|p: &Path| poke_u32(p, 20, 30)),
            "cluster_bits 30 is out of range",
        ),
        (
            "incompatible feature",
            Box::new(|p: &Path| poke_u64(p, 72, 1 << 20)),
            "unknown incompatible feature bits 0x100000",
        ),
        (
            "encryption",
            Box::new(|p: &Path| poke_u32(p, 32, 1)),
            "encrypted",
        ),
        (
            "compression type",
            Box::new(|p: &Path| {
                poke_u64(p, 72, 1 << 3);
                poke_u32(p, 104, 5 << 24)
            }),
            "compression type 5 is not supported",
        ),
    ];
    for (name, breaker, expected) in cases {
        let image = valid_image(&scratch, &format!("{}.qcow2", name.replace(' ', "-")));
        breaker(&image);
        assert_refused(&image, true, Some(DiskFormat::Qcow2), expected);
    }

    // Two L1 entries sharing one L2 table (a 2 GiB image has four L1 entries).
    let shared = scratch.path("shared.qcow2");
    create(&shared, "", None, Some("2G"));
    qemu_io(&shared, "write 0 4k");
    let l1 = peek_u64(&shared, 40);
    poke_u64(&shared, l1 + 8, peek_u64(&shared, l1));
    assert_refused(
        &shared,
        true,
        Some(DiskFormat::Qcow2),
        "that another L1 entry uses too",
    );
}

#[test]
fn unsupported_qemu_features_are_refused() {
    let scratch = Scratch::new("features");
    let extended = scratch.path("extended.qcow2");
    create(&extended, "extended_l2=on", None, Some("1M"));
    assert_refused(
        &extended,
        true,
        Some(DiskFormat::Qcow2),
        "extended L2 entries",
    );

    let external = scratch.path("external.qcow2");
    create(
        &external,
        &format!("data_file={}", scratch.path("data.raw").display()),
        None,
        Some("1M"),
    );
    assert_refused(
        &external,
        true,
        Some(DiskFormat::Qcow2),
        "external data file",
    );

    // QEMU's legacy AES encryption (LUKS needs seconds of key stretching to create; its
    // header extension is refused by the header tests).
    let encrypted = scratch.path("encrypted.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=kiln",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=sec0",
        encrypted.to_str().unwrap(),
        "1M",
    ]);
    assert_refused(
        &encrypted,
        true,
        Some(DiskFormat::Qcow2),
        "encrypted (crypt_method 1)",
    );

    // Dirty (lazy refcounts in use) and corrupt images: read-only only.
    for (bit, expected) in [(1u64, "dirty bit"), (2, "marked corrupt")] {
        let image = valid_image(&scratch, &format!("bit{bit}.qcow2"));
        poke_u64(&image, 72, bit);
        assert_refused(&image, false, Some(DiskFormat::Qcow2), expected);
        let disk = open(&image, true);
        assert_eq!(read(qcow2(&disk), 0, 512), pattern(1, 512));
    }
}

#[test]
fn formats_are_detected_but_detected_images_never_open_backing_files() {
    let scratch = Scratch::new("detect");
    fs::write(scratch.path("base.raw"), pattern(2, MIB)).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    create(&overlay, "", Some(("base.raw", "raw")), None);
    let err = open_error(&overlay, false, None).to_string();
    assert!(err.contains("names a backing file ('base.raw')"), "{err}");
    assert!(err.contains("format was detected"), "{err}");
    assert!(err.contains("format=qcow2"), "{err}");
    open(&overlay, false);

    // Detected without a backing file: qcow2.
    let plain = valid_image(&scratch, "plain.qcow2");
    let disk = DiskImage::open_as(&plain, true, None, None).unwrap();
    assert_eq!(disk.format(), DiskFormat::Qcow2);
    assert_eq!(disk.size(), 4 * MIB as u64);
    // Forced raw: the file's bytes.
    let disk = DiskImage::open_as(&plain, true, None, Some(DiskFormat::Raw)).unwrap();
    assert_eq!(disk.format(), DiskFormat::Raw);
    assert_eq!(disk.size(), fs::metadata(&plain).unwrap().len());
    // Forced qcow2 on a raw file.
    assert_refused(
        &scratch.path("base.raw"),
        true,
        Some(DiskFormat::Qcow2),
        "not a qcow2 image",
    );

    // A qcow2 backing file whose format the overlay does not record, with a backing file of
    // its own: refused, as a detected image would be.
    let mid = scratch.path("mid.qcow2");
    create(&mid, "", Some(("base.raw", "raw")), None);
    let top = scratch.path("top.qcow2");
    create(&top, "", Some(("mid.qcow2", "qcow2")), None);
    open(&top, true);
    // Drop the backing format extension of the top image (it directly follows the header).
    poke_u32(&top, 112, 0x1234_5678);
    let err = open_error(&top, true, Some(DiskFormat::Qcow2)).to_string();
    assert!(err.contains("backing file 'mid.qcow2'"), "{err}");
    assert!(err.contains("format was detected"), "{err}");
}

#[test]
fn bad_backing_chains_are_refused() {
    let scratch = Scratch::new("chains");
    fs::write(scratch.path("gone.raw"), pattern(3, MIB)).unwrap();
    let missing = scratch.path("missing.qcow2");
    create(&missing, "", Some(("gone.raw", "raw")), None);
    fs::remove_file(scratch.path("gone.raw")).unwrap();
    assert_refused(&missing, true, Some(DiskFormat::Qcow2), "does not exist");
    assert_refused(
        &missing,
        true,
        Some(DiskFormat::Qcow2),
        "backing file 'gone.raw'",
    );

    // a -> b -> a.
    fs::write(scratch.path("base.raw"), pattern(3, MIB)).unwrap();
    let a = scratch.path("a.qcow2");
    let b = scratch.path("b.qcow2");
    create(&a, "", Some(("base.raw", "raw")), None);
    create(&b, "", Some(("a.qcow2", "qcow2")), None);
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "b.qcow2",
        a.to_str().unwrap(),
    ]);
    assert_refused(&a, true, Some(DiskFormat::Qcow2), "the backing chain loops");
    assert_refused(
        &a,
        false,
        Some(DiskFormat::Qcow2),
        "the backing chain loops",
    );
    // Itself.
    qemu_img(&[
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        "a.qcow2",
        a.to_str().unwrap(),
    ]);
    assert_refused(&a, true, Some(DiskFormat::Qcow2), "the backing chain loops");

    // Too deep: 17 overlays over the base.
    let mut below = ("base.raw".to_string(), "raw");
    for level in 0..=MAX_BACKING_DEPTH {
        let name = format!("level{level}.qcow2");
        create(&scratch.path(&name), "", Some((&below.0, below.1)), None);
        below = (name, "qcow2");
    }
    let top = scratch.path(&below.0);
    assert_refused(&top, true, Some(DiskFormat::Qcow2), "deeper than 16 images");
    let just_fits = scratch.path(&format!("level{}.qcow2", MAX_BACKING_DEPTH - 1));
    open(&just_fits, true);

    // Formats Kiln does not read, and QEMU protocols.
    let vmdk = scratch.path("vmdk.qcow2");
    create(&vmdk, "", Some(("base.raw", "raw")), None);
    let (offset, len) = (peek_u64(&vmdk, 8), peek_u64(&vmdk, 16) >> 32);
    assert_eq!(len, 8);
    // The format extension holds "raw"; make it "vmd".
    let file = fs::OpenOptions::new().write(true).open(&vmdk).unwrap();
    file.write_all_at(b"vmd", 120).unwrap();
    assert!(offset > 120);
    assert_refused(
        &vmdk,
        true,
        Some(DiskFormat::Qcow2),
        "backing file format 'vmd'",
    );
    let nbd = scratch.path("nbd.qcow2");
    create(&nbd, "", Some(("base.raw", "raw")), None);
    let file = fs::OpenOptions::new().write(true).open(&nbd).unwrap();
    file.write_all_at(b"nbd:base", peek_u64(&nbd, 8)).unwrap();
    assert_refused(&nbd, true, Some(DiskFormat::Qcow2), "names a QEMU protocol");

    // Backing files are opened read-only: a base attached read-write elsewhere is in use.
    let overlay = scratch.path("overlay.qcow2");
    create(&overlay, "", Some(("base.raw", "raw")), None);
    let _writer = DiskImage::open(&scratch.path("base.raw"), false, None).unwrap();
    assert_refused(
        &overlay,
        false,
        Some(DiskFormat::Qcow2),
        "attached read-write",
    );
}

fn assert_corrupt(result: io::Result<()>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
    assert!(err.to_string().contains("corrupt"), "{what}: {err}");
}

#[test]
fn corruption_met_while_running_fails_only_that_request() {
    let scratch = Scratch::new("runtime");
    let image = valid_image(&scratch, "runtime.qcow2");
    let l2 = l2_table_offset(&image, 0);
    let l1 = peek_u64(&image, 40);
    // Cluster 1: reserved bits. Cluster 2: past the end of the file. Cluster 3: the L1 table.
    // Cluster 4: compressed garbage. Cluster 5: an L2 table that is not one (an unallocated
    // L1 entry pointed at a data cluster).
    let data_cluster = peek_u64(&image, l2) & super::super::entry::OFFSET_MASK;
    poke_u64(&image, l2 + 8, peek_u64(&image, l2 + 8) | (1 << 57));
    poke_u64(&image, l2 + 16, (1 << 63) | (1 << 44));
    poke_u64(&image, l2 + 24, (1 << 63) | l1);
    poke_u64(&image, l2 + 32, (1 << 62) | data_cluster);
    let before = fs::read(&image).unwrap();
    let disk = open(&image, false);
    let qcow2 = qcow2(&disk);
    let mut buf = vec![0u8; 65536];
    let mut read_cluster = |cluster: u64| qcow2.read(&[buffer_slice(&mut buf)], cluster * 65536);
    assert_corrupt(read_cluster(1), "reserved bits");
    assert_corrupt(read_cluster(2), "past the end");
    assert_corrupt(read_cluster(4), "compressed garbage");
    read_cluster(0).unwrap();
    read_cluster(3).unwrap();
    let mut data = vec![0x42u8; 4096];
    assert_corrupt(
        qcow2.write(&[buffer_slice(&mut data)], 3 * 65536),
        "write into the L1 table",
    );
    assert_corrupt(
        qcow2.write(&[buffer_slice(&mut data)], 2 * 65536),
        "write past the end",
    );
    // A request spanning a good and a bad cluster fails as a whole.
    let mut two = vec![0u8; 2 * 65536];
    assert_corrupt(qcow2.read(&[buffer_slice(&mut two)], 0), "spanning");
    // The rest of the disk works.
    write(qcow2, 10 * 65536, &[7u8; 4096]);
    assert_eq!(read(qcow2, 10 * 65536, 4096), vec![7u8; 4096]);
    drop(disk);
    // Nothing was written into the L1 table.
    let after = fs::read(&image).unwrap();
    let l1_bytes = l1 as usize..l1 as usize + 8;
    assert_eq!(after[l1_bytes.clone()], before[l1_bytes]);
}

#[test]
fn an_l1_entry_pointing_at_data_fails_requests_without_harm() {
    let scratch = Scratch::new("bogus-l2");
    let image = valid_image(&scratch, "bogus.qcow2");
    let l1 = peek_u64(&image, 40);
    let data_cluster = peek_u64(&image, l2_table_offset(&image, 0)) & !(1 << 63);
    // 4 MiB with 64 KiB clusters: one L1 entry; point it at a data cluster full of pattern.
    poke_u64(&image, l1, (1 << 63) | data_cluster);
    let disk = open(&image, true);
    let qcow2 = qcow2(&disk);
    let mut failures = 0;
    for cluster in 0..64u64 {
        let mut buf = vec![0u8; 65536];
        match qcow2.read(&[buffer_slice(&mut buf)], cluster * 65536) {
            Ok(()) => {}
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
                failures += 1;
            }
        }
    }
    assert!(failures > 0, "random L2 entries should read as corruption");
}
