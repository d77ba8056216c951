//! The memory file: guest RAM region after region (pages of zeros left as holes), then a footer
//! that ties it to its state file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use super::files::write_atomically;
use super::{MemoryLayer, SavedRegion, SnapshotError};
use crate::memory::GuestMemory;

/// "KILNMEM1", the snapshot id, the RAM length, 8 reserved bytes.
const FOOTER_MAGIC: [u8; 8] = *b"KILNMEM1";
const FOOTER_LEN: u64 = 32;
/// Unit of the zero-page check.
const PAGE: usize = 4096;

/// Writes every region of `memory` to `path` (atomically) and returns the layout.
///
/// The VM must be paused: nothing may write guest memory meanwhile.
pub fn write_memory_file(
    path: &Path,
    memory: &GuestMemory,
    snapshot_id: u64,
) -> Result<Vec<SavedRegion>, SnapshotError> {
    let regions: Vec<SavedRegion> = memory
        .iter()
        .map(|region| SavedRegion {
            guest_addr: region.start_addr().raw_value(),
            len: region.len(),
        })
        .collect();
    write_atomically(path, "write the snapshot memory file", |file| {
        let mut offset = 0u64;
        for region in &regions {
            let host = memory
                .get_host_address(GuestAddress(region.guest_addr))
                .map_err(std::io::Error::other)?;
            // SAFETY: `host` is the start of a live mapping of `region.len` bytes owned by
            // `memory`; the VM is paused, so no vCPU or device writes it while it is read.
            let bytes = unsafe { std::slice::from_raw_parts(host, region.len as usize) };
            write_sparse(file, bytes, offset)?;
            offset += region.len;
        }
        file.set_len(offset)?;
        file.write_all_at(&footer(snapshot_id, offset), offset)
    })?;
    Ok(regions)
}

/// Writes the pages `dirty(region index, page index)` names (zero pages included: a diff must
/// say that a page became zero) into a sparse file of the full layout, atomically; returns
/// the byte ranges written.
pub fn write_diff_memory_file(
    path: &Path,
    memory: &GuestMemory,
    snapshot_id: u64,
    dirty: impl Fn(usize, usize) -> bool,
) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    write_atomically(path, "write the snapshot memory file", |file| {
        let mut offset = 0u64;
        for (index, region) in memory.iter().enumerate() {
            let host = memory
                .get_host_address(region.start_addr())
                .map_err(std::io::Error::other)?;
            // SAFETY: as in write_memory_file: a live mapping of `len` bytes, VM paused.
            let bytes = unsafe { std::slice::from_raw_parts(host, region.len() as usize) };
            for (page_index, page) in bytes.chunks(PAGE).enumerate() {
                if !dirty(index, page_index) {
                    continue;
                }
                let at = offset + (page_index * PAGE) as u64;
                file.write_all_at(page, at)?;
                match ranges.last_mut() {
                    Some((start, len)) if *start + *len == at => *len += page.len() as u64,
                    _ => ranges.push((at, page.len() as u64)),
                }
            }
            offset += region.len();
        }
        file.set_len(offset)?;
        file.write_all_at(&footer(snapshot_id, offset), offset)
    })?;
    Ok(ranges)
}

fn footer(snapshot_id: u64, total: u64) -> [u8; FOOTER_LEN as usize] {
    let mut footer = [0u8; FOOTER_LEN as usize];
    footer[..8].copy_from_slice(&FOOTER_MAGIC);
    footer[8..16].copy_from_slice(&snapshot_id.to_le_bytes());
    footer[16..24].copy_from_slice(&total.to_le_bytes());
    footer
}

/// Maps a chain of memory files: the full base privately, then each diff's pages copied over
/// it in order. `last` is where the newest layer is now (it may have moved since).
pub fn map_memory_layers(
    last: &Path,
    regions: &[SavedRegion],
    layers: &[MemoryLayer],
) -> Result<GuestMemory, SnapshotError> {
    let path_of = |index: usize| -> &Path {
        if index + 1 == layers.len() {
            last
        } else {
            &layers[index].path
        }
    };
    let Some(base) = layers.first() else {
        return Err(SnapshotError::MemoryFile {
            path: last.to_path_buf(),
            reason: "the state file names no memory file".into(),
        });
    };
    if base.pages.is_some() {
        return Err(SnapshotError::MemoryFile {
            path: path_of(0).to_path_buf(),
            reason: "the chain does not start with a full memory file".into(),
        });
    }
    let memory = map_memory_file(path_of(0), regions, base.snapshot_id)?;
    for (index, layer) in layers.iter().enumerate().skip(1) {
        let path = path_of(index);
        let bad = |reason: String| SnapshotError::MemoryFile {
            path: path.to_path_buf(),
            reason,
        };
        let Some(pages) = &layer.pages else {
            return Err(bad(
                "a full memory file in the middle of a diff chain".into()
            ));
        };
        let file = open_checked(path, regions, layer.snapshot_id)?;
        for &(offset, len) in pages {
            copy_into_guest(&file, &memory, regions, offset, len)
                .map_err(|err| bad(format!("cannot read its pages: {err}")))?;
        }
    }
    Ok(memory)
}

/// Reads `len` bytes at `offset` of a memory file into the guest RAM they belong to.
fn copy_into_guest(
    file: &File,
    memory: &GuestMemory,
    regions: &[SavedRegion],
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let mut region_start = 0u64;
    for region in regions {
        let region_end = region_start + region.len;
        let from = offset.max(region_start);
        let to = (offset + len).min(region_end);
        if from < to {
            let guest = GuestAddress(region.guest_addr + (from - region_start));
            let host = memory
                .get_host_address(guest)
                .map_err(std::io::Error::other)?;
            // SAFETY: `host` points into the live private mapping of this region, which spans
            // at least `to - from` bytes from `guest` (checked against the region's bounds
            // above); no vCPU runs yet, and no other reference to these bytes exists.
            let target = unsafe { std::slice::from_raw_parts_mut(host, (to - from) as usize) };
            file.read_exact_at(target, from)?;
        }
        region_start = region_end;
    }
    Ok(())
}

/// Writes the non-zero pages of `bytes` at `offset`; zero pages stay holes.
fn write_sparse(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run_start = None;
    for (index, page) in bytes.chunks(PAGE).enumerate() {
        let zero = page.iter().all(|&byte| byte == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(index),
            (true, Some(start)) => {
                let from = start * PAGE;
                file.write_all_at(&bytes[from..index * PAGE], offset + from as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        let from = start * PAGE;
        file.write_all_at(&bytes[from..], offset + from as u64)?;
    }
    Ok(())
}

/// Opens a memory file and checks its size and footer against the layout and snapshot id.
fn open_checked(
    path: &Path,
    regions: &[SavedRegion],
    snapshot_id: u64,
) -> Result<File, SnapshotError> {
    let bad = |reason: String| SnapshotError::MemoryFile {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|err| bad(format!("cannot open it: {err}")))?;
    let total: u64 = regions.iter().map(|region| region.len).sum();
    let size = file
        .metadata()
        .map_err(|err| bad(format!("cannot read its size: {err}")))?
        .len();
    if size != total + FOOTER_LEN {
        return Err(bad(format!(
            "it holds {size} bytes, the snapshot's {} MiB of RAM need {} (wrong file, or \
             truncated)",
            total >> 20,
            total + FOOTER_LEN
        )));
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut footer, total)
        .map_err(|err| bad(format!("cannot read its footer: {err}")))?;
    let id = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
    if footer[..8] != FOOTER_MAGIC || id != snapshot_id {
        return Err(bad(
            "it belongs to another snapshot than this state file".to_string()
        ));
    }
    Ok(file)
}

/// Maps a memory file privately as guest RAM laid out as `regions` (pages load on first touch;
/// the guest's writes stay in this process). Checks the footer first.
pub fn map_memory_file(
    path: &Path,
    regions: &[SavedRegion],
    snapshot_id: u64,
) -> Result<GuestMemory, SnapshotError> {
    let bad = |reason: String| SnapshotError::MemoryFile {
        path: path.to_path_buf(),
        reason,
    };
    let file = open_checked(path, regions, snapshot_id)?;
    let mut mapped = Vec::with_capacity(regions.len());
    let mut offset = 0u64;
    for region in regions {
        let handle = file
            .try_clone()
            .map_err(|err| bad(format!("cannot duplicate its descriptor: {err}")))?;
        let mapping = MmapRegionBuilder::new(region.len as usize)
            .with_file_offset(FileOffset::new(handle, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|err| bad(format!("cannot map it: {err}")))?;
        offset += region.len;
        let region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr))
            .ok_or_else(|| bad("a region does not fit the guest address space".into()))?;
        mapped.push(region);
    }
    GuestMemory::from_regions(mapped).map_err(|err| bad(format!("bad region layout: {err}")))
}
