//! Fuzzing harness for Kiln's qcow2 header and table parsing, and the data path over whatever
//! tables get through.
//!
//! One input is one image file. The harness opens it as Kiln opens a disk whose format it
//! detected (so a backing file the input names is refused, never opened) and, if it opens,
//! reads, writes, discards, zeroes and flushes, then opens it again read-only. What must hold
//! whatever the file holds:
//! - no panic, no hang;
//! - a write that succeeded reads back (immediately, from the same place) as written;
//! - the file never grows by more than a few clusters per request.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kiln_devices::virtio::block::qcow2::{create_overlay, OverlayOptions, Qcow2Image};
use kiln_devices::virtio::block::DiskImage;

/// How much of a virtual disk one input reads.
const READ_SPAN: u64 = 64 << 10;
/// The growth the harness allows: every request may allocate a data cluster, an L2 table, a
/// refcount block and a bigger refcount table (2 MiB clusters at most).
const MAX_GROWTH: u64 = 96 << 20;

fn image_path() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-fuzz-qcow2-{}.img", std::process::id()))
}

fn slice(buf: &mut [u8]) -> kiln_devices::virtio::block::qcow2::Slice<'_> {
    kiln_devices::virtio::block::qcow2::buffer_slice(buf)
}

fn read(image: &Qcow2Image, offset: u64, len: u64) -> Option<Vec<u8>> {
    let len = len.min(image.size().saturating_sub(offset));
    let mut buf = vec![0u8; len as usize];
    image.read(&[slice(&mut buf)], offset).ok().map(|()| buf)
}

/// Writes `data` at `offset` (inside the disk); if that worked and reading it back works, the
/// two must agree.
fn write_and_check(image: &Qcow2Image, offset: u64, data: &[u8]) {
    if offset + data.len() as u64 > image.size() {
        return;
    }
    let mut copy = data.to_vec();
    if image.write(&[slice(&mut copy)], offset).is_err() {
        return;
    }
    if let Some(back) = read(image, offset, data.len() as u64) {
        assert!(back == data, "a write at {offset} did not read back");
    }
}

/// Runs one input; returns whether the image opened. Panics if an invariant breaks.
pub fn run_qcow2_image(data: &[u8]) -> bool {
    // One input at a time: they share the file (tests run on several threads).
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _running = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let path = image_path();
    let _ = std::fs::remove_file(&path);
    File::create(&path)
        .and_then(|mut file| file.write_all(data))
        .expect("write the fuzz image");
    let opened = exercise(&path, data);
    let _ = std::fs::remove_file(&path);
    opened
}

fn exercise(path: &PathBuf, data: &[u8]) -> bool {
    let Ok(disk) = DiskImage::open_as(path, false, Some("fuzz"), None) else {
        return false;
    };
    let Some(image) = disk.qcow2() else {
        // Not qcow2 (no magic): a raw disk, not this harness's business.
        return true;
    };
    let size = image.size();
    let _ = read(image, 0, READ_SPAN);
    let _ = read(image, size.saturating_sub(4096), 4096);
    let seed = data
        .iter()
        .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
    let spots = [0, 5 * 512, (seed % size.max(1)) & !511, (size / 2) & !511];
    for (i, &offset) in spots.iter().enumerate() {
        write_and_check(image, offset, &[0x40 + i as u8; 512]);
    }
    let _ = image.discard(0, (size / 2).min(4 << 20));
    let _ = image.write_zeroes(
        (size / 4) & !511,
        3 * 512 + 65536,
        data.len().is_multiple_of(2),
    );
    write_and_check(image, spots[1], &[0x77; 1024]);
    let _ = disk.flush();
    drop(disk);
    let grown = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    assert!(
        grown <= data.len() as u64 + MAX_GROWTH,
        "the image grew from {} to {grown} bytes",
        data.len()
    );
    if let Ok(again) = DiskImage::open_as(path, true, Some("fuzz"), None) {
        if let Some(image) = again.qcow2() {
            let _ = read(image, 0, READ_SPAN);
        }
    }
    true
}

/// An image made by Kiln: `size` bytes, clusters of `1 << cluster_bits`, some data written,
/// a discard; then `edit` may change the file. Its bytes are the seed.
fn made_image(cluster_bits: u32, size: u64, edit: impl FnOnce(&File, &[u8])) -> Vec<u8> {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = image_path().with_extension(format!("seed{n}"));
    let _ = std::fs::remove_file(&path);
    let options = OverlayOptions {
        size: Some(size),
        cluster_bits: Some(cluster_bits),
        ..Default::default()
    };
    create_overlay(&path, &options).expect("create a seed image");
    {
        let disk = DiskImage::open(&path, false, None).expect("open the seed image");
        let image = disk.qcow2().expect("qcow2");
        for (i, offset) in [0u64, 3 * 512, size / 2, size - 1024].iter().enumerate() {
            let mut data = vec![0x11 * (i as u8 + 1); 1024];
            image
                .write(&[slice(&mut data)], *offset)
                .expect("seed write");
        }
        let cluster = 1u64 << cluster_bits;
        image.discard(size / 2, cluster).expect("seed discard");
        disk.flush().expect("seed flush");
    }
    let file = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .expect("seed");
    let bytes = std::fs::read(&path).expect("seed bytes");
    edit(&file, &bytes);
    let bytes = std::fs::read(&path).expect("seed bytes");
    let _ = std::fs::remove_file(&path);
    bytes
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}

/// Replaces guest cluster 1 with compressed data appended to the file.
fn compress_cluster_one(file: &File, bytes: &[u8], zstd: bool, cluster_bits: u32) {
    let cluster = 1usize << cluster_bits;
    let plain: Vec<u8> = (0..cluster).map(|i| (i / 7) as u8).collect();
    let compressed = if zstd {
        let mut out = Vec::new();
        ruzstd::encoding::compress(
            &plain[..],
            &mut out,
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        out
    } else {
        miniz_oxide::deflate::compress_to_vec(&plain, 6)
    };
    let at = (bytes.len() as u64).div_ceil(512) * 512;
    file.write_all_at(&compressed, at).expect("seed");
    let sectors = (compressed.len() as u64).div_ceil(512);
    let shift = 62 - (cluster_bits - 8);
    let entry = (1u64 << 62) | ((sectors - 1) << shift) | at;
    let l2 = be64(bytes, be64(bytes, 40) as usize) & 0x00ff_ffff_ffff_fe00;
    file.write_all_at(&entry.to_be_bytes(), l2 + 8)
        .expect("seed");
    if zstd {
        file.write_all_at(&(1u64 << 3).to_be_bytes(), 72)
            .expect("seed");
        file.write_all_at(&[1], 104).expect("seed");
    }
}

/// A mutated copy of an image: big-endian interesting values where header and table fields
/// live (mostly the first 512 bytes), byte flips, truncation, growth.
pub fn mutate_image(input: &[u8], rng: &mut crate::Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    if out.is_empty() {
        out.push(0);
    }
    for _ in 0..=rng.below(6) {
        let anywhere = rng.below(4) == 0;
        let at = if anywhere {
            rng.below(out.len())
        } else {
            rng.below(out.len().min(512)) & !3
        };
        match rng.below(5) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => {
                let values: [u64; 10] = [
                    0,
                    1,
                    9,
                    21,
                    512,
                    0x1_0000,
                    1 << 62,
                    1 << 63,
                    u32::MAX as u64,
                    u64::MAX,
                ];
                let value = values[rng.below(values.len())].to_be_bytes();
                let width = [4, 8][rng.below(2)];
                let end = (at + width).min(out.len());
                out[at..end].copy_from_slice(&value[8 - width..8 - width + (end - at)]);
            }
            2 => out.truncate(at.max(1)),
            3 => out.extend((0..rng.below(600)).map(|_| rng.next_u64() as u8)),
            _ => out[at] = rng.next_u64() as u8,
        }
    }
    out
}

/// Valid images of several shapes, with every kind of L2 entry.
pub fn qcow2_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("512-byte-clusters", made_image(9, 256 << 10, |_, _| {})),
        ("4k-clusters", made_image(12, 1 << 20, |_, _| {})),
        (
            "zlib-cluster",
            made_image(9, 64 << 10, |file, bytes| {
                compress_cluster_one(file, bytes, false, 9)
            }),
        ),
        (
            "zstd-cluster",
            made_image(9, 64 << 10, |file, bytes| {
                compress_cluster_one(file, bytes, true, 9)
            }),
        ),
        (
            "version-2",
            made_image(9, 128 << 10, |file, _| {
                file.write_all_at(&2u32.to_be_bytes(), 4).expect("seed");
            }),
        ),
        (
            "backing-file",
            made_image(9, 64 << 10, |file, _| {
                file.write_all_at(&200u64.to_be_bytes(), 8).expect("seed");
                file.write_all_at(&8u32.to_be_bytes(), 16).expect("seed");
                file.write_all_at(b"base.raw", 200).expect("seed");
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    #[test]
    fn seeds_open_and_keep_the_invariants() {
        let opened: Vec<(&str, bool)> = qcow2_seeds()
            .iter()
            .map(|(name, input)| (*name, run_qcow2_image(input)))
            .collect();
        assert_eq!(
            opened,
            vec![
                ("512-byte-clusters", true),
                ("4k-clusters", true),
                ("zlib-cluster", true),
                ("zstd-cluster", true),
                ("version-2", true),
                // Detected, names a backing file: refused.
                ("backing-file", false),
            ]
        );
    }

    #[test]
    fn short_random_run_keeps_the_invariants() {
        let seeds = qcow2_seeds();
        let mut rng = Rng::new(0x7163_6f77);
        for _ in 0..1500 {
            let (_, base) = &seeds[rng.below(seeds.len())];
            run_qcow2_image(&mutate_image(base, &mut rng));
        }
    }
}
