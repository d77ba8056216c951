//! What the VMM can ask of a virtio-mmio device besides bus accesses: quiesce it, restart it,
//! and read its state (the registers the driver wrote and each queue's position).
//!
//! The VMM keeps each transport behind two handles to the same `Arc<Mutex<MmioTransport<D>>>`:
//! one as a `BusDevice` on the MMIO bus, one as a [`VirtioTransport`] for these operations.

use serde::{Deserialize, Serialize};

use super::{status, MmioTransport, QueueRegisters};
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
    /// Puts a freshly created transport into a snapshot's state; an active device is
    /// activated on its queues' saved positions and left paused.
    fn restore(&mut self, state: &MmioState) -> Result<(), RestoreError>;
}

/// A saved transport state that does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot holds another kind of device here.
    #[error("the snapshot has virtio device type {saved} where this VM has type {actual}")]
    DeviceType {
        /// In the snapshot.
        saved: u32,
        /// Here.
        actual: u32,
    },
    /// Queue count or sizes differ.
    #[error("the snapshot's queues ({saved:?}) do not match the device's ({actual:?})")]
    Queues {
        /// Maximum sizes in the snapshot.
        saved: Vec<u16>,
        /// The device's.
        actual: Vec<u16>,
    },
    /// The guest's driver accepted features this device does not offer (e.g. a NIC put on a
    /// backend without the offloads the guest had negotiated).
    #[error(
        "the guest's driver accepted features {accepted:#x} that this device does not offer \
         (it offers {offered:#x}; missing {missing:#x})"
    )]
    Features {
        /// What the driver accepted, in the snapshot.
        accepted: u64,
        /// What the device offers here.
        offered: u64,
        /// Accepted and not offered.
        missing: u64,
    },
    /// A queue the driver had set up lies outside this VM's memory.
    #[error("queue {0} of the snapshot is not inside guest memory")]
    QueueOutsideMemory(usize),
    /// The device's own saved state does not fit it.
    #[error("{0}")]
    DeviceState(String),
    /// The device could not be activated again.
    #[error("the device could not be started again")]
    Activation,
    /// The device could not be paused after activation.
    #[error(transparent)]
    Pause(#[from] PauseError),
}

/// Where the device was in one queue: the next available entry it will take and the next used
/// entry it will write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// Next available ring index.
    pub next_avail: u16,
    /// Next used ring index.
    pub next_used: u16,
}

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The virtio device ID.
    pub device_type: u32,
    /// The `Status` register as the driver set it.
    pub status: u32,
    /// `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
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
    /// Each queue's position, as the device handed it back when it was paused; empty while
    /// running or inactive.
    pub queues: Vec<QueuePosition>,
    /// What the device keeps of its own beyond the transport (see
    /// [`VirtioDevice::saved_state`]); empty for most devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device: Vec<u8>,
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
            self.paused_queues = self
                .device
                .pause()?
                .iter()
                .map(|queue| QueuePosition {
                    next_avail: queue.next_avail,
                    next_used: queue.next_used,
                })
                .collect();
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
            status: self.status,
            needs_reset: self.interrupt.needs_reset(),
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
            device: self.device.saved_state(),
        }
    }

    fn restore(&mut self, state: &MmioState) -> Result<(), RestoreError> {
        let actual_type = self.device.device_type();
        if state.device_type != actual_type {
            return Err(RestoreError::DeviceType {
                saved: state.device_type,
                actual: actual_type,
            });
        }
        let missing = state.driver_features & !self.offered_features();
        if missing != 0 {
            return Err(RestoreError::Features {
                accepted: state.driver_features,
                offered: self.offered_features(),
                missing,
            });
        }
        let actual: Vec<u16> = self.queues.iter().map(|queue| queue.max_size).collect();
        let saved: Vec<u16> = state
            .queue_registers
            .iter()
            .map(|queue| queue.max_size)
            .collect();
        if saved != actual || state.queues.len() > actual.len() {
            return Err(RestoreError::Queues { saved, actual });
        }
        for (index, (regs, saved)) in self
            .queues
            .iter_mut()
            .zip(&state.queue_registers)
            .enumerate()
        {
            *regs = QueueRegisters {
                max_size: saved.max_size,
                size: saved.size,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
                ready: saved.ready,
            };
            if regs.ready && regs.build(&self.memory, false).is_err() {
                return Err(RestoreError::QueueOutsideMemory(index));
            }
        }
        self.device
            .restore_state(&state.device)
            .map_err(RestoreError::DeviceState)?;
        self.status = state.status & !status::NEEDS_RESET;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore(
            state.interrupt_status,
            state.config_generation,
            state.needs_reset,
        );
        if state.active {
            // Paused before it gets its queues: it must not take requests until the VM runs.
            self.device.pause()?;
            self.activate_at(&state.queues);
            if !self.active {
                return Err(RestoreError::Activation);
            }
            self.pause()?;
        } else {
            self.paused = true;
        }
        Ok(())
    }
}
