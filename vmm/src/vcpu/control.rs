//! The vCPU state machine: each vCPU thread obeys commands from the VMM thread.
//!
//! ```text
//!            Run                       Pause (kick)
//!  Parked ─────────▶ Running ──────────────────────▶ Parked
//!    │  ▲              │                                │ SaveState, RestoreState
//!    │  └──────────────┘                                │ (answered while parked)
//!    │                 │ guest ends the VM / error      │
//!    │                 ▼                                │
//!    └── Stop (kick) ─▶ Exited ◀──── Stop (kick) ───────┘
//! ```
//!
//! Every command gets exactly one reply. Commands that must interrupt the guest are followed by
//! a kick (see [`super::kick`]), so a running vCPU leaves `KVM_RUN` and reads its channel
//! before it enters the guest again; `pause_all` returns only when every vCPU has answered,
//! i.e. is out of `KVM_RUN` and parked on its channel.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_devices::exit::StopReason;

use super::kick::{kick, KickTarget};
use super::{Flow, Vcpu, VcpuError, VcpuState};

/// How long a vCPU may take to answer a command. A running vCPU answers within microseconds
/// of its kick; only a thread stuck in a device would not.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VMM thread asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    /// Run the guest (from paused).
    Run,
    /// Leave the guest and park.
    Pause,
    /// Read the vCPU's state (only while paused).
    SaveState,
    /// Write the vCPU's state (only while paused).
    RestoreState(Box<VcpuState>),
    /// Read the guest TSC (only while paused).
    ReadTsc,
    /// Set the guest TSC (only while paused).
    WriteTsc(u64),
    /// End the thread.
    Stop,
}

impl VcpuCommand {
    fn name(&self) -> &'static str {
        match self {
            VcpuCommand::Run => "run",
            VcpuCommand::Pause => "pause",
            VcpuCommand::SaveState => "save state",
            VcpuCommand::RestoreState(_) => "restore state",
            VcpuCommand::ReadTsc => "read the TSC",
            VcpuCommand::WriteTsc(_) => "write the TSC",
            VcpuCommand::Stop => "stop",
        }
    }

    /// Whether the vCPU must be pulled out of the guest to see this command.
    fn needs_kick(&self) -> bool {
        !matches!(self, VcpuCommand::Run)
    }
}

/// A vCPU thread's answer to one command.
#[derive(Debug)]
enum VcpuReply {
    Done,
    Saved(Box<VcpuState>),
    Tsc(super::state::TscReading),
    TscWritten(Instant),
    Refused(VcpuError),
}

/// The vCPU thread's loop: parked until told to run, then runs the guest, reading its command
/// channel between exits. Returns the error that ended the guest, if any.
fn vcpu_thread(
    mut vcpu: Vcpu,
    commands: Receiver<VcpuCommand>,
    replies: Sender<VcpuReply>,
    start_running: bool,
) -> Result<(), VcpuError> {
    let _kick_target = KickTarget::register(vcpu.fd.get_kvm_run());
    let id = vcpu.id;
    let mut running = start_running;
    let mut failure = None;
    loop {
        let command = if running {
            match commands.try_recv() {
                Ok(command) => Some(command),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match commands.recv() {
                Ok(command) => Some(command),
                Err(_) => break,
            }
        };
        if let Some(command) = command {
            let reply = match command {
                VcpuCommand::Run if failure.is_none() && vcpu.exit.reason().is_none() => {
                    // A kick that came while parked must not cut the first entry short.
                    vcpu.fd.set_kvm_immediate_exit(0);
                    running = true;
                    VcpuReply::Done
                }
                // The guest already ended the VM: stay parked until told to stop.
                VcpuCommand::Run => VcpuReply::Done,
                VcpuCommand::Pause => {
                    running = false;
                    VcpuReply::Done
                }
                VcpuCommand::SaveState if running => VcpuReply::Refused(VcpuError::NotPaused(id)),
                VcpuCommand::SaveState => {
                    match VcpuState::save(&vcpu.fd, &vcpu.msr_indices, &vcpu.cpuid) {
                        Ok(state) => VcpuReply::Saved(Box::new(state)),
                        Err(source) => VcpuReply::Refused(VcpuError::State { id, source }),
                    }
                }
                VcpuCommand::RestoreState(_) if running => {
                    VcpuReply::Refused(VcpuError::NotPaused(id))
                }
                VcpuCommand::RestoreState(state) => match state.restore(&vcpu.fd, &vcpu.cpuid) {
                    Ok(()) => {
                        vcpu.cpuid = state.cpuid;
                        VcpuReply::Done
                    }
                    Err(source) => VcpuReply::Refused(VcpuError::State { id, source }),
                },
                VcpuCommand::ReadTsc | VcpuCommand::WriteTsc(_) if running => {
                    VcpuReply::Refused(VcpuError::NotPaused(id))
                }
                VcpuCommand::ReadTsc => match super::state::read_tsc(&vcpu.fd) {
                    Ok(tsc) => VcpuReply::Tsc(tsc),
                    Err(source) => VcpuReply::Refused(VcpuError::State { id, source }),
                },
                VcpuCommand::WriteTsc(tsc) => match super::state::write_tsc(&vcpu.fd, tsc) {
                    Ok(written) => VcpuReply::TscWritten(written),
                    Err(source) => VcpuReply::Refused(VcpuError::State { id, source }),
                },
                VcpuCommand::Stop => {
                    let _ = replies.send(VcpuReply::Done);
                    break;
                }
            };
            // The VMM thread may have given up waiting; that is its business.
            let _ = replies.send(reply);
            continue;
        }
        match vcpu.run_once() {
            Ok(Flow::Continue) | Ok(Flow::Interrupted) => {}
            Ok(Flow::GuestEnded) => {}
            Err(err) => {
                vcpu.exits.failure();
                if vcpu.exit.reason().is_some() {
                    // The VM was already ending; this is only context.
                    log::debug!("after the VM was asked to stop: {err}");
                } else {
                    log::debug!("{err}");
                    vcpu.exit.notify(StopReason::VcpuError);
                    failure = Some(err);
                }
            }
        }
        // The guest (or a device, during the last exit) ended the VM: this thread is done.
        // Ending it now rather than parking spares the VM's end a round trip per vCPU; the
        // VMM thread's stop finds it gone and only joins it.
        if vcpu.exit.reason().is_some() {
            break;
        }
    }
    failure.map_or(Ok(()), Err)
}

/// The VMM thread's end of one vCPU thread.
struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    replies: Receiver<VcpuReply>,
    thread: Option<JoinHandle<Result<(), VcpuError>>>,
}

impl VcpuHandle {
    /// Sends `command` (kicking the thread out of the guest if needed) without waiting.
    fn post(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        let kick_after = command.needs_kick();
        self.commands
            .send(command)
            .map_err(|_| VcpuError::Gone(self.id))?;
        if kick_after {
            if let Some(thread) = &self.thread {
                kick(thread);
            }
        }
        Ok(())
    }

    /// Waits for the answer to the command posted last.
    fn answer(&self, command: &'static str) -> Result<VcpuReply, VcpuError> {
        let started = Instant::now();
        match self.replies.recv_timeout(ANSWER_TIMEOUT) {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone(self.id)),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout {
                id: self.id,
                command,
                waited_ms: started.elapsed().as_millis(),
            }),
        }
    }

    fn send(&self, command: VcpuCommand) -> Result<VcpuReply, VcpuError> {
        let name = command.name();
        self.post(command)?;
        self.answer(name)
    }

    fn command(&self, command: VcpuCommand) -> Result<(), VcpuError> {
        match self.send(command)? {
            VcpuReply::Refused(err) => Err(err),
            VcpuReply::Done
            | VcpuReply::Saved(_)
            | VcpuReply::Tsc(_)
            | VcpuReply::TscWritten(_) => Ok(()),
        }
    }
}

/// The running vCPU threads of a VM.
pub struct VcpuThreads {
    handles: Vec<VcpuHandle>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU, running the guest at once (`start_running`, which saves
    /// the start-up a round trip per vCPU) or parked until [`run_all`](Self::run_all). On
    /// failure, the threads already started are stopped.
    pub fn spawn(vcpus: Vec<Vcpu>, start_running: bool) -> Result<Self, VcpuError> {
        let mut threads = Self {
            handles: Vec::with_capacity(vcpus.len()),
        };
        for vcpu in vcpus {
            let id = vcpu.id;
            let (commands, command_receiver) = channel();
            let (reply_sender, replies) = channel();
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-vcpu{id}"))
                .spawn(move || vcpu_thread(vcpu, command_receiver, reply_sender, start_running));
            match spawned {
                Ok(thread) => threads.handles.push(VcpuHandle {
                    id,
                    commands,
                    replies,
                    thread: Some(thread),
                }),
                Err(source) => {
                    threads.stop_all();
                    return Err(VcpuError::Spawn { id, source });
                }
            }
        }
        Ok(threads)
    }

    /// Lets every vCPU run the guest.
    pub fn run_all(&self) -> Result<(), VcpuError> {
        self.broadcast(|| VcpuCommand::Run, false)
    }

    /// Pulls every vCPU out of the guest; returns once each one is parked. A vCPU whose
    /// thread already ended (after an error) counts as parked.
    pub fn pause_all(&self) -> Result<(), VcpuError> {
        self.broadcast(|| VcpuCommand::Pause, true)
    }

    /// Sends a command to every vCPU at once (so that they leave the guest in parallel), then
    /// collects every answer; returns the first error.
    fn broadcast(
        &self,
        command: impl Fn() -> VcpuCommand,
        gone_is_fine: bool,
    ) -> Result<(), VcpuError> {
        let name = command().name();
        let posted: Vec<Result<(), VcpuError>> = self
            .handles
            .iter()
            .map(|handle| handle.post(command()))
            .collect();
        let mut first_error = None;
        for (handle, posted) in self.handles.iter().zip(posted) {
            let result = posted
                .and_then(|()| handle.answer(name))
                .and_then(|reply| match reply {
                    VcpuReply::Refused(err) => Err(err),
                    VcpuReply::Done
                    | VcpuReply::Saved(_)
                    | VcpuReply::Tsc(_)
                    | VcpuReply::TscWritten(_) => Ok(()),
                });
            match result {
                Err(VcpuError::Gone(_)) if gone_is_fine => {}
                Err(err) => {
                    first_error.get_or_insert(err);
                }
                Ok(()) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reads every vCPU's state; the vCPUs must be paused.
    pub fn save_all(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.handles
            .iter()
            .map(|handle| match handle.send(VcpuCommand::SaveState)? {
                VcpuReply::Saved(state) => Ok(*state),
                VcpuReply::Refused(err) => Err(err),
                VcpuReply::Done | VcpuReply::Tsc(_) | VcpuReply::TscWritten(_) => {
                    Err(VcpuError::Gone(handle.id))
                }
            })
            .collect()
    }

    /// Reads every vCPU's guest TSC (and kvmclock MSR); the vCPUs must be paused.
    pub fn read_tscs(&self) -> Result<Vec<super::state::TscReading>, VcpuError> {
        self.handles
            .iter()
            .map(|handle| match handle.send(VcpuCommand::ReadTsc)? {
                VcpuReply::Tsc(tsc) => Ok(tsc),
                VcpuReply::Refused(err) => Err(err),
                VcpuReply::Done | VcpuReply::Saved(_) | VcpuReply::TscWritten(_) => {
                    Err(VcpuError::Gone(handle.id))
                }
            })
            .collect()
    }

    /// Sets each vCPU's guest TSC, in order; the vCPUs must be paused. Returns when the first
    /// write took effect (KVM gives the others, written within a second with matching values,
    /// the same TSC offset).
    pub fn write_tscs(&self, tscs: &[u64]) -> Result<Option<Instant>, VcpuError> {
        let mut first = None;
        for (handle, &tsc) in self.handles.iter().zip(tscs) {
            match handle.send(VcpuCommand::WriteTsc(tsc))? {
                VcpuReply::TscWritten(at) => {
                    first.get_or_insert(at);
                }
                VcpuReply::Refused(err) => return Err(err),
                VcpuReply::Done | VcpuReply::Saved(_) | VcpuReply::Tsc(_) => {
                    return Err(VcpuError::Gone(handle.id))
                }
            }
        }
        Ok(first)
    }

    /// Writes each vCPU's state, in order; the vCPUs must be paused.
    pub fn restore_all(&self, states: Vec<VcpuState>) -> Result<(), VcpuError> {
        for (handle, state) in self.handles.iter().zip(states) {
            handle.command(VcpuCommand::RestoreState(Box::new(state)))?;
        }
        Ok(())
    }

    /// Number of vCPU threads.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops every vCPU and joins its thread; returns the first vCPU error.
    ///
    /// A thread that does not answer within the timeout (stuck in a device, which should never
    /// happen) is left behind with an error logged: it keeps its own reference to guest
    /// memory, so nothing it can touch is unmapped under it.
    pub fn stop_all(&mut self) -> Option<VcpuError> {
        // Kick everyone first, then wait: the vCPUs leave the guest in parallel.
        for handle in &self.handles {
            if handle.commands.send(VcpuCommand::Stop).is_ok() {
                if let Some(thread) = &handle.thread {
                    kick(thread);
                }
            }
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut first_error = None;
        for mut handle in self.handles.drain(..) {
            let wait = deadline.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) = handle.replies.recv_timeout(wait) {
                log::error!(
                    "vCPU {} did not stop within {ANSWER_TIMEOUT:?}; leaving its thread behind",
                    handle.id
                );
                continue;
            }
            let Some(thread) = handle.thread.take() else {
                continue;
            };
            let result = thread.join().unwrap_or(Err(VcpuError::Panicked(handle.id)));
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        }
        first_error
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop_all();
        }
    }
}
