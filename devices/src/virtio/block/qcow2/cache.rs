//! A small cache of metadata tables (L2 tables, refcount blocks) keyed by host offset, with the
//! part of each table that changed since it was last written.

use std::collections::HashMap;

/// A span of a table that changed: `[start, end)` in the table's own units.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dirty(Option<(usize, usize)>);

impl Dirty {
    /// Nothing changed.
    pub fn clean() -> Self {
        Self(None)
    }

    /// Everything in `[0, len)` changed.
    pub fn all(len: usize) -> Self {
        Self(Some((0, len)))
    }

    /// Marks `[start, end)` changed.
    pub fn mark(&mut self, start: usize, end: usize) {
        self.0 = Some(match self.0 {
            None => (start, end),
            Some((lo, hi)) => (lo.min(start), hi.max(end)),
        });
    }

    /// Whether anything changed.
    pub fn is_dirty(&self) -> bool {
        self.0.is_some()
    }

    /// The changed span, leaving the table clean.
    pub fn take(&mut self) -> Option<(usize, usize)> {
        self.0.take()
    }
}

/// `[start, end)` bytes widened to whole 512-byte sectors, within a table of `len` bytes: the
/// unit metadata is written in, so that no write tears a sector another write shares.
pub fn sector_span(start: usize, end: usize, len: usize) -> (usize, usize) {
    (start & !511, ((end + 511) & !511).min(len))
}

/// One cached table.
#[derive(Debug)]
pub struct Cached<T> {
    /// The table.
    pub data: T,
    /// What changed since it was read or written.
    pub dirty: Dirty,
    last_use: u64,
}

/// Tables by host offset, at most `capacity` of them.
#[derive(Debug)]
pub struct Cache<T> {
    entries: HashMap<u64, Cached<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> Cache<T> {
    /// An empty cache for `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
        }
    }

    /// The table at `offset`, marked as just used.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut Cached<T>> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(&offset)?;
        entry.last_use = clock;
        Some(entry)
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// Changes how many tables the cache holds (tests force evictions with tiny caches).
    #[cfg(test)]
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
    }

    /// Whether another table needs one evicted first.
    pub fn is_full(&self) -> bool {
        self.entries.len() >= self.capacity
    }

    /// Adds a table; the caller made room.
    pub fn insert(&mut self, offset: u64, data: T, dirty: Dirty) {
        self.clock += 1;
        self.entries.insert(
            offset,
            Cached {
                data,
                dirty,
                last_use: self.clock,
            },
        );
    }

    /// Drops the least recently used clean table; false if every table is dirty.
    pub fn evict_clean(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.dirty.is_dirty())
            .min_by_key(|(_, entry)| entry.last_use)
            .map(|(&offset, _)| offset);
        match victim {
            Some(offset) => {
                self.entries.remove(&offset);
                true
            }
            None => false,
        }
    }

    /// The least recently used table's offset.
    pub fn least_recently_used(&self) -> Option<u64> {
        self.entries
            .iter()
            .min_by_key(|(_, entry)| entry.last_use)
            .map(|(&offset, _)| offset)
    }

    /// Removes the table at `offset`.
    pub fn remove(&mut self, offset: u64) -> Option<Cached<T>> {
        self.entries.remove(&offset)
    }

    /// Offsets of the tables with changes, in ascending order (sequential writes).
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut offsets: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.dirty.is_dirty())
            .map(|(&offset, _)| offset)
            .collect();
        offsets.sort_unstable();
        offsets
    }

    /// Whether any table has changes.
    pub fn any_dirty(&self) -> bool {
        self.entries.values().any(|entry| entry.dirty.is_dirty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_spans_grow_and_clear() {
        let mut dirty = Dirty::clean();
        assert!(!dirty.is_dirty());
        dirty.mark(10, 12);
        dirty.mark(3, 4);
        assert_eq!(dirty.take(), Some((3, 12)));
        assert_eq!(dirty.take(), None);
        assert_eq!(Dirty::all(8).take(), Some((0, 8)));
    }

    #[test]
    fn spans_widen_to_sectors_within_the_table() {
        assert_eq!(sector_span(8, 16, 65536), (0, 512));
        assert_eq!(sector_span(600, 1100, 65536), (512, 1536));
        assert_eq!(sector_span(0, 100, 64), (0, 64));
    }

    #[test]
    fn eviction_keeps_dirty_tables() {
        let mut cache = Cache::new(2);
        cache.insert(1, 'a', Dirty::all(1));
        cache.insert(2, 'b', Dirty::clean());
        assert!(cache.is_full());
        assert!(cache.evict_clean());
        assert!(!cache.contains(2));
        assert!(!cache.evict_clean());
        assert_eq!(cache.dirty_offsets(), vec![1]);
        cache.insert(3, 'c', Dirty::clean());
        cache.get_mut(1);
        assert_eq!(cache.least_recently_used(), Some(3));
    }
}
