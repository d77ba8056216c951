//! Address buses: map guest port-I/O or MMIO addresses to device models.
//!
//! The VMM owns one [`Bus`] for port I/O and one for MMIO, both shared by all vCPU
//! threads (`Arc<Bus>`). Every PIO/MMIO exit is one [`Bus::read`] or [`Bus::write`], so a
//! lookup is a single `BTreeMap` range query followed by locking the one device hit.
//! Devices are registered before the vCPUs start; the map itself is never mutated while
//! the guest runs, which is why it needs no lock of its own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::log_limit::{error_limited, SharedLogLimiter};

/// A device that decodes a range of bus addresses.
///
/// `offset` is relative to the base the device was inserted at, and
/// `offset + data.len()` never exceeds the device's length when called through a [`Bus`].
pub trait BusDevice: Send {
    /// Handles a guest read; the device fills `data`. Bytes it leaves untouched read as
    /// `0xff` when the access came through [`Bus::read`].
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a [`Bus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// A device must decode at least one address.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// The requested base.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range {base:#x} + {len:#x} overflows the address space")]
    Overflow {
        /// The requested base.
        base: u64,
        /// The requested length.
        len: u64,
    },
    /// The range intersects one that is already registered.
    #[error(
        "bus range {base:#x}..{end:#x} overlaps the device at {other_base:#x}..{other_end:#x}",
        end = base + len,
        other_end = other_base + other_len
    )]
    Overlap {
        /// The requested base.
        base: u64,
        /// The requested length.
        len: u64,
        /// Base of the device already registered there.
        other_base: u64,
        /// Length of the device already registered there.
        other_len: u64,
    },
}

/// One registered device and the length of the range it decodes.
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each owned by one device.
///
/// Accesses to an address no device decodes, or that run past the end of the device
/// they start in, are not dispatched: `read`/`write` return `false`, and a read leaves
/// `data` filled with `0xff` (an ISA bus or an unclaimed MMIO range floats high on real
/// hardware, and guests probing for absent devices expect exactly that).
#[derive(Default)]
pub struct Bus {
    /// Keyed by base address.
    devices: BTreeMap<u64, BusEntry>,
    /// A guest that found input making a device model panic can repeat it on every exit.
    poison_warnings: SharedLogLimiter,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` to decode `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // The only candidates for overlap are the last range starting before `end`.
        // Ranges never overlap each other, so if that one ends at or before `base`,
        // every earlier one does too.
        if let Some((&other_base, other)) = self.devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Number of registered devices.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// Whether no device is registered.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Finds the device decoding all of `addr..addr + size`, with `addr`'s offset in it.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&BusEntry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let size = u64::try_from(size).ok()?;
        let end = offset.checked_add(size)?;
        (size > 0 && end <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// Returns `false` when no device decodes the whole access; `data` then reads as
    /// all-ones. The caller typically logs that at debug level and resumes the guest.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0xff);
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock_device(&entry.device, addr, &self.poison_warnings).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// Returns `false` when no device decodes the whole access; the write is dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((entry, offset)) => {
                lock_device(&entry.device, addr, &self.poison_warnings).write(offset, data);
                true
            }
            None => false,
        }
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.devices
                    .iter()
                    .map(|(base, entry)| *base..*base + entry.len),
            )
            .finish()
    }
}

/// Locks a device, recovering from a poisoned mutex.
///
/// A device model that panicked on another vCPU thread must not take every other vCPU
/// down with it: its state is whatever the panicking access left, which for these
/// register-level models is still a valid device state.
fn lock_device<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
    addr: u64,
    poison_warnings: &SharedLogLimiter,
) -> MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| {
        error_limited!(
            poison_warnings,
            "bus",
            "bus device at {addr:#x} panicked during an earlier access; continuing with its state"
        );
        device.clear_poison();
        poisoned.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_limit::BURST;
    use crate::test_logger::capture_logs;

    /// Records accesses and answers reads with `offset as u8 + index`.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
        reads: Vec<(u64, usize)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = offset as u8 + i as u8;
            }
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();
    }

    #[test]
    fn insert_rejects_zero_length_and_overflow() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // The very last byte of the address space is still usable.
        assert_eq!(bus.insert(recorder(), u64::MAX - 1, 1), Ok(()));
        assert_eq!(bus.len(), 1);
    }

    #[test]
    fn insert_rejects_every_kind_of_overlap() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        let overlap = |base, len| BusError::Overlap {
            base,
            len,
            other_base: 0x100,
            other_len: 0x10,
        };
        // Same range, tail, head, inside, enclosing.
        assert_eq!(
            bus.insert(recorder(), 0x100, 0x10),
            Err(overlap(0x100, 0x10))
        );
        assert_eq!(
            bus.insert(recorder(), 0x10f, 0x10),
            Err(overlap(0x10f, 0x10))
        );
        assert_eq!(bus.insert(recorder(), 0xf8, 0x9), Err(overlap(0xf8, 0x9)));
        assert_eq!(bus.insert(recorder(), 0x104, 0x2), Err(overlap(0x104, 0x2)));
        assert_eq!(
            bus.insert(recorder(), 0x0, 0x1000),
            Err(overlap(0x0, 0x1000))
        );
        // Adjacent on both sides is fine.
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn dispatches_with_device_relative_offsets() {
        let mut bus = Bus::new();
        let first = recorder();
        let second = recorder();
        bus.insert(first.clone(), 0x3f8, 8).unwrap();
        bus.insert(second.clone(), 0x400, 4).unwrap();

        assert!(bus.write(0x3fb, &[0x80]));
        assert!(bus.write(0x402, &[1, 2]));
        let mut data = [0u8; 2];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5, 6]);

        let first = first.lock().unwrap();
        assert_eq!(first.writes, vec![(3, vec![0x80])]);
        assert_eq!(first.reads, vec![(5, 2)]);
        let second = second.lock().unwrap();
        assert_eq!(second.writes, vec![(2, vec![1, 2])]);
        assert!(second.reads.is_empty());
    }

    #[test]
    fn unknown_addresses_are_not_dispatched_and_read_all_ones() {
        let mut bus = Bus::new();
        let device = recorder();
        bus.insert(device.clone(), 0x60, 5).unwrap();

        let mut data = [0u8; 4];
        assert!(!bus.read(0x5f, &mut data));
        assert_eq!(data, [0xff; 4]);
        let mut data = [0u8; 1];
        assert!(!bus.read(0x65, &mut data));
        assert_eq!(data, [0xff]);
        assert!(!bus.write(0x0, &[1]));
        assert!(!bus.write(u64::MAX, &[1]));
        assert!(!Bus::new().write(0x60, &[1]));

        let device = device.lock().unwrap();
        assert!(device.reads.is_empty());
        assert!(device.writes.is_empty());
    }

    #[test]
    fn access_crossing_the_end_of_a_device_is_not_dispatched() {
        let mut bus = Bus::new();
        let device = recorder();
        bus.insert(device.clone(), 0x600, 3).unwrap();
        bus.insert(recorder(), 0x603, 1).unwrap();

        // The last byte alone is fine; two bytes from there cross into the neighbour.
        assert!(bus.write(0x602, &[7]));
        assert!(!bus.write(0x602, &[7, 8]));
        let mut data = [0u8; 4];
        assert!(!bus.read(0x600, &mut data));
        assert_eq!(data, [0xff; 4]);
        // Empty accesses are meaningless and not dispatched either.
        assert!(!bus.write(0x600, &[]));

        assert_eq!(device.lock().unwrap().writes, vec![(2, vec![7])]);
    }

    #[test]
    fn device_leaving_bytes_untouched_reads_all_ones() {
        struct Lazy;
        impl BusDevice for Lazy {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data[0] = 0x12;
            }
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Lazy)), 0, 8).unwrap();
        let mut data = [0u8; 4];
        assert!(bus.read(0, &mut data));
        assert_eq!(data, [0x12, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn poisoned_device_keeps_working() {
        struct Panicky {
            writes: usize,
        }
        impl BusDevice for Panicky {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data[0] = self.writes as u8;
            }
            fn write(&mut self, _offset: u64, data: &[u8]) {
                self.writes += 1;
                assert_ne!(data[0], 0xde, "simulated device bug");
            }
        }
        let device = Arc::new(Mutex::new(Panicky { writes: 0 }));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x505, 1).unwrap();
        let bus = Arc::new(bus);

        let vcpu = {
            let bus = bus.clone();
            std::thread::spawn(move || bus.write(0x505, &[0xde]))
        };
        assert!(vcpu.join().is_err(), "the device should have panicked");
        assert!(device.is_poisoned());

        assert!(bus.write(0x505, &[1]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x505, &mut data));
        assert_eq!(data, [2]);
        assert!(!device.is_poisoned());
    }

    #[test]
    fn repeatedly_poisoned_device_is_reported_at_a_limited_rate() {
        struct AlwaysPanics;
        impl BusDevice for AlwaysPanics {
            fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, _offset: u64, _data: &[u8]) {
                panic!("simulated device bug");
            }
        }
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(AlwaysPanics)), 0x505, 1)
            .unwrap();
        let panics = 3 * BURST as usize;
        let (caught, lines) = capture_logs(|| {
            (0..panics)
                .filter(|_| {
                    let write = std::panic::AssertUnwindSafe(|| bus.write(0x505, &[1]));
                    std::panic::catch_unwind(write).is_err()
                })
                .count()
        });
        assert_eq!(caught, panics);
        // Every access after the first found the device poisoned.
        assert_eq!(lines.len(), BURST as usize, "{lines:?}");
        assert!(lines.iter().all(|(level, _)| *level == log::Level::Error));
    }
}
