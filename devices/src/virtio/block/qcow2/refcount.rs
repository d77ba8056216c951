//! Refcounts and cluster allocation.
//!
//! Increments (allocations) may reach the file at any time: a cluster counted but not yet
//! referenced is only a leak. Decrements are applied only after the metadata that stopped
//! referencing the cluster is on disk (see `Metadata::checkpoint`), so the file never holds a
//! reference to a cluster whose refcount is zero.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::cache::{sector_span, Cache, Cached, Dirty};
use super::entry::Corrupt;
use super::header::{MAX_REFTABLE_BYTES, REFTABLE_FIELDS_OFFSET};

/// Highest host offset a table entry can hold (bits 9 to 55).
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Refcount table entries: the low 9 bits are reserved.
const REFTABLE_RESERVED: u64 = 511;
/// Memory for cached refcount blocks.
const BLOCK_CACHE_BYTES: u64 = 4 << 20;

/// Reads entry `index` of a refcount block with `1 << order`-bit entries.
pub fn entry_get(block: &[u8], index: u64, order: u32) -> u64 {
    let i = index as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[i / per_byte];
            u64::from((byte >> ((i % per_byte) * bits)) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[i * 2], block[i * 2 + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[i * 4..i * 4 + 4].try_into().unwrap_or_default(),
        )),
        _ => u64::from_be_bytes(block[i * 8..i * 8 + 8].try_into().unwrap_or_default()),
    }
}

/// Writes entry `index`; returns the byte span it occupies.
pub fn entry_set(block: &mut [u8], index: u64, order: u32, value: u64) -> (usize, usize) {
    let i = index as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = &mut block[i / per_byte];
            *byte = (*byte & !mask) | (((value as u8) << shift) & mask);
            (i / per_byte, i / per_byte + 1)
        }
        3 => {
            block[i] = value as u8;
            (i, i + 1)
        }
        4 => {
            block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes());
            (i * 2, i * 2 + 2)
        }
        5 => {
            block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes());
            (i * 4, i * 4 + 4)
        }
        _ => {
            block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes());
            (i * 8, i * 8 + 8)
        }
    }
}

/// The refcount table, cached refcount blocks, and the allocator.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    per_block: u64,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    table_dirty: Dirty,
    blocks: Cache<Vec<u8>>,
    /// No free cluster below this one.
    free_hint: u64,
    /// Clusters holding metadata: never handed out, never overwritten with guest data.
    pub reserved: HashSet<u64>,
    /// End of the used part of the file: its size at open, grown by allocations.
    pub file_end: u64,
}

impl Refcounts {
    /// Refcounts described by a checked header and refcount table.
    pub fn new(
        cluster_bits: u32,
        order: u32,
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
        file_end: u64,
    ) -> Self {
        let cluster_size = 1u64 << cluster_bits;
        Self {
            cluster_bits,
            order,
            per_block: cluster_size * 8 / (1 << order),
            table,
            table_offset,
            table_clusters,
            table_dirty: Dirty::clean(),
            blocks: Cache::new((BLOCK_CACHE_BYTES / cluster_size) as usize),
            free_hint: 0,
            reserved: HashSet::new(),
            file_end,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The refcount block of block index `index`, loaded if needed.
    fn block(&mut self, file: &File, offset: u64) -> io::Result<&mut Cached<Vec<u8>>> {
        if !self.blocks.contains(offset) {
            if self.blocks.is_full() {
                self.evict_one(file)?;
            }
            let mut data = vec![0u8; self.cluster_size() as usize];
            file.read_exact_at(&mut data, offset)?;
            self.blocks.insert(offset, data, Dirty::clean());
        }
        self.blocks
            .get_mut(offset)
            .ok_or_else(|| io::Error::other("refcount block vanished from the cache"))
    }

    /// Makes room in the block cache: drops a clean block, or writes one out. Writing refcount
    /// blocks early is always safe (see the module comment).
    fn evict_one(&mut self, file: &File) -> io::Result<()> {
        if self.blocks.evict_clean() {
            return Ok(());
        }
        if let Some(offset) = self.blocks.least_recently_used() {
            if let Some(mut entry) = self.blocks.remove(offset) {
                if let Err(err) = write_span(file, &entry.data, offset, &mut entry.dirty) {
                    self.blocks.insert(offset, entry.data, entry.dirty);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn block_offset(&self, cluster: u64) -> Result<Option<u64>, Corrupt> {
        let index = cluster / self.per_block;
        match self.table.get(index as usize) {
            None | Some(0) => Ok(None),
            Some(&entry) if entry & REFTABLE_RESERVED != 0 => Err(Corrupt(format!(
                "refcount table entry {index} ({entry:#x}) has reserved bits set"
            ))),
            Some(&entry) => Ok(Some(entry)),
        }
    }

    /// The refcount of `cluster` (0 where no refcount block covers it).
    pub fn get(&mut self, file: &File, cluster: u64) -> io::Result<u64> {
        let Some(offset) = self.block_offset(cluster)? else {
            return Ok(0);
        };
        let (index, order) = (cluster % self.per_block, self.order);
        Ok(entry_get(&self.block(file, offset)?.data, index, order))
    }

    fn set(&mut self, file: &File, cluster: u64, value: u64) -> io::Result<()> {
        let Some(offset) = self.block_offset(cluster)? else {
            return Err(Corrupt(format!("no refcount block covers cluster {cluster}")).into());
        };
        let (index, order) = (cluster % self.per_block, self.order);
        let block = self.block(file, offset)?;
        let (start, end) = entry_set(&mut block.data, index, order, value);
        block.dirty.mark(start, end);
        Ok(())
    }

    /// Drops one reference to `cluster`.
    pub fn decrement(&mut self, file: &File, cluster: u64) -> io::Result<()> {
        let count = self.get(file, cluster)?;
        if count == 0 {
            return Err(Corrupt(format!(
                "cluster {cluster} is freed but its refcount is already 0"
            ))
            .into());
        }
        self.set(file, cluster, count - 1)?;
        if count == 1 {
            self.free_hint = self.free_hint.min(cluster);
            self.reserved.remove(&cluster);
        }
        Ok(())
    }

    /// Allocates `count` contiguous clusters with refcount 1; returns the first one's index.
    pub fn allocate(&mut self, file: &File, count: u64) -> io::Result<u64> {
        loop {
            let start = self.find_free(file, count)?;
            let first_block = start / self.per_block;
            let last_block = (start + count - 1) / self.per_block;
            let missing = (first_block..=last_block).find(|&block| {
                self.table
                    .get(block as usize)
                    .is_none_or(|&entry| entry == 0)
            });
            if let Some(block) = missing {
                // The new block takes the run's first cluster (so that the run, one cluster
                // later, still fits in the same place), then look again.
                self.create_block(file, block, start)?;
                continue;
            }
            for cluster in start..start + count {
                self.set(file, cluster, 1)?;
            }
            self.free_hint = start + count;
            self.file_end = self.file_end.max((start + count) << self.cluster_bits);
            return Ok(start);
        }
    }

    fn find_free(&mut self, file: &File, count: u64) -> io::Result<u64> {
        let mut start = self.free_hint.max(1);
        let mut cluster = start;
        while cluster - start < count {
            if self.reserved.contains(&cluster) || self.get(file, cluster)? != 0 {
                start = cluster + 1;
            }
            cluster += 1;
        }
        if (start + count) << self.cluster_bits > MAX_HOST_OFFSET {
            return Err(io::Error::other(
                "the qcow2 image is full (host offsets beyond 2^56)",
            ));
        }
        Ok(start)
    }

    fn create_block(&mut self, file: &File, block: u64, at: u64) -> io::Result<()> {
        if block as usize >= self.table.len() {
            // A larger table moves and may take the clusters found free: look again after.
            return self.grow_table(file, block);
        }
        // `block` is the first missing block of the run that starts at `at`: either it covers
        // `at` (and the new block counts itself), or the block covering `at` exists.
        let describes_itself = at / self.per_block == block;
        let mut data = vec![0u8; self.cluster_size() as usize];
        if describes_itself {
            entry_set(&mut data, at % self.per_block, self.order, 1);
        } else {
            self.set(file, at, 1)?;
        }
        if self.blocks.is_full() {
            self.evict_one(file)?;
        }
        let offset = at << self.cluster_bits;
        self.blocks
            .insert(offset, data, Dirty::all(self.cluster_size() as usize));
        self.table[block as usize] = offset;
        self.table_dirty.mark(block as usize, block as usize + 1);
        self.reserved.insert(at);
        self.file_end = self.file_end.max(offset + self.cluster_size());
        Ok(())
    }

    /// Moves the refcount table to the end of the file, large enough for block index
    /// `needed`, with new refcount blocks for itself. The header switches to it only once it
    /// and everything it points to is on disk.
    fn grow_table(&mut self, file: &File, needed: u64) -> io::Result<()> {
        let cluster_size = self.cluster_size();
        let end = self.file_end.div_ceil(cluster_size);
        let mut entries = (self.table.len() as u64 * 2).max(needed + 1);
        let (table_clusters, new_blocks) = loop {
            let table_clusters = (entries * 8).div_ceil(cluster_size);
            let mut new_blocks: Vec<u64> = Vec::new();
            loop {
                let last = end + table_clusters + new_blocks.len() as u64 - 1;
                let wanted: Vec<u64> = (end / self.per_block..=last / self.per_block)
                    .filter(|&b| self.table.get(b as usize).is_none_or(|&e| e == 0))
                    .collect();
                if wanted.len() == new_blocks.len() {
                    break;
                }
                new_blocks = wanted;
            }
            let top = new_blocks.iter().copied().max().unwrap_or(0);
            if top < entries {
                break (table_clusters, new_blocks);
            }
            entries = top + 1;
        };
        if table_clusters * cluster_size > MAX_REFTABLE_BYTES {
            return Err(io::Error::other(
                "the qcow2 image is full (its refcount table would exceed 8 MiB)",
            ));
        }
        // Whatever the current table points to must be on disk before the new one goes live.
        self.write_dirty_blocks(file)?;
        let area_end = end + table_clusters + new_blocks.len() as u64;
        let mut table = self.table.clone();
        table.resize((table_clusters * cluster_size / 8) as usize, 0);
        let mut block_data = Vec::new();
        for (i, &block) in new_blocks.iter().enumerate() {
            let at = end + table_clusters + i as u64;
            table[block as usize] = at << self.cluster_bits;
            block_data.push((at, vec![0u8; cluster_size as usize]));
        }
        for cluster in end..area_end {
            let block = cluster / self.per_block;
            match new_blocks.iter().position(|&b| b == block) {
                Some(i) => {
                    entry_set(
                        &mut block_data[i].1,
                        cluster % self.per_block,
                        self.order,
                        1,
                    );
                }
                // Not a new block: the current table has one for it.
                None => self.set(file, cluster, 1)?,
            }
        }
        for (at, data) in &block_data {
            file.write_all_at(data, at << self.cluster_bits)?;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let table_offset = end << self.cluster_bits;
        file.write_all_at(&bytes, table_offset)?;
        self.write_dirty_blocks(file)?;
        file.sync_data()?;
        let mut fields = [0u8; 12];
        fields[..8].copy_from_slice(&table_offset.to_be_bytes());
        fields[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_all_at(&fields, REFTABLE_FIELDS_OFFSET)?;
        file.sync_data()?;

        let old_start = self.table_offset >> self.cluster_bits;
        let old_clusters = self.table_clusters;
        self.table = table;
        self.table_offset = table_offset;
        self.table_clusters = table_clusters;
        self.table_dirty = Dirty::clean();
        self.reserved.extend(end..area_end);
        self.file_end = self.file_end.max(area_end << self.cluster_bits);
        // The header no longer points at the old table: its clusters are free now.
        for cluster in old_start..old_start + old_clusters {
            self.reserved.remove(&cluster);
            self.decrement(file, cluster)?;
        }
        log::debug!("qcow2: refcount table moved to {table_offset:#x} ({table_clusters} clusters)");
        Ok(())
    }

    /// Writes every changed refcount block; returns whether there was any.
    pub fn write_dirty_blocks(&mut self, file: &File) -> io::Result<bool> {
        let offsets = self.blocks.dirty_offsets();
        for &offset in &offsets {
            if let Some(entry) = self.blocks.get_mut(offset) {
                write_span(file, &entry.data, offset, &mut entry.dirty)?;
            }
        }
        Ok(!offsets.is_empty())
    }

    /// Writes the changed part of the refcount table; returns whether there was any.
    pub fn write_dirty_table(&mut self, file: &File) -> io::Result<bool> {
        write_entries(file, &self.table, self.table_offset, &mut self.table_dirty)
    }

    /// Whether refcount blocks or the table have unwritten changes.
    pub fn any_dirty(&self) -> bool {
        self.blocks.any_dirty() || self.table_dirty.is_dirty()
    }

    /// Shrinks the block cache (tests).
    #[cfg(test)]
    pub fn set_cache_capacity(&mut self, blocks: usize) {
        self.blocks.set_capacity(blocks);
    }

    /// Byte offsets of the refcount blocks, for the overlap checks.
    pub fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table.iter().copied().filter(|&entry| entry != 0)
    }
}

/// Writes the dirty byte span of `data` (a table at `offset`), widened to sectors; on failure
/// the span stays dirty.
pub fn write_span(file: &File, data: &[u8], offset: u64, dirty: &mut Dirty) -> io::Result<()> {
    let Some((start, end)) = dirty.take() else {
        return Ok(());
    };
    let (from, to) = sector_span(start, end, data.len());
    file.write_all_at(&data[from..to], offset + from as u64)
        .inspect_err(|_| dirty.mark(start, end))
}

/// Writes the dirty entries of a table of big-endian u64 at `offset`; returns whether any were.
pub fn write_entries(
    file: &File,
    entries: &[u64],
    offset: u64,
    dirty: &mut Dirty,
) -> io::Result<bool> {
    let Some((start, end)) = dirty.take() else {
        return Ok(false);
    };
    let (from, to) = sector_span(start * 8, end * 8, entries.len() * 8);
    let bytes: Vec<u8> = entries[from / 8..to.div_ceil(8)]
        .iter()
        .flat_map(|entry| entry.to_be_bytes())
        .collect();
    file.write_all_at(&bytes[..to - from], offset + from as u64)
        .inspect_err(|_| dirty.mark(start, end))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refcount_width_round_trips() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits;
            for index in 0..entries {
                entry_set(&mut block, index, order, (index * 7 + 3) & max);
            }
            for index in 0..entries {
                assert_eq!(
                    entry_get(&block, index, order),
                    (index * 7 + 3) & max,
                    "order {order} index {index}"
                );
            }
        }
        // QEMU's layout of sub-byte refcounts: the lowest bits hold the first entry.
        let mut block = vec![0u8; 1];
        entry_set(&mut block, 0, 0, 1);
        entry_set(&mut block, 3, 0, 1);
        assert_eq!(block[0], 0b1001);
        let mut block = vec![0u8; 4];
        entry_set(&mut block, 1, 4, 0x102);
        assert_eq!(block, [0, 0, 0x01, 0x02]);
    }
}
