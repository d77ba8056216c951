//! The image's metadata in memory: the L1 table, cached L2 tables, refcounts and the clusters
//! waiting to be freed, and the checkpoint that writes them back in an order that keeps the file
//! consistent at every point.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::cache::{Cache, Cached, Dirty};
use super::entry::{decode_l1, decode_l2, Corrupt, Mapping, COPIED, OFFSET_MASK};
use super::header::{Compression, Header};
use super::refcount::{write_entries, Refcounts};

/// Memory for cached L2 tables: 32 MiB maps 256 GiB with 64 KiB clusters.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// Geometry of an image.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// 2 or 3.
    pub version: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// How compressed clusters are compressed.
    pub compression: Compression,
}

impl Layout {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// Metadata of an open image.
#[derive(Debug)]
pub struct Metadata {
    /// Geometry.
    pub layout: Layout,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: Dirty,
    l2: Cache<Vec<u64>>,
    /// Refcounts and the allocator.
    pub refs: Refcounts,
    /// Host byte ranges whose clusters lose a reference once the metadata that dropped it is
    /// on disk.
    pending_frees: Vec<(u64, u64)>,
    /// The last compressed cluster read, decompressed: sequential reads of a compressed
    /// cluster decompress it once.
    pub compressed: Option<(u64, Vec<u8>)>,
}

impl Metadata {
    /// Metadata from a checked header, its L1 table and refcount table (checked by the caller).
    pub fn new(header: &Header, l1: Vec<u64>, reftable: Vec<u64>, file_size: u64) -> Self {
        let layout = Layout {
            cluster_bits: header.cluster_bits,
            l2_entries: header.cluster_size() / 8,
            version: header.version,
            size: header.size,
            compression: header.compression,
        };
        let cluster_size = layout.cluster_size();
        let mut refs = Refcounts::new(
            header.cluster_bits,
            header.refcount_order,
            reftable,
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters),
            file_size,
        );
        // Clusters that hold metadata: never allocated, never written as guest data.
        let clusters = |offset: u64, len: u64| {
            (offset >> header.cluster_bits)..(offset + len).div_ceil(cluster_size)
        };
        let mut reserved: Vec<u64> = vec![0];
        reserved.extend(clusters(
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
        ));
        reserved.extend(clusters(
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cluster_size,
        ));
        reserved.extend(
            l1.iter()
                .map(|entry| (entry & OFFSET_MASK) >> header.cluster_bits)
                .filter(|&cluster| cluster != 0),
        );
        reserved.extend(
            refs.block_offsets()
                .map(|offset| offset >> header.cluster_bits)
                .collect::<Vec<_>>(),
        );
        refs.reserved.extend(reserved);
        Self {
            layout,
            l1,
            l1_offset: header.l1_table_offset,
            l1_dirty: Dirty::clean(),
            l2: Cache::new((L2_CACHE_BYTES / cluster_size).max(16) as usize),
            refs,
            pending_frees: Vec::new(),
            compressed: None,
        }
    }

    /// The L2 table at `offset`, loaded if needed (a full cache is checkpointed first when
    /// every table in it has changes).
    fn l2_table(&mut self, file: &File, offset: u64) -> io::Result<&mut Cached<Vec<u64>>> {
        if !self.l2.contains(offset) {
            let cluster_size = self.layout.cluster_size();
            if offset + cluster_size > self.refs.file_end {
                return Err(Corrupt(format!(
                    "an L2 table at {offset:#x} lies past the end of the image"
                ))
                .into());
            }
            let mut bytes = vec![0u8; cluster_size as usize];
            file.read_exact_at(&mut bytes, offset)?;
            let table = bytes
                .chunks_exact(8)
                .map(|chunk| u64::from_be_bytes(chunk.try_into().unwrap_or_default()))
                .collect();
            self.make_l2_room(file)?;
            self.l2.insert(offset, table, Dirty::clean());
        }
        self.l2
            .get_mut(offset)
            .ok_or_else(|| io::Error::other("L2 table vanished from the cache"))
    }

    fn make_l2_room(&mut self, file: &File) -> io::Result<()> {
        if self.l2.is_full() && !self.l2.evict_clean() {
            self.checkpoint(file)?;
            self.l2.evict_clean();
        }
        Ok(())
    }

    fn l1_entry(&self, guest_cluster: u64) -> Result<(usize, u64, bool), Corrupt> {
        let index = (guest_cluster / self.layout.l2_entries) as usize;
        let entry = *self.l1.get(index).ok_or_else(|| {
            Corrupt(format!(
                "guest cluster {guest_cluster} is beyond the L1 table"
            ))
        })?;
        let (offset, copied) = decode_l1(entry, index, self.layout.cluster_size())?;
        Ok((index, offset, copied))
    }

    /// Where guest cluster `guest_cluster` is.
    pub fn lookup(&mut self, file: &File, guest_cluster: u64) -> io::Result<Mapping> {
        let (_, offset, _) = self.l1_entry(guest_cluster)?;
        if offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        let index = (guest_cluster % self.layout.l2_entries) as usize;
        let entry = self.l2_table(file, offset)?.data[index];
        let Layout {
            cluster_bits,
            version,
            ..
        } = self.layout;
        Ok(decode_l2(entry, guest_cluster, cluster_bits, version)?)
    }

    /// The L2 table guest cluster `guest_cluster` is mapped by, made writable: allocated if
    /// there is none, copied if it is shared with a snapshot.
    fn writable_l2(&mut self, file: &File, guest_cluster: u64) -> io::Result<u64> {
        let (index, offset, copied) = self.l1_entry(guest_cluster)?;
        if offset != 0 && copied {
            return Ok(offset);
        }
        let entries = if offset == 0 {
            vec![0u64; self.layout.l2_entries as usize]
        } else {
            self.l2_table(file, offset)?.data.clone()
        };
        let new = self.refs.allocate(file, 1)? << self.layout.cluster_bits;
        self.make_l2_room(file)?;
        self.l2
            .insert(new, entries, Dirty::all(self.layout.l2_entries as usize));
        self.refs.reserved.insert(new >> self.layout.cluster_bits);
        self.l1[index] = new | COPIED;
        self.l1_dirty.mark(index, index + 1);
        if offset != 0 {
            self.pending_frees
                .push((offset, self.layout.cluster_size()));
        }
        Ok(new)
    }

    /// Points guest cluster `guest_cluster` at `entry` (a raw L2 entry). Whatever the old entry
    /// held a reference to is freed once the change is on disk, unless the new entry keeps it.
    pub fn set_mapping(&mut self, file: &File, guest_cluster: u64, entry: u64) -> io::Result<()> {
        let table = self.writable_l2(file, guest_cluster)?;
        let index = (guest_cluster % self.layout.l2_entries) as usize;
        let Layout {
            cluster_bits,
            version,
            ..
        } = self.layout;
        let cached = self.l2_table(file, table)?;
        let old = std::mem::replace(&mut cached.data[index], entry);
        cached.dirty.mark(index, index + 1);
        // An old entry that does not decode held nothing Kiln can account for: leaked.
        if let Ok(old) = decode_l2(old, guest_cluster, cluster_bits, version) {
            if let Some((start, len)) = old.host_range(self.layout.cluster_size()) {
                let kept =
                    !matches!(old, Mapping::Compressed { .. }) && start == entry & OFFSET_MASK;
                if !kept {
                    self.pending_frees.push((start, len));
                }
            }
        }
        Ok(())
    }

    /// Writes every change back, each step only after what it points to is durable:
    /// guest data and refcount blocks, then the refcount table, then L2 tables, then the L1
    /// table, then the refcounts of clusters that are no longer referenced. A crash at any
    /// point leaves at most leaked clusters.
    pub fn checkpoint(&mut self, file: &File) -> io::Result<()> {
        self.refs.write_dirty_blocks(file)?;
        file.sync_data()?;
        if self.refs.write_dirty_table(file)? {
            file.sync_data()?;
        }
        let mut wrote_l2 = false;
        for offset in self.l2.dirty_offsets() {
            if let Some(entry) = self.l2.get_mut(offset) {
                write_entries(file, &entry.data, offset, &mut entry.dirty)?;
                wrote_l2 = true;
            }
        }
        if wrote_l2 {
            file.sync_data()?;
        }
        if write_entries(file, &self.l1, self.l1_offset, &mut self.l1_dirty)? {
            file.sync_data()?;
        }
        if self.pending_frees.is_empty() {
            return Ok(());
        }
        self.compressed = None;
        let mut first_error = None;
        for (start, len) in std::mem::take(&mut self.pending_frees) {
            let first = start >> self.layout.cluster_bits;
            let last = (start + len - 1) >> self.layout.cluster_bits;
            for cluster in first..=last {
                if let Err(err) = self.refs.decrement(file, cluster) {
                    first_error.get_or_insert(err);
                }
            }
        }
        self.refs.write_dirty_blocks(file)?;
        file.sync_data()?;
        first_error.map_or(Ok(()), Err)
    }

    /// Shrinks the caches (tests force evictions and early checkpoints with tiny caches).
    #[cfg(test)]
    pub fn set_cache_capacity(&mut self, l2_tables: usize, refcount_blocks: usize) {
        self.l2.set_capacity(l2_tables);
        self.refs.set_cache_capacity(refcount_blocks);
    }

    /// Whether anything awaits a checkpoint.
    pub fn is_dirty(&self) -> bool {
        self.refs.any_dirty()
            || self.l2.any_dirty()
            || self.l1_dirty.is_dirty()
            || !self.pending_frees.is_empty()
    }
}
