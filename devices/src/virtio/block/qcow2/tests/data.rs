//! Reads and writes against QEMU: every cluster size and refcount width, version 2 and 3,
//! compressed clusters, backing chains, zero clusters, write-zeroes, discard, snapshots.

use std::fs;

use super::*;
use crate::virtio::block::qcow2::create::{create_overlay, OverlayOptions};
use crate::virtio::block::qcow2::open::resolve_backing;

const MIB: usize = 1 << 20;

/// Raw contents with data, zero runs (which `qemu-img convert` leaves unallocated) and an odd
/// tail.
fn mixed_contents(len: usize) -> Vec<u8> {
    let mut data = pattern(1, len);
    for start in (0..len).step_by(300 * 1024) {
        let end = (start + 100 * 1024).min(len);
        data[start..end].fill(0);
    }
    data
}

/// Reads all of `image` in pieces of `step` bytes (not a power of two, so pieces straddle
/// clusters).
fn read_all(image: &Qcow2Image, step: usize) -> Vec<u8> {
    let size = image.size() as usize;
    let mut out = Vec::with_capacity(size);
    let mut offset = 0;
    while offset < size {
        let len = step.min(size - offset);
        out.extend(read(image, offset as u64, len));
        offset += len;
    }
    out
}

#[test]
fn kiln_reads_what_qemu_wrote() {
    let scratch = Scratch::new("reads");
    let raw = scratch.path("data.raw");
    let data = mixed_contents(3 * MIB + 512 * 7);
    fs::write(&raw, &data).unwrap();
    for options in [
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=65536",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=64",
    ] {
        let image = scratch.path(&format!("{}.qcow2", options.replace('=', "-")));
        convert_to_qcow2(&raw, &image, options, false);
        let disk = open(&image, true);
        assert_eq!(disk.size(), data.len() as u64, "{options}");
        assert!(read_all(qcow2(&disk), 7 * 512 + 4096) == data, "{options}");
    }
}

#[test]
fn compressed_images_read_and_take_writes() {
    let scratch = Scratch::new("compressed");
    let raw = scratch.path("data.raw");
    let mut data = compressible(2 * MIB);
    data[MIB..MIB + 4096].copy_from_slice(&pattern(2, 4096));
    fs::write(&raw, &data).unwrap();
    for compression in ["zlib", "zstd"] {
        let image = scratch.path(&format!("{compression}.qcow2"));
        convert_to_qcow2(
            &raw,
            &image,
            &format!("compression_type={compression}"),
            true,
        );
        let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
        assert!(info.contains(compression), "{info}");
        {
            let disk = open(&image, true);
            assert!(read_all(qcow2(&disk), 3000) == data, "{compression}");
        }
        // A write into a compressed cluster copies the rest of it out decompressed.
        let mut expected = data.clone();
        {
            let disk = open(&image, false);
            let new = pattern(3, 1000);
            write(qcow2(&disk), 70_000, &new);
            expected[70_000..71_000].copy_from_slice(&new);
            assert!(read_all(qcow2(&disk), 65536) == expected, "{compression}");
            disk.flush().unwrap();
        }
        assert_consistent(&image, 0);
        assert!(contents(&image) == expected, "{compression}");
    }
}

/// Writes at awkward places: single sectors, across clusters, whole clusters, a large run.
fn write_pattern(image: &Qcow2Image, model: &mut [u8], seed: u64) {
    let size = model.len() as u64;
    let writes = [
        (0, 512),
        (512 * 3, 512 * 9),
        (65536 - 512, 1024),
        (65536 * 3, 65536),
        (size / 2 + 512, 300 * 1024),
        (size - 4096, 4096),
        (1_000_448, 131_072),
        (65536 * 3 + 4096, 512),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        let data = pattern(seed + i as u64, len);
        write(image, offset, &data);
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
}

#[test]
fn qemu_reads_what_kiln_wrote() {
    let scratch = Scratch::new("writes");
    for options in [
        "cluster_size=512",
        "cluster_size=65536",
        "cluster_size=2M",
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=8",
        "refcount_bits=64",
    ] {
        let image = scratch.path(&format!("{}.qcow2", options.replace('=', "-")));
        create(&image, options, None, Some("8M"));
        let mut model = vec![0u8; 8 * MIB];
        {
            let disk = open(&image, false);
            write_pattern(qcow2(&disk), &mut model, 10);
            assert!(read_all(qcow2(&disk), 100_000) == model, "{options}");
            disk.flush().unwrap();
            // Overwrites of allocated clusters go in place.
            write_pattern(qcow2(&disk), &mut model, 20);
        }
        assert_consistent(&image, 0);
        assert!(contents(&image) == model, "{options}");
        let disk = open(&image, true);
        assert!(read_all(qcow2(&disk), 1 << 20) == model, "{options}");
    }
}

#[test]
fn overlays_copy_on_write_and_leave_the_base_alone() {
    let scratch = Scratch::new("overlay");
    let base_raw = scratch.path("base.raw");
    let base_data = pattern(5, 4 * MIB);
    fs::write(&base_raw, &base_data).unwrap();
    let base_qcow2 = scratch.path("base.qcow2");
    convert_to_qcow2(&base_raw, &base_qcow2, "cluster_size=4096", false);
    for (base, format) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let before = fs::read(scratch.path(base)).unwrap();
        let overlay = scratch.path(&format!("over-{format}.qcow2"));
        create(&overlay, "", Some((base, format)), None);
        let mut model = base_data.clone();
        {
            let disk = open(&overlay, false);
            assert!(read_all(qcow2(&disk), 12345) == model, "{format}");
            write_pattern(qcow2(&disk), &mut model, 30);
            assert!(read_all(qcow2(&disk), 12345) == model, "{format}");
        }
        assert_consistent(&overlay, 0);
        assert!(contents(&overlay) == model, "{format}");
        assert!(fs::read(scratch.path(base)).unwrap() == before, "{format}");
    }
}

#[test]
fn backing_files_resolve_as_qemu_resolves_them() {
    assert_eq!(
        resolve_backing(Path::new("/a/b/top.qcow2"), Path::new("../base.raw")),
        PathBuf::from("/a/b/../base.raw")
    );
    assert_eq!(
        resolve_backing(Path::new("/a/top.qcow2"), Path::new("/images/base.raw")),
        PathBuf::from("/images/base.raw")
    );
    assert_eq!(
        resolve_backing(Path::new("top.qcow2"), Path::new("base.raw")),
        PathBuf::from("base.raw")
    );

    let scratch = Scratch::new("relative");
    fs::create_dir_all(scratch.path("images")).unwrap();
    fs::create_dir_all(scratch.path("overlays")).unwrap();
    let data = pattern(6, MIB);
    fs::write(scratch.path("images/base.raw"), &data).unwrap();
    let mid = scratch.path("images/mid.qcow2");
    create(&mid, "", Some(("base.raw", "raw")), None);
    let top = scratch.path("overlays/top.qcow2");
    create(&top, "", Some(("../images/mid.qcow2", "qcow2")), None);
    let mut model = data.clone();
    {
        let disk = open(&mid, false);
        write(qcow2(&disk), 4096, &[0x77; 8192]);
        model[4096..4096 + 8192].fill(0x77);
    }
    let disk = open(&top, false);
    assert!(read_all(qcow2(&disk), 65536) == model);
    write(qcow2(&disk), 0, &[0x55; 512]);
    model[..512].fill(0x55);
    assert!(read_all(qcow2(&disk), 65536) == model);
    drop(disk);
    assert!(contents(&top) == model);
    // The middle image took no part of the top's write.
    assert_eq!(&contents(&mid)[..512], &data[..512]);
}

#[test]
fn zero_clusters_read_as_zeros_over_a_backing_file() {
    let scratch = Scratch::new("zeros");
    let base = scratch.path("base.raw");
    let data = pattern(7, MIB);
    fs::write(&base, &data).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    create(&overlay, "", Some(("base.raw", "raw")), None);
    qemu_io(&overlay, "write -z 65536 131072");
    let disk = open(&overlay, true);
    let read_back = read_all(qcow2(&disk), 40_000);
    let mut model = data;
    model[65536..196_608].fill(0);
    assert!(read_back == model);
}

#[test]
fn write_zeroes_and_discard_free_clusters() {
    let scratch = Scratch::new("discard");
    let base = scratch.path("base.raw");
    let data = pattern(8, 2 * MIB);
    fs::write(&base, &data).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    create(&overlay, "", Some(("base.raw", "raw")), None);
    let mut model = data;
    let disk = open(&overlay, false);
    let image = qcow2(&disk);
    let written = pattern(9, MIB);
    write(image, 0, &written);
    model[..MIB].copy_from_slice(&written);
    disk.flush().unwrap();
    let allocated = check(&overlay).allocated_clusters;

    // Part clusters are written, whole ones become zero clusters (keeping their space).
    image.write_zeroes(1000 * 512, 300_000, false).unwrap();
    model[512_000..812_000].fill(0);
    // Unmapped: over the backing file too.
    image.write_zeroes(1_500_000, 200_000, true).unwrap();
    model[1_500_000..1_700_000].fill(0);
    // Discard: whole clusters only, which then read as zeros.
    image.discard(65536 * 2, 65536 * 3 + 512).unwrap();
    model[65536 * 2..65536 * 5].fill(0);
    // A discard of part of a cluster changes nothing.
    image.discard(512, 1024).unwrap();
    // The tail of the disk, up to its end.
    image
        .write_zeroes(2 * MIB as u64 - 65536, 65536, true)
        .unwrap();
    model[2 * MIB - 65536..].fill(0);
    assert!(read_all(image, 77_777) == model);
    disk.flush().unwrap();
    let report = assert_consistent(&overlay, 0);
    assert!(
        report.allocated_clusters < allocated,
        "discard freed nothing: {allocated} -> {report:?}"
    );
    drop(disk);
    assert!(contents(&overlay) == model);
}

#[test]
fn internal_snapshots_keep_their_data() {
    let scratch = Scratch::new("snapshots");
    let raw = scratch.path("data.raw");
    let data = pattern(11, 2 * MIB);
    fs::write(&raw, &data).unwrap();
    let image = scratch.path("snap.qcow2");
    convert_to_qcow2(&raw, &image, "", false);
    qemu_img(&["snapshot", "-c", "before", image.to_str().unwrap()]);
    let mut model = data.clone();
    {
        let disk = open(&image, false);
        write_pattern(qcow2(&disk), &mut model, 40);
        qcow2(&disk).discard(MIB as u64, 65536 * 2).unwrap();
        model[MIB..MIB + 65536 * 2].fill(0);
    }
    assert_consistent(&image, 0);
    assert!(contents(&image) == model);
    let snapshot = scratch.path("snapshot.raw");
    qemu_img(&[
        "convert",
        "-l",
        "before",
        "-O",
        "raw",
        image.to_str().unwrap(),
        snapshot.to_str().unwrap(),
    ]);
    assert!(fs::read(&snapshot).unwrap() == data);
}

#[test]
fn the_refcount_table_grows_when_it_must() {
    let scratch = Scratch::new("grow");
    let image = scratch.path("small-clusters.qcow2");
    create(&image, "cluster_size=512", None, Some("24M"));
    let table_before = peek_u64(&image, 48);
    let mut model = vec![0u8; 24 * MIB];
    {
        let disk = open(&image, false);
        for (i, chunk) in model.chunks_mut(256 * 1024).enumerate().take(64) {
            let data = pattern(100 + i as u64, chunk.len());
            write(qcow2(&disk), (i * 256 * 1024) as u64, &data);
            chunk.copy_from_slice(&data);
        }
        disk.flush().unwrap();
    }
    assert_ne!(peek_u64(&image, 48), table_before, "the table did not move");
    assert_consistent(&image, 0);
    assert!(contents(&image) == model);
}

#[test]
fn kiln_made_overlays_are_what_qemu_makes() {
    let scratch = Scratch::new("create");
    let base = scratch.path("base.raw");
    let data = pattern(12, 3 * MIB);
    fs::write(&base, &data).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    let options = OverlayOptions {
        backing: Some(PathBuf::from("base.raw")),
        ..Default::default()
    };
    assert_eq!(
        create_overlay(&overlay, &options).unwrap(),
        data.len() as u64
    );
    assert_consistent(&overlay, 0);
    let info = qemu_img(&["info", "--output=json", overlay.to_str().unwrap()]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename"], "base.raw");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], data.len() as u64);
    assert!(contents(&overlay) == data);

    // Over a qcow2 base, and with a size of its own. The base names a backing file, so its
    // format must be given.
    let second = scratch.path("second.qcow2");
    let mut options = OverlayOptions {
        backing: Some(overlay.clone()),
        size: Some(8 * MIB as u64),
        ..Default::default()
    };
    let err = create_overlay(&second, &options).unwrap_err().to_string();
    assert!(err.contains("format was detected"), "{err}");
    assert!(!second.exists());
    options.backing_format = Some(DiskFormat::Qcow2);
    create_overlay(&second, &options).unwrap();
    let mut model = data.clone();
    model.resize(8 * MIB, 0);
    {
        let disk = open(&second, false);
        write_pattern(qcow2(&disk), &mut model, 50);
    }
    assert_consistent(&second, 0);
    assert!(contents(&second) == model);
    assert!(matches!(
        create_overlay(&second, &options),
        Err(crate::virtio::block::qcow2::CreateError::Exists(_))
    ));
    // Small clusters.
    let small = scratch.path("small.qcow2");
    let options = OverlayOptions {
        size: Some(2 * MIB as u64),
        cluster_bits: Some(9),
        ..Default::default()
    };
    create_overlay(&small, &options).unwrap();
    assert_consistent(&small, 0);
    let mut model = vec![0u8; 2 * MIB];
    {
        let disk = open(&small, false);
        write_pattern(qcow2(&disk), &mut model, 60);
    }
    assert_consistent(&small, 0);
    assert!(contents(&small) == model);
    // An empty image.
    let empty = scratch.path("empty.qcow2");
    let options = OverlayOptions {
        size: Some(MIB as u64),
        ..Default::default()
    };
    create_overlay(&empty, &options).unwrap();
    assert_consistent(&empty, 0);
    assert!(contents(&empty) == vec![0u8; MIB]);
}
