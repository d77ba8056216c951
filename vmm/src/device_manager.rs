//! virtio devices of a VM: where they sit, how they are wired to KVM and announced to the guest.
//!
//! Each device gets one virtio-mmio window (4 KiB, from `VIRTIO_MMIO_START`) and one IRQ line
//! (from `VIRTIO_IRQ_FIRST`), handed out in order by vm-allocator. Its queue notifications
//! are KVM ioeventfds on the window's `QueueNotify` register (datamatch: the queue index), its
//! interrupt a KVM irqfd on its line. The guest learns about it twice: a
//! `virtio_mmio.device=4K@BASE:IRQ` kernel argument (kernels with
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`) and an `LNRO0005` device in the ACPI DSDT (kernels
//! that only enumerate virtio-mmio through ACPI, like distribution kernels).

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use kiln_arch::layout::{VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use kiln_devices::bus::{Bus, BusDevice, BusError};
use kiln_devices::virtio::block::{Block, DiskError, DiskImage, DiskStats};
use kiln_devices::virtio::mmio::{regs, MmioState, MmioTransport, TransportError, VirtioTransport};
use kiln_devices::virtio::net::passt::{self, PasstOptions};
use kiln_devices::virtio::net::tap::Tap;
use kiln_devices::virtio::net::{Backend, MacAddress, Net};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::{MuxerError, Vsock};
use kiln_devices::virtio::{EventLoopHandle, PauseError, VirtioDevice};

use crate::config::{disk_name, DiskConfig, NetConfig, RngConfig, VsockConfig};
use crate::memory::GuestMemory;

/// Number of virtio-mmio slots: one per IRQ line set aside for virtio.
pub const VIRTIO_SLOTS: u32 = VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1;

/// Why a device could not be set up. Every message names the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A disk image could not be used.
    #[error("disk {index}: {source}")]
    Disk {
        /// Position among the disks, from 1.
        index: usize,
        /// Why.
        source: DiskError,
    },
    /// All virtio-mmio windows or IRQ lines are taken.
    #[error("no virtio-mmio slot left for {0} (at most {VIRTIO_SLOTS} virtio devices)")]
    NoSlot(String),
    /// The transport refused the device.
    #[error("{0}: {1}")]
    Transport(String, TransportError),
    /// An eventfd could not be created.
    #[error("{0}: cannot create its interrupt eventfd: {1}")]
    EventFd(String, std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("{what}: KVM could not {action}: {source}")]
    Kvm {
        /// The device.
        what: String,
        /// What was attempted.
        action: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// The device could not be placed on the MMIO bus.
    #[error("{0}: {1}")]
    Bus(String, BusError),
    /// The device's I/O thread could not be started.
    #[error("{0}: cannot start its I/O thread: {1}")]
    Thread(String, std::io::Error),
    /// A device could not be quiesced.
    #[error("{0}: cannot pause: {1}")]
    Pause(String, PauseError),
    /// There is no disk with that index.
    #[error("there is no disk {index} (the VM has {count})")]
    NoSuchDisk {
        /// The index asked for, from 0.
        index: usize,
        /// How many disks the VM has.
        count: usize,
    },
    /// A device's saved state could not be restored.
    #[error("{0}: cannot restore its state: {1}")]
    Restore(String, String),
    /// The vsock device's Unix socket could not be set up.
    #[error("vsock: {0}")]
    Vsock(MuxerError),
    /// A NIC's backend could not be opened or started.
    #[error("{0}: {1}")]
    Net(String, String),
    /// A host resource of a device could not be created.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// A disk's transport, typed: what the VMM (and later its API) uses to reach the device.
pub type BlockHandle = Arc<Mutex<MmioTransport<Block>>>;
/// The vsock device's transport.
pub type VsockHandle = Arc<Mutex<MmioTransport<Vsock>>>;
/// A NIC's transport.
pub type NetHandle = Arc<Mutex<MmioTransport<Net>>>;
/// The entropy device's transport.
pub type RngHandle = Arc<Mutex<MmioTransport<Rng>>>;

/// The KVM calls that wire a device up; a trait so that tests can record them.
pub trait IrqAndIoEvents {
    /// Connects `irq_event` to guest interrupt line `irq`.
    fn register_irqfd(&self, irq_event: &EventFd, irq: u32) -> Result<(), kvm_ioctls::Error>;
    /// Makes guest writes of `datamatch` (32 bits) to MMIO address `addr` signal `event`.
    fn register_mmio_ioevent(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error>;
}

impl IrqAndIoEvents for VmFd {
    fn register_irqfd(&self, irq_event: &EventFd, irq: u32) -> Result<(), kvm_ioctls::Error> {
        VmFd::register_irqfd(self, irq_event, irq)
    }

    fn register_mmio_ioevent(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), kvm_ioctls::Error> {
        self.register_ioevent(event, &IoEventAddress::Mmio(addr), datamatch)
    }
}

/// A disk image opened and locked for a VM.
#[derive(Debug)]
pub struct OpenDisk {
    /// How it was asked for.
    pub config: DiskConfig,
    /// The open image.
    pub image: DiskImage,
}

/// One placed virtio device, reachable two ways: as a bus device (for vCPUs) and through its
/// lifecycle operations (pause, resume, state).
struct VirtioSlot {
    what: String,
    base: u64,
    irq: u32,
    bus_device: Arc<Mutex<dyn BusDevice>>,
    transport: Arc<Mutex<dyn VirtioTransport>>,
}

/// The VM's virtio devices.
pub struct DeviceManager {
    addresses: AddressAllocator,
    irqs: IdAllocator,
    slots: Vec<VirtioSlot>,
    disks: Vec<BlockHandle>,
    vsock: Option<VsockHandle>,
    rng: Option<RngHandle>,
    nets: Vec<NetHandle>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.slots
                    .iter()
                    .map(|s| (&s.what, format!("{:#x}", s.base), s.irq)),
            )
            .finish()
    }
}

impl DeviceManager {
    /// A manager with every slot free.
    pub fn new() -> Self {
        let window = u64::from(VIRTIO_SLOTS) * VIRTIO_MMIO_SIZE;
        Self {
            // Both ranges are fixed and non-empty, so the allocators cannot refuse them.
            addresses: AddressAllocator::new(VIRTIO_MMIO_START, window)
                .expect("the virtio-mmio window is a valid range"),
            irqs: IdAllocator::new(VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST)
                .expect("the virtio IRQ lines are a valid range"),
            slots: Vec::new(),
            disks: Vec::new(),
            vsock: None,
            rng: None,
            nets: Vec::new(),
        }
    }

    /// Opens and locks every disk image, in order. Done first thing, so that a bad image is
    /// reported before anything else is set up.
    pub fn open_disks(disks: &[DiskConfig]) -> Result<Vec<OpenDisk>, DeviceError> {
        disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                DiskImage::open_as(&disk.path, disk.readonly, disk.id.as_deref(), disk.format)
                    .map(|image| OpenDisk {
                        config: disk.clone(),
                        image,
                    })
                    .map_err(|source| DeviceError::Disk {
                        index: index + 1,
                        source,
                    })
            })
            .collect()
    }

    /// Adds opened disks (in order: `vda`, `vdb`, ...) as virtio-blk devices.
    pub fn add_disks(
        &mut self,
        kvm: &dyn IrqAndIoEvents,
        memory: &GuestMemory,
        event_loop: &EventLoopHandle,
        disks: Vec<OpenDisk>,
    ) -> Result<(), DeviceError> {
        for (
            index,
            OpenDisk {
                config: disk,
                image,
            },
        ) in disks.into_iter().enumerate()
        {
            let what = format!(
                "disk {} ({}, '{}', {}{})",
                index + 1,
                disk_name(index),
                disk.path.display(),
                image.format(),
                if disk.readonly { ", read-only" } else { "" }
            );
            let sectors = image.sectors();
            let block = Block::new(image).map_err(|err| DeviceError::Thread(what.clone(), err))?;
            let (transport, base, irq) =
                self.add_virtio_device(kvm, memory, event_loop, block, what.clone())?;
            self.disks.push(transport);
            log::debug!("{what}: {sectors} sectors, virtio-mmio at {base:#x}, IRQ {irq}");
        }
        Ok(())
    }

    /// The disks' transports, in order (`vda` first).
    pub fn disks(&self) -> &[BlockHandle] {
        &self.disks
    }

    /// Puts the image at `path` behind disk `index` (from 0), opened and locked like the one it
    /// replaces (same read-only mode and serial), and tells the driver the capacity may have
    /// changed. The VM must be paused, so that no request straddles the two images. The old
    /// image is closed; the disk's counters go on.
    pub fn replace_disk(&self, index: usize, path: &std::path::Path) -> Result<(), DeviceError> {
        let handle = self.disks.get(index).ok_or(DeviceError::NoSuchDisk {
            index,
            count: self.disks.len(),
        })?;
        let mut transport = lock(handle);
        let old = transport.device().disk();
        let serial: Vec<u8> = old.id().iter().copied().take_while(|b| *b != 0).collect();
        let serial = String::from_utf8(serial).ok();
        let image = DiskImage::open(path, old.readonly(), serial.as_deref())
            .map_err(|source| DeviceError::Disk {
                index: index + 1,
                source,
            })?
            .with_stats(old.stats().clone());
        let sectors = image.sectors();
        transport.device_mut().replace_disk(image);
        if transport.is_active() {
            transport.interrupt().signal_config_change();
        }
        log::info!(
            "disk {} ({}): now backed by '{}', {sectors} sectors",
            index + 1,
            disk_name(index),
            path.display()
        );
        Ok(())
    }

    /// Each disk's guest name and request counters, in order.
    pub fn disk_stats(&self) -> Vec<(String, Arc<DiskStats>)> {
        self.disks
            .iter()
            .enumerate()
            .map(|(index, disk)| (disk_name(index), lock(disk).device().disk().stats().clone()))
            .collect()
    }

    /// Adds the vsock device: its Unix socket is created here, so a taken path is reported
    /// before the guest starts.
    pub fn add_vsock(
        &mut self,
        kvm: &dyn IrqAndIoEvents,
        memory: &GuestMemory,
        event_loop: &EventLoopHandle,
        config: &VsockConfig,
    ) -> Result<(), DeviceError> {
        let what = format!(
            "vsock (guest CID {}, '{}')",
            config.cid,
            config.uds.display()
        );
        let device = Vsock::new(config.cid, &config.uds).map_err(DeviceError::Vsock)?;
        let (transport, base, irq) =
            self.add_virtio_device(kvm, memory, event_loop, device, what.clone())?;
        self.vsock = Some(transport);
        log::debug!("{what}: virtio-mmio at {base:#x}, IRQ {irq}");
        Ok(())
    }

    /// Adds the entropy device (if enabled).
    pub fn add_rng(
        &mut self,
        kvm: &dyn IrqAndIoEvents,
        memory: &GuestMemory,
        event_loop: &EventLoopHandle,
        config: &RngConfig,
    ) -> Result<(), DeviceError> {
        if !config.enabled {
            return Ok(());
        }
        let what = match config.rate_bytes_per_sec {
            Some(rate) => format!("rng ({rate} bytes/s)"),
            None => "rng".to_string(),
        };
        let device = Rng::new(config.rate_bytes_per_sec)
            .map_err(|err| DeviceError::Io(what.clone(), err))?;
        let (transport, base, irq) =
            self.add_virtio_device(kvm, memory, event_loop, device, what.clone())?;
        self.rng = Some(transport);
        log::debug!("{what}: virtio-mmio at {base:#x}, IRQ {irq}");
        Ok(())
    }

    /// Adds the NICs (the guest's `eth0`, `eth1`, ...): TAP interfaces are opened and passt
    /// children started here, so that a missing interface or program is reported before the
    /// guest starts.
    pub fn add_nets(
        &mut self,
        kvm: &dyn IrqAndIoEvents,
        memory: &GuestMemory,
        event_loop: &EventLoopHandle,
        nets: &[NetConfig],
        macs: &[MacAddress],
    ) -> Result<(), DeviceError> {
        for (index, (net, mac)) in nets.iter().zip(macs).enumerate() {
            let what = format!("net{index} ({}, {mac})", net.backend_name());
            let backend = open_backend(net).map_err(|err| DeviceError::Net(what.clone(), err))?;
            let device = Net::new(
                format!("net{index} ({})", net.backend_name()),
                *mac,
                backend,
            )
            .map_err(|err| DeviceError::Io(what.clone(), err))?;
            let (transport, base, irq) =
                self.add_virtio_device(kvm, memory, event_loop, device, what.clone())?;
            self.nets.push(transport);
            log::debug!("{what}: virtio-mmio at {base:#x}, IRQ {irq}");
        }
        Ok(())
    }

    /// The NICs' transports, in order.
    pub fn nets(&self) -> &[NetHandle] {
        &self.nets
    }

    /// The vsock device's transport, if the VM has one.
    pub fn vsock(&self) -> Option<&VsockHandle> {
        self.vsock.as_ref()
    }

    /// The entropy device's transport, if the VM has one.
    pub fn rng(&self) -> Option<&RngHandle> {
        self.rng.as_ref()
    }

    /// Quiesces every device (the vCPUs must be paused first, so that no driver adds work);
    /// on failure, the devices already paused are resumed.
    pub fn pause_all(&self) -> Result<(), DeviceError> {
        for (index, slot) in self.slots.iter().enumerate() {
            if let Err(err) = lock(&slot.transport).pause() {
                for earlier in &self.slots[..index] {
                    lock(&earlier.transport).resume();
                }
                return Err(DeviceError::Pause(slot.what.clone(), err));
            }
        }
        Ok(())
    }

    /// Restarts every device after [`pause_all`](Self::pause_all).
    pub fn resume_all(&self) {
        for slot in &self.slots {
            lock(&slot.transport).resume();
        }
    }

    /// Puts every transport into its saved state, in slot order (a snapshot restore: the
    /// devices were just created in the same order as when it was taken).
    pub fn restore_states(&self, states: &[MmioState]) -> Result<(), DeviceError> {
        if states.len() != self.slots.len() {
            return Err(DeviceError::Restore(
                "virtio devices".into(),
                format!(
                    "the snapshot has {} virtio devices, this VM {}",
                    states.len(),
                    self.slots.len()
                ),
            ));
        }
        for (slot, state) in self.slots.iter().zip(states) {
            lock(&slot.transport)
                .restore(state)
                .map_err(|err| DeviceError::Restore(slot.what.clone(), err.to_string()))?;
        }
        Ok(())
    }

    /// Each device's description and transport state, in slot order.
    pub fn states(&self) -> Vec<(String, MmioState)> {
        self.slots
            .iter()
            .map(|slot| (slot.what.clone(), lock(&slot.transport).state()))
            .collect()
    }

    /// Places `device` in the next free slot and wires it to KVM; returns its transport, base
    /// and IRQ.
    #[allow(clippy::type_complexity)]
    pub fn add_virtio_device<D: VirtioDevice + 'static>(
        &mut self,
        kvm: &dyn IrqAndIoEvents,
        memory: &GuestMemory,
        event_loop: &EventLoopHandle,
        device: D,
        what: String,
    ) -> Result<(Arc<Mutex<MmioTransport<D>>>, u64, u32), DeviceError> {
        let base = self
            .addresses
            .allocate(VIRTIO_MMIO_SIZE, VIRTIO_MMIO_SIZE, AllocPolicy::FirstMatch)
            .map_err(|_| DeviceError::NoSlot(what.clone()))?
            .start();
        let irq = match self.irqs.allocate_id() {
            Ok(irq) => irq,
            Err(_) => return Err(DeviceError::NoSlot(what)),
        };
        let kvm_error = |action| {
            let what = what.clone();
            move |source| DeviceError::Kvm {
                what,
                action,
                source,
            }
        };
        let irq_event =
            EventFd::new(EFD_NONBLOCK).map_err(|err| DeviceError::EventFd(what.clone(), err))?;
        kvm.register_irqfd(&irq_event, irq)
            .map_err(kvm_error("connect its interrupt (irqfd)"))?;
        let transport =
            MmioTransport::new(device, memory.clone(), irq_event, Some(event_loop.clone()))
                .map_err(|err| DeviceError::Transport(what.clone(), err))?;
        for (index, event) in transport.queue_events().iter().enumerate() {
            // Queue counts come from the device model and are tiny.
            kvm.register_mmio_ioevent(event, base + regs::QUEUE_NOTIFY, index as u32)
                .map_err(kvm_error("connect a queue notification (ioeventfd)"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.slots.push(VirtioSlot {
            what,
            base,
            irq,
            bus_device: transport.clone(),
            transport: transport.clone(),
        });
        Ok((transport, base, irq))
    }

    /// Kernel arguments announcing every device: `virtio_mmio.device=4K@0xd0001000:5`.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|slot| {
                format!(
                    "virtio_mmio.device={}K@{:#x}:{}",
                    VIRTIO_MMIO_SIZE >> 10,
                    slot.base,
                    slot.irq
                )
            })
            .collect()
    }

    /// `(base, size, irq)` of every device, for the ACPI DSDT.
    pub fn acpi_devices(&self) -> Vec<(u64, u64, u32)> {
        self.slots
            .iter()
            .map(|slot| (slot.base, VIRTIO_MMIO_SIZE, slot.irq))
            .collect()
    }

    /// Puts every device on the MMIO bus.
    pub fn attach(&self, mmio_bus: &mut Bus) -> Result<(), DeviceError> {
        for slot in &self.slots {
            mmio_bus
                .insert(slot.bus_device.clone(), slot.base, VIRTIO_MMIO_SIZE)
                .map_err(|err| DeviceError::Bus(slot.what.clone(), err))?;
        }
        Ok(())
    }
}

/// Opens a TAP interface or starts passt for a NIC.
fn open_backend(net: &NetConfig) -> Result<Box<dyn Backend>, String> {
    if let Some(name) = &net.tap {
        return Ok(Box::new(Tap::open(name).map_err(|e| e.to_string())?));
    }
    if let Some(fd) = net.tap_fd {
        // SAFETY: the user handed Kiln this descriptor for the NIC (`tap-fd=N`); nothing else
        // in Kiln knows its number. `from_fd` checks it is an open TAP before owning it.
        return Ok(Box::new(
            unsafe { Tap::from_fd(fd) }.map_err(|e| e.to_string())?,
        ));
    }
    let options = PasstOptions {
        forwards: net.hostfwd.iter().map(|forward| forward.0).collect(),
        ..PasstOptions::default()
    };
    Ok(Box::new(passt::spawn(&options).map_err(|e| e.to_string())?))
}

/// Locks a device, also after a panic on another thread (the transport's state stays valid:
/// every register write is applied whole or not at all).
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
#[path = "device_manager_tests.rs"]
mod tests;
