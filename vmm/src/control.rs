//! The VMM thread's side of [`VmHandle`](crate::VmHandle) requests: pause, resume, vCPU and
//! device state, snapshots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use kiln_devices::legacy::i8042::I8042Device;
use kiln_devices::legacy::serial::SerialDevice;

use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::handle::{Answer, ControlError, Request, VmHandle, VmState};
use crate::memory::GuestMemory;
use crate::snapshot::restore::disk_identity;
use crate::snapshot::{
    write_diff_memory_file, write_memory_file, write_state_file, MemoryLayer, SavedDisk,
    SavedIrqchip, SavedRegion, SnapshotError, SnapshotKind, VmSnapshot,
};

/// The page size of dirty tracking (KVM's and vm-memory's).
const PAGE: usize = 4096;
use crate::pvclock::guest_kvmclock_at;
use crate::vcpu::VcpuThreads;

/// What the VMM thread needs to answer requests.
pub(crate) struct Controller<'a> {
    pub(crate) threads: VcpuThreads,
    pub(crate) virtio: &'a DeviceManager,
    pub(crate) handle: &'a VmHandle,
    pub(crate) vm_fd: &'a VmFd,
    pub(crate) memory: &'a GuestMemory,
    pub(crate) serial: &'a Arc<Mutex<SerialDevice>>,
    pub(crate) i8042: &'a Arc<Mutex<I8042Device>>,
    pub(crate) config: &'a VmConfig,
    /// kvmclock as the last pause left it: resume sets it back, so that the guest's clock does
    /// not jump by the time it was paused.
    pub(crate) frozen_clock: Option<kvm_bindings::kvm_clock_data>,
    /// Each vCPU's guest TSC, read together with `frozen_clock` (only when it was read): resume
    /// and snapshots put it back with kvmclock, so that the two clocks the guest compares
    /// (its clocksource watchdog) stay consistent across the pause.
    pub(crate) frozen_tscs: Option<Vec<u64>>,
    /// The memory files of the last snapshot taken (or restored from): what a diff layers on.
    pub(crate) layers: Vec<MemoryLayer>,
}

impl Controller<'_> {
    /// Reads each vCPU's TSC (the vCPUs are parked) and kvmclock as the guest sees it at that
    /// TSC (see [`crate::pvclock`]): the guest time a resume or a snapshot continues from.
    pub(crate) fn freeze_time(&mut self) {
        self.frozen_clock = read_clock(self.vm_fd);
        self.frozen_tscs = None;
        let Some(clock) = self.frozen_clock.as_mut() else {
            return;
        };
        match self.threads.read_tscs() {
            Ok(readings) => {
                // kvmclock as the guest reads it at vCPU 0's TSC: the same instant for both.
                if let Some(ns) = readings.first().and_then(|first| {
                    guest_kvmclock_at(self.memory, first.system_time_msr, first.tsc)
                }) {
                    log::debug!(
                        "guest time frozen: TSC {:?}, kvmclock {ns} (KVM_GET_CLOCK {})",
                        readings.first().map(|r| r.tsc),
                        clock.clock
                    );
                    clock.clock = ns;
                }
                self.frozen_tscs = Some(readings.iter().map(|reading| reading.tsc).collect());
            }
            Err(err) => log::warn!(
                "cannot read the vCPUs' TSC at pause: {err}; the guest's TSC and kvmclock \
                 will disagree after the pause"
            ),
        }
    }

    /// Sets the TSCs and then kvmclock back to what [`freeze_time`](Self::freeze_time) read,
    /// back to back: both continue from the pause, so the guest sees neither jump nor the
    /// two disagree (a TSC left running while kvmclock stood still makes Linux's watchdog
    /// mark the TSC unstable).
    fn thaw_time(&mut self) {
        let mut tsc_written = None;
        if let Some(tscs) = self.frozen_tscs.take() {
            match self.threads.write_tscs(&tscs) {
                Ok(written) => tsc_written = written,
                Err(err) => log::warn!("cannot set the vCPUs' TSC back at resume: {err}"),
            }
        }
        if let Some(mut clock) = self.frozen_clock.take() {
            // The TSC has been running since its write: kvmclock starts as far along.
            if let Some(written) = tsc_written {
                clock.clock = clock
                    .clock
                    .wrapping_add(written.elapsed().as_nanos() as u64);
            }
            thaw_clock(self.vm_fd, clock);
        }
    }

    /// Carries out one request.
    pub(crate) fn serve(
        &mut self,
        request: Request,
        paused: &mut bool,
    ) -> Result<Answer, ControlError> {
        match request {
            Request::Pause if *paused => Ok(Answer::Done),
            Request::Pause => {
                // vCPUs first: once they are parked no driver can add work, then the devices
                // finish what they have and stop.
                self.threads.pause_all()?;
                if let Err(err) = self.virtio.pause_all() {
                    self.threads.run_all()?;
                    return Err(err.into());
                }
                self.freeze_time();
                *paused = true;
                self.handle.set_state(VmState::Paused);
                log::debug!("VM paused");
                Ok(Answer::Done)
            }
            Request::Resume if !*paused => Ok(Answer::Done),
            Request::Resume => {
                self.thaw_time();
                self.virtio.resume_all();
                self.threads.run_all()?;
                *paused = false;
                self.handle.set_state(VmState::Running);
                log::debug!("VM resumed");
                Ok(Answer::Done)
            }
            Request::SaveVcpus if !*paused => Err(ControlError::NotPaused),
            Request::SaveVcpus => Ok(Answer::Vcpus(self.threads.save_all()?)),
            Request::RestoreVcpus(_) if !*paused => Err(ControlError::NotPaused),
            Request::RestoreVcpus(states) if states.len() != self.threads.len() => {
                Err(ControlError::VcpuCount {
                    expected: self.threads.len(),
                    given: states.len(),
                })
            }
            Request::RestoreVcpus(states) => {
                self.threads.restore_all(states)?;
                Ok(Answer::Done)
            }
            Request::DeviceStates => Ok(Answer::Devices(self.virtio.states())),
            Request::Snapshot { .. } if !*paused => Err(SnapshotError::NotPaused.into()),
            Request::Snapshot {
                state,
                memory,
                kind,
            } => {
                self.snapshot(&state, &memory, kind)?;
                Ok(Answer::Done)
            }
            Request::GuestClock => Ok(Answer::Clock(match self.frozen_clock {
                Some(clock) => clock.clock,
                None => {
                    self.vm_fd
                        .get_clock()
                        .map_err(|err| SnapshotError::Kvm("read kvmclock", err))?
                        .clock
                }
            })),
            Request::CtrlAltDel => {
                self.i8042
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .send_ctrl_alt_del()?;
                Ok(Answer::Done)
            }
            Request::ReplaceDisk { index, path } => {
                // Paused around the swap, so that no request is served half from each image.
                let was_paused = *paused;
                self.serve(Request::Pause, paused)?;
                let replaced = self.virtio.replace_disk(index, &path);
                if !was_paused {
                    self.serve(Request::Resume, paused)?;
                }
                replaced?;
                Ok(Answer::Done)
            }
        }
    }

    /// Writes a snapshot of the paused VM: memory file first, state file last (the state file
    /// is what names a snapshot complete).
    fn snapshot(
        &mut self,
        state_path: &Path,
        memory_path: &Path,
        kind: SnapshotKind,
    ) -> Result<(), ControlError> {
        let started = std::time::Instant::now();
        let memory_path = absolute(memory_path)?;
        if kind == SnapshotKind::Diff {
            if !self.config.track_dirty_pages {
                return Err(SnapshotError::Diff(
                    "dirty page tracking is off (track_dirty_pages)".into(),
                )
                .into());
            }
            if self.layers.is_empty() {
                return Err(SnapshotError::Diff(
                    "there is no earlier snapshot of this VM to layer it on".into(),
                )
                .into());
            }
            if self.layers.iter().any(|layer| layer.path == memory_path) {
                return Err(SnapshotError::Diff(format!(
                    "'{}' holds a layer the diff builds on; write it to another file",
                    memory_path.display()
                ))
                .into());
            }
        }
        let mut vcpus = self.threads.save_all()?;
        let mut irqchip = save_vm_state(self.vm_fd)?;
        if let Some(frozen) = self.frozen_clock {
            // The guest's time stopped at the pause; kvmclock and the TSC themselves went on.
            // Both are saved as the pause read them, so that they restore consistent.
            irqchip.clock = frozen;
            if let Some(tscs) = &self.frozen_tscs {
                for (vcpu, &tsc) in vcpus.iter_mut().zip(tscs) {
                    vcpu.set_tsc(tsc);
                }
            }
        }
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .snapshot();
        let i8042 = self
            .i8042
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .snapshot();
        let virtio: Vec<_> = self
            .virtio
            .states()
            .into_iter()
            .map(|(_, state)| state)
            .collect();
        let capacities: Vec<u64> = self
            .virtio
            .disks()
            .iter()
            .map(|disk| {
                disk.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .device()
                    .disk()
                    .size()
            })
            .collect();
        let disks = saved_disks(self.config, &capacities)?;
        let snapshot_id = random_id();
        let regions = self
            .memory
            .iter()
            .map(|region| SavedRegion {
                guest_addr: region.start_addr().raw_value(),
                len: region.len(),
            })
            .collect();
        let layer = match kind {
            SnapshotKind::Full => {
                write_memory_file(&memory_path, self.memory, snapshot_id)?;
                MemoryLayer {
                    path: memory_path.clone(),
                    snapshot_id,
                    pages: None,
                }
            }
            SnapshotKind::Diff => {
                let dirty = self.dirty_pages()?;
                let pages =
                    write_diff_memory_file(&memory_path, self.memory, snapshot_id, |r, p| {
                        dirty[r]
                            .get(p / 64)
                            .is_some_and(|word| word & (1 << (p % 64)) != 0)
                    })?;
                MemoryLayer {
                    path: memory_path.clone(),
                    snapshot_id,
                    pages: Some(pages),
                }
            }
        };
        let mut layers = match kind {
            SnapshotKind::Full => Vec::new(),
            SnapshotKind::Diff => self.layers.clone(),
        };
        layers.push(layer);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let snapshot = VmSnapshot {
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            snapshot_id,
            created_unix_ms: created,
            config: self.config.clone(),
            disks,
            memory: regions,
            memory_layers: layers.clone(),
            vcpus,
            irqchip,
            serial,
            i8042,
            virtio,
        };
        write_state_file(state_path, &snapshot)?;
        if self.config.track_dirty_pages {
            // The next diff starts from here.
            self.dirty_pages()?;
        }
        self.layers = layers;
        log::info!(
            "{kind:?} snapshot written to '{}' and '{}' in {} ms",
            state_path.display(),
            memory_path.display(),
            started.elapsed().as_millis()
        );
        Ok(())
    }

    /// The pages written since the last call, per region (one bit per 4 KiB page): KVM's dirty
    /// log for the vCPUs' writes, the memory bitmap for the devices' and the VMM's. Both are
    /// cleared.
    fn dirty_pages(&self) -> Result<Vec<Vec<u64>>, SnapshotError> {
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                let mut bits = self
                    .vm_fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|err| SnapshotError::Kvm("read the dirty page log", err))?;
                // The region's own bitmap (the mapping's), not a slice of it: it can be reset.
                let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
                let pages = (region.len() as usize).div_ceil(PAGE);
                bits.resize(pages.div_ceil(64), 0);
                for page in 0..pages {
                    if bitmap.is_addr_set(page * PAGE) {
                        bits[page / 64] |= 1 << (page % 64);
                    }
                }
                bitmap.reset();
                Ok(bits)
            })
            .collect()
    }
}

/// Each disk's config, size and modification time.
/// Each disk as it is now; `capacities` are what the guest sees of each (in order).
fn saved_disks(config: &VmConfig, capacities: &[u64]) -> Result<Vec<SavedDisk>, SnapshotError> {
    config
        .disks
        .iter()
        .zip(capacities)
        .enumerate()
        .map(|(index, (config, &capacity))| {
            let (size, modified_ns) =
                disk_identity(&config.path).map_err(|err| SnapshotError::Disk {
                    index: index + 1,
                    path: config.path.clone(),
                    reason: format!("cannot read its size and time: {err}"),
                })?;
            Ok(SavedDisk {
                config: config.clone(),
                size,
                capacity,
                modified_ns,
            })
        })
        .collect()
}

/// `path` made absolute against the current directory (a diff chain names its files).
fn absolute(path: &Path) -> Result<PathBuf, SnapshotError> {
    std::path::absolute(path).map_err(|source| SnapshotError::Io {
        what: "resolve the memory file path",
        path: path.to_path_buf(),
        source,
    })
}

/// kvmclock now (None, logged, if KVM cannot say: the guest's clock then jumps on resume).
pub(crate) fn read_clock(vm_fd: &VmFd) -> Option<kvm_bindings::kvm_clock_data> {
    match vm_fd.get_clock() {
        Ok(clock) => Some(clock),
        Err(err) => {
            log::warn!("cannot read kvmclock at pause: {err}; the guest's clock will jump");
            None
        }
    }
}

/// Sets kvmclock back to `frozen` (no realtime catch-up).
fn thaw_clock(vm_fd: &VmFd, frozen: kvm_bindings::kvm_clock_data) {
    let clock = kvm_bindings::kvm_clock_data {
        clock: frozen.clock,
        ..Default::default()
    };
    if let Err(err) = vm_fd.set_clock(&clock) {
        log::warn!("cannot set kvmclock back at resume: {err}; the guest's clock jumps");
    }
}

/// Reads the in-kernel interrupt controllers, the PIT and kvmclock.
fn save_vm_state(vm_fd: &VmFd) -> Result<SavedIrqchip, SnapshotError> {
    let chip = |id| -> Result<kvm_irqchip, SnapshotError> {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm_fd
            .get_irqchip(&mut chip)
            .map_err(|err| SnapshotError::Kvm("read the interrupt controllers", err))?;
        Ok(chip)
    };
    Ok(SavedIrqchip {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm_fd
            .get_pit2()
            .map_err(|err| SnapshotError::Kvm("read the PIT", err))?,
        clock: vm_fd
            .get_clock()
            .map_err(|err| SnapshotError::Kvm("read kvmclock", err))?,
    })
}

/// A random snapshot id (ties a memory file to its state file).
fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the live buffer.
    let got = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if got == bytes.len() as isize {
        return u64::from_le_bytes(bytes);
    }
    // No getrandom: time and pid are unique enough to tell two snapshots apart.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64);
    now ^ (u64::from(std::process::id()) << 32)
}
