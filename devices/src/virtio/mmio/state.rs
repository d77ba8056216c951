//! What the VMM can ask of a virtio-mmio device besides bus accesses: quiesce it, restart it,
//! and read its state (the registers the driver wrote and each queue's position).
//!
//! The VMM keeps each transport behind two handles to the same `Arc<Mutex<MmioTransport<D>>>`:
//! one as a `BusDevice` on the MMIO bus, one as a [`VirtioTransport`] for these operations.

use virtio_queue::QueueState;

use super::{MmioTransport, QueueRegisters};
use crate::virtio::{PauseError, VirtioDevice};

/// The lifecycle operations of a virtio device, independent of its type.
pub trait VirtioTransport: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Stops the device from processing its queues (see [`VirtioDevice::pause`]). Pausing a
    /// paused or inactive device does nothing.
    fn pause(&mut self) -> Result<(), PauseError>;
    /// Lets a paused device process its queues again.
    fn resume(&mut self);
    /// Whether the device is paused.
    fn is_paused(&self) -> bool;
    /// The transport's registers and, for a paused active device, its queues' positions.
    fn state(&self) -> MmioState;
}

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueRegisterState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// `QueueReady`.
    pub ready: bool,
}

impl From<&QueueRegisters> for QueueRegisterState {
    fn from(regs: &QueueRegisters) -> Self {
        Self {
            max_size: regs.max_size,
            size: regs.size,
            desc_table: regs.desc_table,
            avail_ring: regs.avail_ring,
            used_ring: regs.used_ring,
            ready: regs.ready,
        }
    }
}

/// A virtio-mmio device's state as the guest can observe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmioState {
    /// The virtio device ID.
    pub device_type: u32,
    /// The `Status` register (with `NEEDS_RESET` if set).
    pub status: u32,
    /// Whether the device was activated (`DRIVER_OK` accepted).
    pub active: bool,
    /// Whether the device is paused.
    pub paused: bool,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// Each queue's registers.
    pub queue_registers: Vec<QueueRegisterState>,
    /// Each queue's position (next available and used index), as the device handed it back
    /// when it was paused; empty while running or inactive.
    pub queues: Vec<QueueState>,
}

impl<D: VirtioDevice> VirtioTransport for MmioTransport<D> {
    fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        if self.paused {
            return Ok(());
        }
        if self.active {
            self.paused_queues = self.device.pause()?;
        }
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) {
        if !self.paused {
            return;
        }
        self.paused = false;
        self.paused_queues.clear();
        if self.active {
            self.device.resume();
        }
    }

    fn is_paused(&self) -> bool {
        self.paused
    }

    fn state(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            status: self.status(),
            active: self.active,
            paused: self.paused,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queue_registers: self.queues.iter().map(QueueRegisterState::from).collect(),
            queues: self.paused_queues.clone(),
        }
    }
}
