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
use super::{SavedRegion, SnapshotError};
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
        let mut footer = [0u8; FOOTER_LEN as usize];
        footer[..8].copy_from_slice(&FOOTER_MAGIC);
        footer[8..16].copy_from_slice(&snapshot_id.to_le_bytes());
        footer[16..24].copy_from_slice(&offset.to_le_bytes());
        file.write_all_at(&footer, offset)
    })?;
    Ok(regions)
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
