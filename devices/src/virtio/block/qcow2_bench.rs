//! The disk backends' own cost, raw against qcow2, on this host (no guest, no nesting).
//!
//! Not run by default; in release mode:
//! `cargo test -p kiln-devices --release -- --ignored --nocapture qcow2_bench`
//!
//! Requests are shaped as a Linux guest's `O_DIRECT` I/O arrives: 1 MiB sequential requests in
//! 4 KiB guest pages, and single 4 KiB pages at random offsets, through
//! `DiskImage::{read,write}_segments` (the call the request path makes). The image lives in the
//! page cache (a 64 MiB file), as a VM's does when the host has memory for it, so the figures are
//! the backends' CPU cost per request plus the page-cache copies both share.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::disk::{DiskFormat, DiskImage};
use super::qcow2::{create_overlay, OverlayOptions};
use super::request::Segment;
use super::test_utils::{guest_memory, TempImage};

const DISK: u64 = 64 << 20;
const PAGE: u32 = 4096;
const BUFFERS: u64 = 0x10_0000;

/// 1 MiB request starting at guest address `BUFFERS`, as 256 pages in reverse order (a real
/// guest's pages are scattered; reversed, none are adjacent).
fn pages() -> Vec<Segment> {
    (0..256u64)
        .rev()
        .map(|i| Segment {
            addr: GuestAddress(BUFFERS + i * u64::from(PAGE)),
            len: PAGE,
        })
        .collect()
}

struct Figures {
    seq_write: f64,
    seq_rewrite: f64,
    seq_read: f64,
    rand_read: f64,
    rand_write: f64,
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

fn measure(disk: &DiskImage) -> Figures {
    let memory = guest_memory();
    memory
        .write_slice(&vec![0x5au8; 1 << 20], GuestAddress(BUFFERS))
        .unwrap();
    let request = pages();
    let seq = |write: bool| {
        let start = Instant::now();
        for offset in (0..DISK).step_by(1 << 20) {
            if write {
                disk.write_segments(&memory, &request, offset).unwrap();
            } else {
                disk.read_segments(&memory, &request, offset).unwrap();
            }
        }
        if write {
            disk.flush().unwrap();
        }
        rate(DISK, start.elapsed())
    };
    let seq_write = seq(true);
    let seq_rewrite = seq(true);
    let seq_read = seq(false);
    let random = |write: bool| {
        let one = [Segment {
            addr: GuestAddress(BUFFERS),
            len: PAGE,
        }];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let count = 100_000u32;
        let start = Instant::now();
        for _ in 0..count {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let offset = (state % (DISK / u64::from(PAGE))) * u64::from(PAGE);
            if write {
                disk.write_segments(&memory, &one, offset).unwrap();
            } else {
                disk.read_segments(&memory, &one, offset).unwrap();
            }
        }
        f64::from(count) / start.elapsed().as_secs_f64()
    };
    let rand_read = random(false);
    let rand_write = random(true);
    Figures {
        seq_write,
        seq_rewrite,
        seq_read,
        rand_read,
        rand_write,
    }
}

#[test]
#[ignore = "benchmark; run explicitly in release mode"]
fn qcow2_bench() {
    let mut rows: Vec<(&str, Vec<Figures>)> = vec![("raw", vec![]), ("qcow2 overlay", vec![])];
    for _ in 0..5 {
        let raw = TempImage::new("bench-raw", DISK);
        rows[0]
            .1
            .push(measure(&DiskImage::open(raw.path(), false, None).unwrap()));
        let base = TempImage::new("bench-base", DISK);
        let overlay = TempImage::new("bench-overlay", 0);
        std::fs::remove_file(overlay.path()).unwrap();
        let options = OverlayOptions {
            backing: Some(base.path().to_path_buf()),
            backing_format: Some(DiskFormat::Raw),
            ..Default::default()
        };
        create_overlay(overlay.path(), &options).unwrap();
        let disk =
            DiskImage::open_as(overlay.path(), false, None, Some(DiskFormat::Qcow2)).unwrap();
        rows[1].1.push(measure(&disk));
    }
    let median = |figures: &[Figures], pick: fn(&Figures) -> f64| {
        let mut values: Vec<f64> = figures.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    type Metric = (&'static str, fn(&Figures) -> f64);
    let metrics: [Metric; 5] = [
        ("sequential write, fresh (MB/s)", |f| f.seq_write),
        ("sequential rewrite (MB/s)", |f| f.seq_rewrite),
        ("sequential read (MB/s)", |f| f.seq_read),
        ("4 KiB random read (IOPS)", |f| f.rand_read),
        ("4 KiB random write, written range (IOPS)", |f| f.rand_write),
    ];
    println!("| median of 5 | raw | qcow2 overlay | qcow2/raw |");
    println!("|---|---:|---:|---:|");
    for (name, pick) in metrics {
        let raw = median(&rows[0].1, pick);
        let qcow2 = median(&rows[1].1, pick);
        println!("| {name} | {raw:.0} | {qcow2:.0} | {:.2} |", qcow2 / raw);
    }
}
