//! Consistency: after every flush the file alone is a complete, clean image; after a kill
//! between flushes (the image dropped without writing anything back) `qemu-img check` finds
//! no corruption and every flushed write is there.

use std::fs;

use super::*;

const MIB: usize = 1 << 20;

/// A copy of `image` as it is on disk right now.
fn snapshot_file(image: &Path, name: &str) -> PathBuf {
    let copy = image.with_file_name(name);
    fs::copy(image, &copy).unwrap();
    copy
}

#[test]
fn after_every_flush_the_file_is_complete_and_clean() {
    let scratch = Scratch::new("flushed");
    fs::write(scratch.path("base.raw"), pattern(1, 4 * MIB)).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    create(
        &overlay,
        "cluster_size=4096",
        Some(("base.raw", "raw")),
        None,
    );
    let mut model = pattern(1, 4 * MIB);
    let disk = open(&overlay, false);
    qcow2(&disk).set_cache_capacity(2, 1);
    for round in 0..6u64 {
        let offset = (round * 611_000) as usize;
        let data = pattern(round + 10, 150_000);
        write(qcow2(&disk), offset as u64, &data);
        model[offset..offset + data.len()].copy_from_slice(&data);
        if round % 2 == 1 {
            qcow2(&disk).discard(round * 300_000, 200_000).unwrap();
            let start = ((round * 300_000).div_ceil(4096) * 4096) as usize;
            let end = ((round * 300_000 + 200_000) / 4096 * 4096) as usize;
            model[start..end].fill(0);
        }
        disk.flush().unwrap();
        let copy = snapshot_file(&overlay, "copy.qcow2");
        assert_consistent(&copy, 0);
        assert!(contents(&copy) == model, "round {round}");
        fs::remove_file(copy).unwrap();
    }
}

#[test]
fn a_kill_between_flushes_leaves_a_consistent_image_with_the_flushed_data() {
    let scratch = Scratch::new("killed");
    fs::write(scratch.path("base.raw"), pattern(2, 16 * MIB)).unwrap();
    let overlay = scratch.path("overlay.qcow2");
    // Small clusters and L2 tables: many tables and refcount blocks change between flushes.
    create(
        &overlay,
        "cluster_size=1024",
        Some(("base.raw", "raw")),
        None,
    );
    let mut flushed = pattern(2, 16 * MIB);
    let disk = open(&overlay, false);
    // Tiny caches: tables are evicted (and checkpoints taken, refcount blocks written) in the
    // middle of requests, not only on flushes.
    qcow2(&disk).set_cache_capacity(3, 2);
    for round in 0..4u64 {
        let offset = (round * 3_700_000) as usize;
        let data = pattern(round + 20, 700_000);
        write(qcow2(&disk), offset as u64, &data);
        flushed[offset..offset + data.len()].copy_from_slice(&data);
    }
    disk.flush().unwrap();
    // Unflushed: more allocating writes, overwrites, a discard, zeroes.
    for round in 0..40u64 {
        let offset = (round * 397_000) % (15 * MIB as u64);
        write(qcow2(&disk), offset, &pattern(round + 50, 30_000));
        if round % 7 == 0 {
            qcow2(&disk).discard(offset + 50_000, 100_000).unwrap();
            qcow2(&disk)
                .write_zeroes(offset + 200_000, 70_000, round % 2 == 0)
                .unwrap();
        }
        // The file as a kill at this point would leave it.
        if round % 10 == 9 {
            let copy = snapshot_file(&overlay, "killed.qcow2");
            assert_consistent(&copy, u64::MAX);
            fs::remove_file(copy).unwrap();
        }
    }
    // Killed: nothing more is written back.
    std::mem::forget(disk);
    let report = assert_consistent(&overlay, u64::MAX);
    // Proof the kill caught metadata half written back (clusters counted, not yet mapped).
    assert!(report.leaks > 0, "{report:?}");
    let after = contents(&overlay);
    // Every flushed write is there unless a later (unflushed) request covered it: compare the
    // parts no unflushed request touched.
    let mut touched = vec![false; 16 * MIB];
    for round in 0..40u64 {
        let offset = ((round * 397_000) % (15 * MIB as u64)) as usize;
        touched[offset..offset + 30_000].fill(true);
        if round % 7 == 0 {
            touched[offset + 50_000..offset + 270_000].fill(true);
        }
    }
    let differing = (0..16 * MIB)
        .filter(|&i| !touched[i] && after[i] != flushed[i])
        .count();
    assert_eq!(differing, 0, "flushed bytes lost");
}

#[test]
fn a_clean_close_writes_everything_back() {
    let scratch = Scratch::new("closed");
    let image = scratch.path("image.qcow2");
    create(&image, "", None, Some("4M"));
    let data = pattern(3, 3 * MIB);
    {
        let disk = open(&image, false);
        write(qcow2(&disk), 4096, &data);
        // No flush: dropping the disk (the VM ending) writes the metadata back.
    }
    assert_consistent(&image, 0);
    assert!(contents(&image)[4096..4096 + data.len()] == data[..]);
}
