//! [`VmHandle`]: what another thread holds to control a VM while [`Vm::run`](crate::Vm::run)
//! blocks: stop, pause, resume, and look inside a paused VM.
//!
//! Requests travel to the VMM thread over a channel and wake its event loop through an eventfd;
//! the VMM thread carries them out between events and answers on a per-request channel. A VM
//! that has not started yet, or has ended, answers [`ControlError::NotRunning`] at once, so a
//! caller never waits on a VM that will not answer.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

use kiln_devices::virtio::mmio::MmioState;

use crate::device_manager::DeviceError;
use crate::metrics::{Counters, VmMetrics};
use crate::snapshot::{SnapshotError, SnapshotKind};
use crate::vcpu::{VcpuError, VcpuState};

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Built, [`Vm::run`](crate::Vm::run) not called yet.
    NotStarted,
    /// The guest runs.
    Running,
    /// vCPUs parked and devices quiesced; nothing in the guest advances.
    Paused,
    /// The VM ended (or is ending); no more requests are served.
    Ended,
}

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The VM is not running (not started yet, or already ended).
    #[error("the VM is not running ({0:?})")]
    NotRunning(VmState),
    /// The request needs a paused VM.
    #[error("the VM must be paused first")]
    NotPaused,
    /// A restore gave a different number of vCPU states than the VM has vCPUs.
    #[error("{given} vCPU states given for a VM with {expected} vCPUs")]
    VcpuCount {
        /// vCPUs in the VM.
        expected: usize,
        /// States given.
        given: usize,
    },
    /// A vCPU failed the request.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A device failed the request.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The keyboard did not take the keys.
    #[error("cannot press keys on the guest's keyboard: {0}")]
    Keyboard(#[from] kiln_devices::legacy::i8042::KeyboardError),
    /// A snapshot could not be written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// A request for the VMM thread.
pub(crate) enum Request {
    Pause,
    Resume,
    SaveVcpus,
    RestoreVcpus(Vec<VcpuState>),
    DeviceStates,
    CtrlAltDel,
    ReplaceDisk {
        index: usize,
        path: PathBuf,
    },
    GuestClock,
    Snapshot {
        state: PathBuf,
        memory: PathBuf,
        kind: SnapshotKind,
    },
}

/// The VMM thread's answer.
pub(crate) enum Answer {
    Done,
    Vcpus(Vec<VcpuState>),
    Devices(Vec<(String, MmioState)>),
    Clock(u64),
}

/// One request and where its answer goes.
pub(crate) type Envelope = (Request, Sender<Result<Answer, ControlError>>);

struct Shared {
    /// Any write stops the VM (async-signal-safe: a signal handler may write it).
    stop: EventFd,
    /// Written after a request is queued: wakes the VMM thread's event loop.
    wake: EventFd,
    requests: Mutex<Option<Sender<Envelope>>>,
    state: Mutex<VmState>,
    state_changed: Condvar,
    counters: Counters,
}

/// Controls a VM from other threads. Cheap to clone; every operation on a VM that has ended
/// is a no-op (stop) or an error (the rest), never a hang or a panic.
#[derive(Clone)]
pub struct VmHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// The embedder's stop handle: [`VmHandle`] under its earlier name.
pub type StopHandle = VmHandle;

impl VmHandle {
    /// A handle and the receiving end of its requests (kept by the VM); `counters` are the
    /// VM's, which the handle keeps readable after the VM is gone.
    pub(crate) fn new(counters: Counters) -> std::io::Result<(Self, Receiver<Envelope>)> {
        let (sender, receiver) = channel();
        let shared = Shared {
            stop: EventFd::new(libc::EFD_NONBLOCK)?,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
            requests: Mutex::new(Some(sender)),
            state: Mutex::new(VmState::NotStarted),
            state_changed: Condvar::new(),
            counters,
        };
        Ok((
            Self {
                shared: Arc::new(shared),
            },
            receiver,
        ))
    }

    /// Asks the VM to stop; [`Vm::run`](crate::Vm::run) then returns
    /// [`VmOutcome::Stopped`](crate::VmOutcome::Stopped) (unless the guest ended first for its
    /// own reason). Works on a paused VM too.
    pub fn stop(&self) {
        if let Err(err) = self.shared.stop.write(1) {
            log::error!("cannot wake the VMM thread to stop the VM: {err}");
        }
    }

    /// The eventfd behind [`stop`](Self::stop), for a signal handler: writing a non-zero
    /// 8-byte counter to it (`write(2)`, async-signal-safe) stops the VM.
    pub fn stop_fd(&self) -> RawFd {
        self.shared.stop.as_raw_fd()
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> VmState {
        *lock(&self.shared.state)
    }

    /// Pauses the guest: returns once every vCPU is out of the guest and parked and every
    /// device has stopped taking requests from its queues. Pausing a paused VM does nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        self.request(Request::Pause).map(drop)
    }

    /// Lets a paused guest run on from where it stopped. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        self.request(Request::Resume).map(drop)
    }

    /// Reads every vCPU's state (the VM must be paused).
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, ControlError> {
        match self.request(Request::SaveVcpus)? {
            Answer::Vcpus(states) => Ok(states),
            _ => unreachable!("SaveVcpus is answered with vCPU states"),
        }
    }

    /// Writes every vCPU's state, one per vCPU in order (the VM must be paused).
    pub fn restore_vcpu_states(&self, states: Vec<VcpuState>) -> Result<(), ControlError> {
        self.request(Request::RestoreVcpus(states)).map(drop)
    }

    /// Each virtio device's description and transport state (queue positions are included
    /// while the VM is paused).
    pub fn device_states(&self) -> Result<Vec<(String, MmioState)>, ControlError> {
        match self.request(Request::DeviceStates)? {
            Answer::Devices(states) => Ok(states),
            _ => unreachable!("DeviceStates is answered with device states"),
        }
    }

    /// Presses and releases Ctrl-Alt-Del on the guest's i8042 keyboard: a Linux guest with
    /// the i8042 and AT keyboard drivers and a VT reboots (with Kiln's `reboot=k` the VM then
    /// ends). Refused when the guest has turned its keyboard off or is not reading it (its key
    /// buffer is full).
    pub fn send_ctrl_alt_del(&self) -> Result<(), ControlError> {
        self.request(Request::CtrlAltDel).map(drop)
    }

    /// Puts the image at `path` behind disk `index` (0 is `vda`) while the guest runs: the VM
    /// is paused around the swap (unless it already is), the image is opened and locked like
    /// the one it replaces, and the driver is told that the capacity may have changed.
    pub fn replace_disk(&self, index: usize, path: &Path) -> Result<(), ControlError> {
        self.request(Request::ReplaceDisk {
            index,
            path: path.to_path_buf(),
        })
        .map(drop)
    }

    /// Writes a snapshot of the paused VM: its state to `state`, its RAM to `memory` (see
    /// [`crate::snapshot`]). The VM stays paused; resume it or stop it afterwards.
    pub fn snapshot(
        &self,
        state: impl Into<PathBuf>,
        memory: impl Into<PathBuf>,
    ) -> Result<(), ControlError> {
        self.snapshot_of_kind(SnapshotKind::Full, state, memory)
    }

    /// [`snapshot`](Self::snapshot), full or diff. A diff writes only the pages changed since
    /// this VM's previous snapshot (or the one it was restored from) and layers over it: its
    /// state file names the earlier memory files, which must stay where they are. Needs
    /// `track_dirty_pages`.
    pub fn snapshot_of_kind(
        &self,
        kind: SnapshotKind,
        state: impl Into<PathBuf>,
        memory: impl Into<PathBuf>,
    ) -> Result<(), ControlError> {
        self.request(Request::Snapshot {
            state: state.into(),
            memory: memory.into(),
            kind,
        })
        .map(drop)
    }

    /// The guest's clock (kvmclock) in nanoseconds. It stands still while the VM is paused:
    /// resuming continues from where the pause stopped it, so the guest sees no jump.
    pub fn guest_clock_ns(&self) -> Result<u64, ControlError> {
        match self.request(Request::GuestClock)? {
            Answer::Clock(ns) => Ok(ns),
            _ => unreachable!("GuestClock is answered with the clock"),
        }
    }

    /// The VM's counters: vCPU exits and disk requests since it was built. Works in every
    /// state, also after the VM has ended (the totals are then final).
    pub fn metrics(&self) -> VmMetrics {
        self.shared.counters.snapshot()
    }

    fn request(&self, request: Request) -> Result<Answer, ControlError> {
        let state = self.state();
        if matches!(state, VmState::NotStarted | VmState::Ended) {
            return Err(ControlError::NotRunning(state));
        }
        let (reply, answer) = channel();
        {
            let requests = lock(&self.shared.requests);
            let sender = requests
                .as_ref()
                .ok_or(ControlError::NotRunning(VmState::Ended))?;
            sender
                .send((request, reply))
                .map_err(|_| ControlError::NotRunning(VmState::Ended))?;
        }
        if let Err(err) = self.shared.wake.write(1) {
            log::error!("cannot wake the VMM thread: {err}");
        }
        // The VM dropping the request unanswered (it ended) disconnects the reply channel.
        answer
            .recv()
            .map_err(|_| ControlError::NotRunning(VmState::Ended))?
    }

    pub(crate) fn stop_eventfd(&self) -> &EventFd {
        &self.shared.stop
    }

    pub(crate) fn wake_eventfd(&self) -> &EventFd {
        &self.shared.wake
    }

    /// Blocks until the VM has started (or ended without starting).
    pub(crate) fn wait_until_started(&self) {
        let mut state = lock(&self.shared.state);
        while *state == VmState::NotStarted {
            state = self
                .shared
                .state_changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    pub(crate) fn set_state(&self, state: VmState) {
        *lock(&self.shared.state) = state;
        self.shared.state_changed.notify_all();
        if state == VmState::Ended {
            // Later requests fail at once; queued ones are dropped with the receiver.
            lock(&self.shared.requests).take();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
