//! vCPUs: each runs on its own thread, driven by commands (see [`control`]), and serves its
//! PIO/MMIO exits synchronously on the device buses.

pub mod control;
pub mod kick;
pub mod state;

use std::sync::Arc;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use kiln_devices::bus::Bus;
use kiln_devices::exit::{ExitNotifier, StopReason};
use kiln_devices::log_limit::LogLimiter;

use crate::memory::GuestMemory;
use crate::metrics::VcpuExitCounters;

pub use control::{VcpuCommand, VcpuThreads};
pub use kick::install_kick_handler;
pub use state::{StateError, VcpuState};

/// Why a vCPU failed or refused a command.
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
    /// The thread ended (after an error) and takes no more commands.
    #[error("vCPU {0} has stopped")]
    Gone(u8),
    /// The thread did not answer a command in time.
    #[error("vCPU {id} did not answer '{command}' within {waited_ms} ms")]
    Timeout {
        /// vCPU index.
        id: u8,
        /// The command.
        command: &'static str,
        /// How long Kiln waited.
        waited_ms: u128,
    },
    /// State can only be read or written while the vCPU is paused.
    #[error("vCPU {0} is running: pause it first")]
    NotPaused(u8),
    /// Its state could not be read or written.
    #[error("vCPU {id}: {source}")]
    State {
        /// vCPU index.
        id: u8,
        /// What failed.
        source: StateError,
    },
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
    /// Guest memory, held by the vCPU so that it stays mapped for as long as this vCPU can
    /// enter the guest: KVM's memory slots point into it, and a thread that outlives the VM
    /// (one that never answered its stop command) must not run on unmapped memory.
    pub memory: GuestMemory,
    /// The MSRs KVM lets a VMM save, for [`VcpuState::save`].
    pub msr_indices: Arc<Vec<u32>>,
    /// The CPUID this vCPU was given (saved with its state).
    pub cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Rate limit for the lines a guest can trigger on every exit.
    pub warnings: LogLimiter,
    /// Exit counters, shared by the VM's vCPUs.
    pub exits: Arc<VcpuExitCounters>,
}

/// What one exit means for the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Keep running the guest.
    Continue,
    /// Back to the command channel: a kick (or a spurious interrupt) made KVM_RUN return.
    Interrupted,
    /// The guest ended the VM (its reason is with the exit notifier).
    GuestEnded,
}

impl Vcpu {
    /// Enters the guest once and handles the exit.
    pub fn run_once(&mut self) -> Result<Flow, VcpuError> {
        let id = self.id;
        // Raw, so that no borrow of the vCPU outlives this line: the exit below borrows it.
        let run: *mut kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(Flow::Interrupted);
            }
            Err(source) => return Err(VcpuError::Run { id, source }),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.exits.io_in();
                // SAFETY: `run` is this vCPU's kvm_run mapping, live while `self.fd` is; the
                // exit reason is KVM_EXIT_IO, so the `io` union member is the valid one. Only
                // that header field is read; `data` lies past the struct.
                let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() };
                for (index, access) in data.chunks_mut(usize::from(size).max(1)).enumerate() {
                    if !self.io_bus.read(u64::from(port), access) && index == 0 {
                        kiln_devices::debug_limited!(
                            self.warnings,
                            "vCPU port I/O",
                            "vCPU {id}: read of unhandled port {port:#x}"
                        );
                    }
                }
            }
            VcpuExit::IoOut(port, data) => {
                self.exits.io_out();
                // SAFETY: as for IoIn above.
                let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() };
                // `rep outs` arrives as one exit: `count` accesses of `size` bytes, in order.
                for (index, access) in data.chunks(usize::from(size).max(1)).enumerate() {
                    if !self.io_bus.write(u64::from(port), access) && index == 0 {
                        kiln_devices::debug_limited!(
                            self.warnings,
                            "vCPU port I/O",
                            "vCPU {id}: write of unhandled port {port:#x}: {access:x?}"
                        );
                    }
                }
            }
            VcpuExit::MmioRead(address, data) => {
                self.exits.mmio_read();
                if !self.mmio_bus.read(address, data) {
                    kiln_devices::debug_limited!(
                        self.warnings,
                        "vCPU MMIO",
                        "vCPU {id}: read of unhandled MMIO address {address:#x}"
                    );
                }
            }
            VcpuExit::MmioWrite(address, data) => {
                self.exits.mmio_write();
                if !self.mmio_bus.write(address, data) {
                    kiln_devices::debug_limited!(
                        self.warnings,
                        "vCPU MMIO",
                        "vCPU {id}: write of unhandled MMIO address {address:#x}"
                    );
                }
            }
            VcpuExit::Hlt => {
                // Only seen without an in-kernel LAPIC; treat it as the guest stopping for good.
                log::info!("vCPU {id} halted");
                self.exit.notify(StopReason::PowerOff);
                return Ok(Flow::GuestEnded);
            }
            VcpuExit::Shutdown => {
                log::info!("vCPU {id}: triple fault, the guest reset itself");
                self.exit.notify(StopReason::Reset);
                return Ok(Flow::GuestEnded);
            }
            VcpuExit::SystemEvent(kind, _) => {
                let reason = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => StopReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => StopReason::Reset,
                    KVM_SYSTEM_EVENT_CRASH => StopReason::Panic,
                    other => {
                        kiln_devices::warn_limited!(
                            self.warnings,
                            "vCPU system events",
                            "vCPU {id}: ignoring unknown system event {other}"
                        );
                        return Ok(Flow::Continue);
                    }
                };
                self.exit.notify(reason);
                return Ok(Flow::GuestEnded);
            }
            VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { id, reason }),
            VcpuExit::InternalError => return Err(VcpuError::Internal { id }),
            VcpuExit::Intr => return Ok(Flow::Interrupted),
            VcpuExit::IrqWindowOpen => {}
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
