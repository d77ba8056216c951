//! vCPU threads: each runs KVM_RUN in a loop and serves PIO/MMIO exits on the device buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use kiln_devices::bus::Bus;
use kiln_devices::exit::{ExitNotifier, StopReason};

/// How long `stop_all` waits for vCPU threads before giving up on joining them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a stopping vCPU thread is signalled again (a signal that lands just before
/// KVM_RUN is entered would otherwise be missed).
const KICK_INTERVAL: Duration = Duration::from_millis(5);
/// How often `stop_all` looks whether the threads are done (they normally are within
/// microseconds of the first kick).
const STOP_POLL_INTERVAL: Duration = Duration::from_micros(100);

/// Why a vCPU thread failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_RUN itself failed.
    #[error("vCPU {id}: KVM_RUN failed: {source}")]
    Run {
        /// vCPU index.
        id: u8,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// KVM could not enter the guest.
    #[error(
        "vCPU {id}: KVM could not enter the guest (hardware entry failure reason {reason:#x})"
    )]
    FailEntry {
        /// vCPU index.
        id: u8,
        /// Hardware reason code.
        reason: u64,
    },
    /// KVM's emulator gave up.
    #[error("vCPU {id}: KVM internal error (the instruction emulator could not handle the guest)")]
    Internal {
        /// vCPU index.
        id: u8,
    },
    /// An exit Kiln does not handle.
    #[error("vCPU {id}: unexpected VM exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// Its description.
        exit: String,
    },
    /// The thread could not be started.
    #[error("cannot start vCPU thread {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread panicked (a bug in Kiln).
    #[error("vCPU thread {0} panicked")]
    Panicked(u8),
}

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler that lets the kick signal interrupt KVM_RUN with EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), ignore_kick)
        .map_err(|err| std::io::Error::from_raw_os_error(err.errno()))
}

/// One configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    /// Index (also its APIC id).
    pub id: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Where the VM-ending events go.
    pub exit: ExitNotifier,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
}

/// What one exit means for the loop.
enum Flow {
    Continue,
    Stop,
}

impl Vcpu {
    /// Runs the guest until the VM stops; the error, if any, has already been reported through
    /// the exit notifier.
    pub fn run(mut self) -> Result<(), VcpuError> {
        // A device may have ended the VM during the last exit: stop at once rather than let the
        // guest run on until the VMM thread kicks this vCPU.
        while !self.stop.load(Ordering::Acquire) && self.exit.reason().is_none() {
            match self.run_once() {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break,
                Err(err) if self.exit.reason().is_some() => {
                    log::debug!("after the VM was asked to stop: {err}");
                    break;
                }
                Err(err) => {
                    // The VMM thread reports the first vCPU error; later ones are only context.
                    log::debug!("{err}");
                    self.exit.notify(StopReason::VcpuError);
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn run_once(&mut self) -> Result<Flow, VcpuError> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(Flow::Continue);
            }
            Err(source) => return Err(VcpuError::Run { id, source }),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.io_bus.read(u64::from(port), data) {
                    log::debug!("vCPU {id}: read of unhandled port {port:#x}");
                }
            }
            VcpuExit::IoOut(port, data) => {
                if !self.io_bus.write(u64::from(port), data) {
                    log::debug!("vCPU {id}: write of unhandled port {port:#x}: {data:x?}");
                }
            }
            VcpuExit::MmioRead(address, data) => {
                if !self.mmio_bus.read(address, data) {
                    log::debug!("vCPU {id}: read of unhandled MMIO address {address:#x}");
                }
            }
            VcpuExit::MmioWrite(address, data) => {
                if !self.mmio_bus.write(address, data) {
                    log::debug!("vCPU {id}: write of unhandled MMIO address {address:#x}");
                }
            }
            VcpuExit::Hlt => {
                // Only seen without an in-kernel LAPIC; treat it as the guest stopping for good.
                log::info!("vCPU {id} halted");
                self.exit.notify(StopReason::PowerOff);
                return Ok(Flow::Stop);
            }
            VcpuExit::Shutdown => {
                log::info!("vCPU {id}: triple fault, the guest reset itself");
                self.exit.notify(StopReason::Reset);
                return Ok(Flow::Stop);
            }
            VcpuExit::SystemEvent(kind, _) => {
                let reason = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => StopReason::Panic,
                    other => {
                        log::warn!("vCPU {id}: ignoring unknown system event {other}");
                        return Ok(Flow::Continue);
                    }
                };
                self.exit.notify(reason);
                return Ok(Flow::Stop);
            }
            VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { id, reason }),
            VcpuExit::InternalError => return Err(VcpuError::Internal { id }),
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            other => {
                return Err(VcpuError::UnexpectedExit {
                    id,
                    exit: format!("{other:?}"),
                })
            }
        }
        Ok(Flow::Continue)
    }
}

/// Running vCPU threads.
pub struct VcpuThreads {
    handles: Vec<(u8, JoinHandle<Result<(), VcpuError>>)>,
    stop: Arc<AtomicBool>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU. On failure, the threads already started are stopped.
    pub fn start(vcpus: Vec<Vcpu>, stop: Arc<AtomicBool>) -> Result<Self, VcpuError> {
        let mut threads = Self {
            handles: Vec::with_capacity(vcpus.len()),
            stop,
        };
        for vcpu in vcpus {
            let id = vcpu.id;
            let spawned = std::thread::Builder::new()
                .name(format!("kiln-vcpu{id}"))
                .spawn(move || vcpu.run());
            match spawned {
                Ok(handle) => threads.handles.push((id, handle)),
                Err(source) => {
                    threads.stop_all();
                    return Err(VcpuError::Spawn { id, source });
                }
            }
        }
        Ok(threads)
    }

    /// Stops every vCPU and joins its thread; returns the first vCPU error.
    pub fn stop_all(&mut self) -> Option<VcpuError> {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut next_kick = Instant::now();
        while self.handles.iter().any(|(_, h)| !h.is_finished()) && Instant::now() < deadline {
            if Instant::now() >= next_kick {
                for (id, handle) in self.handles.iter().filter(|(_, h)| !h.is_finished()) {
                    if let Err(err) = handle.kill(kick_signal()) {
                        log::debug!("cannot signal vCPU {id}: {err}");
                    }
                }
                next_kick = Instant::now() + KICK_INTERVAL;
            }
            std::thread::sleep(STOP_POLL_INTERVAL);
        }
        let mut first_error = None;
        for (id, handle) in self.handles.drain(..) {
            if !handle.is_finished() {
                log::error!("vCPU {id} did not stop within {STOP_TIMEOUT:?}; leaving it behind");
                continue;
            }
            let result = handle.join().unwrap_or(Err(VcpuError::Panicked(id)));
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
