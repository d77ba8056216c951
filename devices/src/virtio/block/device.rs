//! The virtio-blk device model the transport drives.

use std::sync::Arc;

use crate::virtio::log_limit::warn_limited;
use virtio_queue::QueueState;

use crate::virtio::{
    features as ring_features, ActivateError, Activation, LogLimiter, PauseError, SharedSubscriber,
    VirtioDevice,
};

use super::disk::DiskImage;
use super::request::MAX_RANGES;
use super::worker::{QueueWorker, WorkerThread};
use super::{features, DEVICE_TYPE, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};

use std::mem::offset_of;
use virtio_bindings::virtio_blk::virtio_blk_config;

/// Offset of `seg_max` in `struct virtio_blk_config`.
const CONFIG_SEG_MAX_OFFSET: usize = 12;
/// Bytes of `struct virtio_blk_config` Kiln fills in: up to the discard and write-zeroes
/// limits (zero unless offered). Later fields belong to features Kiln does not offer and read
/// as zero.
const CONFIG_SIZE: usize = offset_of!(virtio_blk_config, unused1);
/// Largest discard or write-zeroes range, in sectors (just under 2 GiB).
const MAX_ZERO_SECTORS: u32 = 0x3f_ffff;

/// A virtio-blk device backed by a disk image.
#[derive(Debug)]
pub struct Block {
    disk: Arc<DiskImage>,
    config: [u8; CONFIG_SIZE],
    queue_sizes: [u16; 1],
    /// The disk's I/O thread: created with the device, parked while it is not active.
    thread: WorkerThread,
    active: bool,
    warnings: LogLimiter,
}

impl Block {
    /// A device for `disk`, with its I/O thread started and parked.
    pub fn new(disk: DiskImage) -> std::io::Result<Self> {
        let mut config = [0u8; CONFIG_SIZE];
        config[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        config[CONFIG_SEG_MAX_OFFSET..CONFIG_SEG_MAX_OFFSET + 4]
            .copy_from_slice(&SEG_MAX.to_le_bytes());
        if disk.supports_discard() {
            // Discard granularity: a cluster (smaller ranges are written as zeros or ignored).
            let alignment = disk
                .qcow2()
                .map_or(1, |image| (image.cluster_size() / SECTOR_SIZE) as u32);
            let mut put = |offset: usize, value: u32| {
                config[offset..offset + 4].copy_from_slice(&value.to_le_bytes())
            };
            put(
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_ZERO_SECTORS,
            );
            put(offset_of!(virtio_blk_config, max_discard_seg), MAX_RANGES);
            put(
                offset_of!(virtio_blk_config, discard_sector_alignment),
                alignment,
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_ZERO_SECTORS,
            );
            put(
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_RANGES,
            );
            config[offset_of!(virtio_blk_config, write_zeroes_may_unmap)] = 1;
        }
        Ok(Self {
            disk: Arc::new(disk),
            config,
            queue_sizes: [QUEUE_SIZE],
            thread: WorkerThread::parked()?,
            active: false,
            warnings: LogLimiter::new(),
        })
    }

    /// The image behind the device.
    pub fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// Whether the I/O thread is serving the queue (the device is active).
    pub fn is_running(&self) -> bool {
        self.active
    }

    /// Puts `disk` behind the device in place of the current image, which is closed (and
    /// unlocked) once the I/O thread lets go of it. The configuration space gets the new
    /// capacity; the caller tells the driver (a configuration change interrupt). Call it only
    /// while the device is paused, so that no request straddles the two images.
    pub fn replace_disk(&mut self, disk: DiskImage) {
        disk.set_write_through(self.disk.write_through());
        let disk = Arc::new(disk);
        self.config[..8].copy_from_slice(&disk.sectors().to_le_bytes());
        self.disk = disk.clone();
        if self.active {
            self.thread.replace_disk(disk);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut offered = (1 << ring_features::RING_INDIRECT_DESC)
            | (1 << ring_features::RING_EVENT_IDX)
            | (1 << features::SEG_MAX)
            | (1 << features::FLUSH);
        if self.disk.readonly() {
            offered |= 1 << features::RO;
        }
        if self.disk.supports_discard() {
            offered |= (1 << features::DISCARD) | (1 << features::WRITE_ZEROES);
        }
        offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let what = format!("virtio-blk '{}'", self.disk.path().display());
        warn_limited!(
            self.warnings,
            &what,
            "{what}: the driver wrote {} bytes at configuration offset {offset:#x}; the configuration is read-only",
            data.len()
        );
    }

    fn activate(
        &mut self,
        activation: Activation,
    ) -> Result<Option<SharedSubscriber>, ActivateError> {
        // A reset always comes first, but never leave the thread serving an old queue.
        self.reset();
        let Activation {
            memory,
            queues,
            queue_events,
            interrupt,
            features: negotiated,
        } = activation;
        let (Some(queue), Some(queue_event)) =
            (queues.into_iter().next(), queue_events.into_iter().next())
        else {
            return Err(ActivateError::QueueNotReady(0));
        };
        if !virtio_queue::QueueT::ready(&queue) {
            return Err(ActivateError::QueueNotReady(0));
        }
        // Without FLUSH the driver cannot make writes durable, so each one must be
        // (virtio 1.2, 5.2.6.2: write-through when VIRTIO_BLK_F_FLUSH is not negotiated).
        let write_through = negotiated & (1 << features::FLUSH) == 0;
        self.disk.set_write_through(write_through);
        let worker = QueueWorker::new(queue, memory, self.disk.clone(), interrupt);
        self.thread.activate(worker);
        self.active = true;
        log::debug!(
            "virtio-blk '{}': activated{}",
            self.disk.path().display(),
            if write_through {
                " (write-through: the driver did not negotiate FLUSH)"
            } else {
                ""
            }
        );
        Ok(Some(Arc::new(std::sync::Mutex::new(
            self.thread.notifier(queue_event),
        ))))
    }

    fn reset(&mut self) {
        if std::mem::take(&mut self.active) {
            self.thread.deactivate();
            log::debug!("virtio-blk '{}': reset", self.disk.path().display());
        }
    }

    fn pause(&mut self) -> Result<Vec<QueueState>, PauseError> {
        Ok(self.thread.pause()?.into_iter().collect())
    }

    fn resume(&mut self) {
        self.thread.resume();
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
