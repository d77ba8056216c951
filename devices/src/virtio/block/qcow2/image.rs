//! The data path of an open qcow2 image: reads (backing file, zero and compressed clusters),
//! writes with allocation and copy-on-write, write-zeroes and discard, flush.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::compress::decompress_cluster;
use super::entry::{Corrupt, Mapping, COPIED, ZERO};
use super::io::{buffer_slice, read_up_to, write_zeros, Slice, SliceCursor};
use super::meta::{Layout, Metadata};

/// Most clusters allocated for one piece of a request: bounds the copy-on-write work done
/// under one lock.
const MAX_ALLOCATION_RUN: u64 = 1024;

/// The image below an overlay. Opened read-only.
#[derive(Debug)]
pub enum Backing {
    /// A raw file (or block device) of `size` bytes.
    Raw {
        /// The file.
        file: File,
        /// Where it is.
        path: PathBuf,
        /// Its size; reads past it are zeros.
        size: u64,
    },
    /// Another qcow2 image.
    Qcow2(Box<Qcow2Image>),
}

/// Where written data comes from.
pub enum Source<'c, 's, 'a> {
    /// Buffers (guest memory).
    Buffers(&'c mut SliceCursor<'s, 'a>),
    /// Zeros.
    Zeros,
}

impl Source<'_, '_, '_> {
    fn write_to(&mut self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        match self {
            Source::Buffers(cursor) => cursor.write_file(file, offset, len),
            Source::Zeros => write_zeros(file, offset, len),
        }
    }
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    file: File,
    path: PathBuf,
    readonly: bool,
    layout: Layout,
    meta: Mutex<Metadata>,
    backing: Option<Backing>,
}

impl Qcow2Image {
    /// An image whose metadata is loaded and checked.
    pub(super) fn new(
        file: File,
        path: PathBuf,
        readonly: bool,
        meta: Metadata,
        backing: Option<Backing>,
    ) -> Self {
        Self {
            file,
            path,
            readonly,
            layout: meta.layout,
            meta: Mutex::new(meta),
            backing,
        }
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.layout.cluster_size()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.size
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// Whether write-zeroes and discard can be done in the metadata (version 3 zero clusters).
    pub fn supports_zero_clusters(&self) -> bool {
        self.layout.version >= 3 && !self.readonly
    }

    fn lock(&self) -> MutexGuard<'_, Metadata> {
        // A panic while holding the lock cannot leave the metadata half-changed in a way later
        // requests could not cope with: every change is one assignment.
        self.meta
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{len} bytes at {offset} reach past the end of the disk"),
            )),
        }
    }

    /// Reads into `slices` from guest byte `offset`.
    pub fn read(&self, slices: &[Slice<'_>], offset: u64) -> io::Result<()> {
        let len = SliceCursor::total(slices);
        self.read_into(&mut SliceCursor::new(slices), offset, len)
    }

    fn read_into(&self, cursor: &mut SliceCursor<'_, '_>, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        let mut meta = self.lock();
        let cluster_size = self.layout.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let guest_cluster = pos >> self.layout.cluster_bits;
            let within = pos & (cluster_size - 1);
            let first = meta.lookup(&self.file, guest_cluster)?;
            let mut run = (cluster_size - within).min(end - pos);
            // Neighbouring clusters of the same kind (and, for data, contiguous on the host)
            // are read in one go.
            while pos + run < end {
                let next = meta.lookup(&self.file, (pos + run) >> self.layout.cluster_bits)?;
                let joins = match (first, next) {
                    (Mapping::Data { host, .. }, Mapping::Data { host: next, .. }) => {
                        next == host + within + run
                    }
                    (Mapping::Unallocated, Mapping::Unallocated) => true,
                    (Mapping::Zero { .. }, Mapping::Zero { .. }) => true,
                    _ => false,
                };
                if !joins {
                    break;
                }
                run += cluster_size.min(end - pos - run);
            }
            match first {
                Mapping::Data { host, .. } => {
                    if host >= meta.refs.file_end {
                        return Err(Corrupt(format!(
                            "guest cluster {guest_cluster} maps to {host:#x}, past the end of the image"
                        ))
                        .into());
                    }
                    cursor.read_file(&self.file, host + within, run)?;
                }
                Mapping::Unallocated => self.read_backing(cursor, pos, run)?,
                Mapping::Zero { .. } => cursor.fill_zeros(run)?,
                Mapping::Compressed { host, len } => {
                    let start = within as usize;
                    self.with_decompressed(&mut meta, host, len, |cluster| {
                        cursor.copy_in(&cluster[start..start + run as usize])
                    })??;
                }
            }
            pos += run;
        }
        Ok(())
    }

    /// Reads what the backing image holds at `offset` (zeros without one, or past its end).
    fn read_backing(
        &self,
        cursor: &mut SliceCursor<'_, '_>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let inside = match &self.backing {
            None => 0,
            Some(Backing::Raw { file, size, .. }) => {
                let inside = size.saturating_sub(offset).min(len);
                if inside > 0 {
                    cursor.read_file(file, offset, inside)?;
                }
                inside
            }
            Some(Backing::Qcow2(image)) => {
                let inside = image.size().saturating_sub(offset).min(len);
                if inside > 0 {
                    image.read_into(cursor, offset, inside)?;
                }
                inside
            }
        };
        cursor.fill_zeros(len - inside)
    }

    /// Runs `with` on the decompressed cluster whose data is `len` bytes at `host`.
    fn with_decompressed<R>(
        &self,
        meta: &mut Metadata,
        host: u64,
        len: u64,
        with: impl FnOnce(&[u8]) -> R,
    ) -> io::Result<R> {
        if !matches!(&meta.compressed, Some((cached, _)) if *cached == host) {
            if host >= meta.refs.file_end {
                return Err(Corrupt(format!(
                    "compressed data at {host:#x} lies past the end of the image"
                ))
                .into());
            }
            let mut input = vec![0u8; len as usize];
            // The last compressed cluster may end before its last sector does.
            let got = read_up_to(&self.file, &mut input, host)?;
            input.truncate(got);
            let mut cluster = vec![0u8; self.layout.cluster_size() as usize];
            decompress_cluster(self.layout.compression, &input, &mut cluster, host)?;
            meta.compressed = Some((host, cluster));
        }
        match &meta.compressed {
            Some((_, cluster)) => Ok(with(cluster)),
            None => Err(io::Error::other("decompressed cluster vanished")),
        }
    }

    /// `len` bytes from byte `from` of guest cluster `guest_cluster` as it reads now.
    fn old_data(
        &self,
        meta: &mut Metadata,
        mapping: Mapping,
        guest_cluster: u64,
        from: u64,
        len: u64,
    ) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        match mapping {
            Mapping::Zero { .. } => {}
            Mapping::Unallocated => {
                let slice = [buffer_slice(&mut buf)];
                let offset = (guest_cluster << self.layout.cluster_bits) + from;
                self.read_backing(&mut SliceCursor::new(&slice), offset, len)?;
            }
            Mapping::Data { host, .. } => {
                let slice = [buffer_slice(&mut buf)];
                SliceCursor::new(&slice).read_file(&self.file, host + from, len)?;
            }
            Mapping::Compressed { host, len: size } => {
                let start = from as usize;
                self.with_decompressed(meta, host, size, |cluster| {
                    buf.copy_from_slice(&cluster[start..start + len as usize])
                })?;
            }
        }
        Ok(buf)
    }

    /// Whether `mapping` may be written in place; an error if it points into metadata or past
    /// the end of the image (writing there would damage the image or grow it without bound).
    fn writable_in_place(
        &self,
        meta: &Metadata,
        mapping: Mapping,
        guest_cluster: u64,
    ) -> io::Result<bool> {
        let Some((start, len)) = mapping.host_range(self.layout.cluster_size()) else {
            return Ok(false);
        };
        let first = start >> self.layout.cluster_bits;
        let last = (start + len - 1) >> self.layout.cluster_bits;
        if (first..=last).any(|cluster| meta.refs.reserved.contains(&cluster))
            || start >= meta.refs.file_end
        {
            return Err(Corrupt(format!(
                "guest cluster {guest_cluster} maps to {start:#x}, which is metadata or past the end of the image"
            ))
            .into());
        }
        Ok(matches!(mapping, Mapping::Data { copied: true, .. }))
    }

    /// Writes `slices` at guest byte `offset`.
    pub fn write(&self, slices: &[Slice<'_>], offset: u64) -> io::Result<()> {
        let len = SliceCursor::total(slices);
        let mut cursor = SliceCursor::new(slices);
        self.write_from(Source::Buffers(&mut cursor), offset, len)
    }

    fn write_from(&self, mut source: Source<'_, '_, '_>, offset: u64, len: u64) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.check_range(offset, len)?;
        let mut meta = self.lock();
        let cluster_bits = self.layout.cluster_bits;
        let cluster_size = self.layout.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let guest_cluster = pos >> cluster_bits;
            let within = pos & (cluster_size - 1);
            let first = meta.lookup(&self.file, guest_cluster)?;
            let mut run = (cluster_size - within).min(end - pos);
            if self.writable_in_place(&meta, first, guest_cluster)? {
                let Mapping::Data { host, .. } = first else {
                    return Err(io::Error::other("in-place write to a non-data cluster"));
                };
                while pos + run < end {
                    let next_cluster = (pos + run) >> cluster_bits;
                    let next = meta.lookup(&self.file, next_cluster)?;
                    let contiguous =
                        matches!(next, Mapping::Data { host: h, .. } if h == host + within + run);
                    if !contiguous || !self.writable_in_place(&meta, next, next_cluster)? {
                        break;
                    }
                    run += cluster_size.min(end - pos - run);
                }
                source.write_to(&self.file, host + within, run)?;
                pos += run;
                continue;
            }
            // Clusters that need a new host cluster: allocated together, so that they are
            // contiguous on the host and take one write.
            let mut old = vec![first];
            while pos + run < end && (old.len() as u64) < MAX_ALLOCATION_RUN {
                let next_cluster = (pos + run) >> cluster_bits;
                let next = meta.lookup(&self.file, next_cluster)?;
                if self.writable_in_place(&meta, next, next_cluster)? {
                    break;
                }
                old.push(next);
                run += cluster_size.min(end - pos - run);
            }
            let count = old.len() as u64;
            let host = meta.refs.allocate(&self.file, count)? << cluster_bits;
            if within > 0 {
                let head = self.old_data(&mut meta, first, guest_cluster, 0, within)?;
                self.file.write_all_at(&head, host)?;
            }
            source.write_to(&self.file, host + within, run)?;
            let tail = (within + run) & (cluster_size - 1);
            if tail != 0 {
                let last = count - 1;
                let data = self.old_data(
                    &mut meta,
                    old[last as usize],
                    guest_cluster + last,
                    tail,
                    cluster_size - tail,
                )?;
                self.file
                    .write_all_at(&data, host + (last << cluster_bits) + tail)?;
            }
            for i in 0..count {
                let entry = (host + (i << cluster_bits)) | COPIED;
                meta.set_mapping(&self.file, guest_cluster + i, entry)?;
            }
            pos += run;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros. Whole clusters become zero clusters (their
    /// host clusters are kept unless `unmap`), the rest is written.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        if !self.supports_zero_clusters() {
            return self.write_from(Source::Zeros, offset, len);
        }
        let (first, last) = self.whole_clusters(offset, len);
        if first >= last {
            return self.write_from(Source::Zeros, offset, len);
        }
        let head_end = first << self.layout.cluster_bits;
        let tail_start = (last << self.layout.cluster_bits).min(self.layout.size);
        if offset < head_end {
            self.write_from(Source::Zeros, offset, head_end - offset)?;
        }
        self.zero_clusters(first, last, unmap)?;
        if tail_start < offset + len {
            self.write_from(Source::Zeros, tail_start, offset + len - tail_start)?;
        }
        Ok(())
    }

    /// Lets go of whole clusters in `len` bytes at `offset`: they become zero clusters and
    /// their host clusters are freed. Parts of clusters are left alone (a discard is a hint).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        if !self.supports_zero_clusters() {
            return Ok(());
        }
        let (first, last) = self.whole_clusters(offset, len);
        if first < last {
            self.zero_clusters(first, last, true)?;
        }
        Ok(())
    }

    /// The guest clusters `[first, last)` entirely inside the range (the last cluster of the
    /// disk counts as whole when the range reaches the end of the disk).
    fn whole_clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let bits = self.layout.cluster_bits;
        let first = offset.div_ceil(1 << bits);
        let end = offset + len;
        let last = if end == self.layout.size {
            end.div_ceil(1 << bits)
        } else {
            end >> bits
        };
        (first, last)
    }

    fn zero_clusters(&self, first: u64, last: u64, unmap: bool) -> io::Result<()> {
        let mut meta = self.lock();
        for guest_cluster in first..last {
            let mapping = meta.lookup(&self.file, guest_cluster)?;
            let in_place = self.writable_in_place(&meta, mapping, guest_cluster)?;
            let entry = match mapping {
                Mapping::Zero { host: 0, .. } => continue,
                Mapping::Zero { .. } if !unmap => continue,
                Mapping::Unallocated if self.backing.is_none() => continue,
                Mapping::Data { host, .. } if in_place && !unmap => host | COPIED | ZERO,
                _ => ZERO,
            };
            meta.set_mapping(&self.file, guest_cluster, entry)?;
        }
        Ok(())
    }

    /// Shrinks the metadata caches (tests).
    #[cfg(test)]
    pub fn set_cache_capacity(&self, l2_tables: usize, refcount_blocks: usize) {
        self.lock().set_cache_capacity(l2_tables, refcount_blocks);
    }

    /// Makes everything written so far durable, metadata included.
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.lock().checkpoint(&self.file)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if self.readonly {
            return;
        }
        let meta = self
            .meta
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if meta.is_dirty() {
            if let Err(err) = meta.checkpoint(&self.file) {
                log::error!(
                    "qcow2 '{}': cannot write its metadata back on close: {err}",
                    self.path.display()
                );
            }
        }
    }
}
