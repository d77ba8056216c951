//! A microVM from a [`VmConfig`]: built by [`Vm::new`], run to its end by [`Vm::run`].

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::SubscriberOps;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use kiln_arch::layout;
use kiln_devices::bus::Bus;
use kiln_devices::exit::{ExitNotifier, StopReason};
use kiln_devices::legacy::acpi_pm::AcpiPmDevice;
use kiln_devices::legacy::boot_timer::BootTimer;
use kiln_devices::legacy::i8042::{I8042Device, I8042_PORT_LEN};
use kiln_devices::legacy::pvpanic::PvPanicDevice;
use kiln_devices::legacy::serial::{EventFdTrigger, SerialDevice};
use kiln_devices::log_limit::LogLimiter;
use kiln_devices::virtio::EventLoopHandle;

use crate::config::{host_memory_mib, ConsoleConfig, VmConfig};
use crate::console_output::{self, ConsoleDrain};
use crate::control::Controller;
use crate::device_manager::DeviceManager;
use crate::event_loop::{ConsoleInput, EventLoop, StopWatcher};
use crate::handle::{Envelope, VmHandle, VmState};
use crate::kvm::{open_kvm, KvmHost, KVM_DEVICE};
use crate::loader::{load_cmdline, load_initrd, load_kernel, LoadedKernel};
use crate::memory::{create_guest_memory_backed, register_guest_memory, GuestMemory};
use crate::metrics::{Counters, VcpuExitCounters};
use crate::snapshot::{
    apply_net_overrides, apply_net_replacements, check_cpuid, check_disks, map_memory_layers,
    read_state_file, MemoryLayer, RestoreConfig, SavedIrqchip, SnapshotError, VmSnapshot,
};
use crate::terminal::RawTerminal;
use crate::vcpu::{install_kick_handler, Vcpu, VcpuThreads};
use crate::Error;

/// How a guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered itself off (ACPI S5, `poweroff`).
    PowerOff,
    /// The guest rebooted (i8042 reset, ACPI reset, triple fault). Kiln does not restart it.
    Reset,
    /// The guest kernel panicked (pvpanic).
    Panic,
    /// The VM was stopped from outside through its [`VmHandle`] (an embedder, or the CLI on a
    /// stop signal).
    Stopped,
}

/// A VM running on its own thread (see [`Vm::start`]).
#[derive(Debug)]
pub struct RunningVm {
    handle: VmHandle,
    thread: std::thread::JoinHandle<Result<VmOutcome, Error>>,
}

impl RunningVm {
    /// The VM's handle.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Whether the VM has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the VM to end and returns how it did.
    pub fn wait(self) -> Result<VmOutcome, Error> {
        self.thread
            .join()
            .unwrap_or(Err(Error::Internal("the VMM thread panicked")))
    }
}

/// Devices the VM keeps a handle to after building the buses.
struct LegacyDevices {
    serial: Arc<Mutex<SerialDevice>>,
    /// The keyboard controller, for Ctrl-Alt-Del from outside.
    i8042: Arc<Mutex<I8042Device>>,
}

/// A built microVM, not yet running.
pub struct Vm {
    config: VmConfig,
    // Field order is drop order: vCPUs and the VM fd go before the memory they point into
    // (each vCPU also holds its own reference to the memory).
    vcpus: Vec<Vcpu>,
    vm_fd: VmFd,
    kvm: KvmHost,
    memory: GuestMemory,
    exit: ExitNotifier,
    devices: LegacyDevices,
    _serial_irq: EventFd,
    /// Created early: virtio devices subscribe to it through its remote endpoint.
    event_loop: EventLoop,
    virtio: DeviceManager,
    handle: VmHandle,
    requests: Receiver<Envelope>,
    /// Restored from a snapshot: devices are paused until the VM runs.
    devices_paused: bool,
    /// Start with the vCPUs parked (a restore asked to stay paused).
    start_paused: bool,
    /// Writes the guest's console output on the event loop; finished when the VM ends.
    console: Arc<Mutex<ConsoleDrain>>,
    /// The memory files of the snapshot this VM was restored from (a diff layers on them).
    memory_layers: Vec<MemoryLayer>,
    /// Leave the KVM VM and guest memory to the process's exit (see `skip_teardown`).
    skip_teardown: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish()
    }
}

impl Vm {
    /// Builds the VM: checks the config, opens KVM, maps memory, loads the guest, creates devices
    /// and vCPUs. `start` is when the process started (the boot timer measures from it).
    pub fn new(config: VmConfig, start: Instant) -> Result<Self, Error> {
        config.validate(host_memory_mib())?;
        Self::build(config, start, None)
    }

    /// Builds a VM from a snapshot (see [`crate::snapshot`]): checks the state file, this
    /// host's CPU features and the disks before anything is created, maps the memory file,
    /// and puts every vCPU and device back where it was. The guest then runs on from there
    /// (or waits for [`VmHandle::resume`] when `restore.resume` is false).
    pub fn restore(restore: &RestoreConfig, start: Instant) -> Result<Self, Error> {
        let snapshot = read_state_file(&restore.state)?;
        let disks = check_disks(&snapshot.disks, &restore.disk_overrides)?;
        let mut config = snapshot.config.clone();
        apply_net_overrides(&mut config, &restore.net_overrides)?;
        apply_net_replacements(&mut config, &restore.net_replacements)?;
        config.console = restore.console.clone();
        config.disks = disks;
        if let Some(track) = restore.track_dirty_pages {
            config.track_dirty_pages = track;
        }
        if let Some(uds) = &restore.vsock_uds {
            let Some(vsock) = config.vsock.as_mut() else {
                return Err(SnapshotError::Device(
                    "vsock".into(),
                    format!(
                        "a socket path ('{}') was given for a vsock device the snapshot does not have",
                        uds.display()
                    ),
                )
                .into());
            };
            vsock.uds.clone_from(uds);
        }
        if snapshot.vcpus.len() != usize::from(config.cpus) {
            return Err(SnapshotError::Corrupt {
                path: restore.state.clone(),
                reason: format!(
                    "{} vCPU states for a VM of {} vCPUs",
                    snapshot.vcpus.len(),
                    config.cpus
                ),
            }
            .into());
        }
        let mut vm = Self::build(config, start, Some((&snapshot, restore.memory.as_path())))?;
        vm.start_paused = !restore.resume;
        Ok(vm)
    }

    fn build(
        config: VmConfig,
        start: Instant,
        snapshot: Option<(&VmSnapshot, &Path)>,
    ) -> Result<Self, Error> {
        let disks = DeviceManager::open_disks(&config.disks)?;
        let kvm = open_kvm(KVM_DEVICE)?;
        if usize::from(config.cpus) > kvm.max_vcpus {
            return Err(Error::TooManyCpus {
                asked: config.cpus,
                max: kvm.max_vcpus,
            });
        }
        if let Some((saved, _)) = snapshot {
            let host = host_cpuid(&kvm, config.cpus)?;
            for vcpu in &saved.vcpus {
                check_cpuid(&vcpu.cpuid, &host)?;
            }
        }
        let vm_fd = create_vm_fd(&kvm)?;

        let memory = match snapshot {
            None => create_guest_memory_backed(config.memory_bytes(), config.huge_pages)?,
            Some((saved, path)) => map_memory_layers(path, &saved.memory, &saved.memory_layers)?,
        };
        register_guest_memory(&vm_fd, &memory, config.track_dirty_pages)?;

        let event_loop = EventLoop::new().map_err(Error::EventLoop)?;
        let mut virtio = DeviceManager::new();
        let loop_handle = EventLoopHandle::new(event_loop.remote_endpoint());
        virtio.add_disks(&vm_fd, &memory, &loop_handle, disks)?;
        if let Some(vsock) = &config.vsock {
            virtio.add_vsock(&vm_fd, &memory, &loop_handle, vsock)?;
        }
        virtio.add_rng(&vm_fd, &memory, &loop_handle, &config.rng)?;
        virtio.add_nets(
            &vm_fd,
            &memory,
            &loop_handle,
            &config.nets,
            &config.net_macs(),
        )?;

        let entry = match snapshot {
            None => load_guest(&memory, &config, &virtio)?,
            // Every register comes from the snapshot.
            Some(_) => GuestAddress(0),
        };

        let exit = ExitNotifier::new().map_err(|e| Error::Io("create the exit eventfd", e))?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("create the serial interrupt eventfd", e))?;
        vm_fd
            .register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|e| Error::KvmIoctl("connect the serial interrupt", e))?;
        let serial_trigger = EventFdTrigger::new(
            serial_irq
                .try_clone()
                .map_err(|e| Error::Io("clone the serial interrupt eventfd", e))?,
        );
        let (console_writer, console) = console_output::open(&config.console)?;
        let serial_out: Box<dyn std::io::Write + Send> = Box::new(console_writer);
        let serial = match snapshot {
            None => SerialDevice::new(serial_trigger, serial_out),
            Some((saved, _)) => SerialDevice::restore(&saved.serial, serial_trigger, serial_out)
                .map_err(|err| SnapshotError::Device("serial port".into(), err.to_string()))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| Error::Io("create the i8042 keyboard interrupt eventfd", e))?;
        vm_fd
            .register_irqfd(&keyboard_irq, layout::I8042_KEYBOARD_IRQ)
            .map_err(|e| Error::KvmIoctl("connect the i8042 keyboard interrupt", e))?;
        let i8042 = match snapshot {
            None => I8042Device::new(exit.clone()),
            Some((saved, _)) => I8042Device::restore(&saved.i8042, exit.clone())
                .map_err(|err| SnapshotError::Device("i8042".into(), err.to_string()))?,
        };
        let i8042 = Arc::new(Mutex::new(
            i8042.with_keyboard_interrupt(EventFdTrigger::new(keyboard_irq)),
        ));
        let (io_bus, mmio_bus) = build_buses(&exit, &serial, i8042.clone(), start, &virtio)?;

        if let Some((saved, _)) = snapshot {
            restore_vm_state(&vm_fd, &saved.irqchip)?;
        }
        let exits = Arc::new(VcpuExitCounters::default());
        let mut vcpus = create_vcpus(
            &kvm, &vm_fd, &memory, &config, entry, io_bus, mmio_bus, &exit, &exits,
        )?;
        if let Some((saved, _)) = snapshot {
            for (index, (vcpu, state)) in vcpus.iter_mut().zip(&saved.vcpus).enumerate() {
                let tsc_written = state
                    .restore_timed(&vcpu.fd, &vcpu.cpuid)
                    .map_err(|source| {
                        Error::Vcpu(crate::vcpu::VcpuError::State {
                            id: vcpu.id,
                            source,
                        })
                    })?;
                vcpu.cpuid.clone_from(&state.cpuid);
                if index == 0 {
                    log::debug!("TSC restored to {:?}", state.tsc());
                    // From the first TSC write on (KVM gives the other vCPUs, written within a
                    // second with matching values, the same TSC offset).
                    restore_clock(&vm_fd, &saved.irqchip, tsc_written)?;
                }
            }
            virtio.restore_states(&saved.virtio)?;
            if let Some(vsock) = virtio.vsock() {
                // Connections do not survive a restore (their host sockets belonged to the old
                // process): the guest is told to reset its vsock sockets, as Firecracker does.
                vsock
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .device()
                    .reset_transport();
            }
        }
        let counters = Counters {
            vcpu: exits,
            disks: virtio.disk_stats(),
        };
        let (handle, requests) =
            VmHandle::new(counters).map_err(|e| Error::Io("create the control eventfds", e))?;

        Ok(Self {
            config,
            vcpus,
            vm_fd,
            kvm,
            memory,
            exit,
            devices: LegacyDevices { serial, i8042 },
            _serial_irq: serial_irq,
            event_loop,
            virtio,
            handle,
            requests,
            devices_paused: snapshot.is_some(),
            start_paused: false,
            console: Arc::new(Mutex::new(console)),
            memory_layers: snapshot
                .map(|(saved, path)| restored_layers(saved, path))
                .unwrap_or_default(),
            skip_teardown: false,
        })
    }

    /// For a process that exits as soon as [`Vm::run`] returns (the CLI): the KVM VM and the
    /// guest memory are left to the kernel's process teardown instead of being destroyed
    /// first, which saves the exit path about half a millisecond of CPU. They are leaked
    /// otherwise: never use this in a process that goes on.
    pub fn skip_teardown(&mut self) {
        self.skip_teardown = true;
    }

    /// A handle other threads use to control the VM (stop, pause, resume...) while
    /// [`Vm::run`] blocks.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The guest's memory (a new reference to the same mapping): embedders and tests read or
    /// write guest RAM through it with vm-memory's `Bytes` methods.
    pub fn guest_memory(&self) -> GuestMemory {
        self.memory.clone()
    }

    /// A handle another thread can use to stop this VM once [`Vm::run`] is under way (the
    /// same as [`Vm::handle`]).
    pub fn stop_handle(&self) -> VmHandle {
        self.handle()
    }

    /// Runs the VM on a new thread (`kiln-vmm`) and returns once its vCPUs run, so that its
    /// handle's requests are served from the first call on. [`RunningVm::wait`] gives the
    /// outcome.
    pub fn start(self) -> Result<RunningVm, Error> {
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name("kiln-vmm".into())
            .spawn(move || self.run())
            .map_err(|e| Error::Io("start the VMM thread", e))?;
        handle.wait_until_started();
        Ok(RunningVm { handle, thread })
    }

    /// Runs the guest on the calling thread until it powers off, resets, panics, or is stopped
    /// through its [`VmHandle`]. Serves the handle's requests (pause, resume...) meanwhile.
    ///
    /// The library installs no process-wide signal handlers apart from the vCPU kick (a
    /// handler for `SIGRTMIN` that keeps no VM state, shared by every VM of the process): an
    /// embedder or the CLI maps its own signals to [`VmHandle::stop`].
    pub fn run(self) -> Result<VmOutcome, Error> {
        let handle = self.handle();
        let result = self.run_to_end();
        handle.set_state(VmState::Ended);
        result
    }

    fn run_to_end(mut self) -> Result<VmOutcome, Error> {
        install_kick_handler().map_err(|e| Error::Io("install the vCPU kick handler", e))?;
        let mut event_loop = self.event_loop;
        let watcher = Arc::new(Mutex::new(StopWatcher::new(
            self.exit.eventfd(),
            self.handle.stop_eventfd(),
            self.handle.wake_eventfd(),
        )));
        event_loop.add_subscriber(watcher.clone());
        event_loop.add_subscriber(self.console.clone());

        let _raw_terminal = if self.config.console == ConsoleConfig::Stdio {
            let raw_terminal = RawTerminal::enable(libc::STDIN_FILENO).unwrap_or_else(|err| {
                log::warn!("cannot switch the terminal to raw mode: {err}");
                None
            });
            if raw_terminal.is_some() {
                log::info!("console: Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends Ctrl-A");
            }
            event_loop.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
                libc::STDIN_FILENO,
                self.devices.serial.clone(),
                raw_terminal.is_some(),
            ))));
            raw_terminal
        } else {
            None
        };

        // Running (or paused) from here on: requests are served once the loop below runs.
        let mut paused = self.start_paused;
        if self.devices_paused && !paused {
            self.virtio.resume_all();
        }
        self.handle.set_state(if paused {
            VmState::Paused
        } else {
            VmState::Running
        });
        let threads = VcpuThreads::spawn(std::mem::take(&mut self.vcpus), !paused)?;
        let mut controller = Controller {
            threads,
            virtio: &self.virtio,
            handle: &self.handle,
            vm_fd: &self.vm_fd,
            memory: &self.memory,
            serial: &self.devices.serial,
            i8042: &self.devices.i8042,
            config: &self.config,
            frozen_clock: None,
            frozen_tscs: None,
            layers: std::mem::take(&mut self.memory_layers),
        };
        if paused {
            controller.freeze_time();
        }
        let mut loop_result = Ok(());
        while loop_result.is_ok() {
            if watcher.lock().unwrap_or_else(|p| p.into_inner()).stopping() {
                break;
            }
            if let Err(err) = event_loop.run() {
                loop_result = Err(Error::EventLoop(err));
                break;
            }
            while let Ok((request, reply)) = self.requests.try_recv() {
                let answer = controller.serve(request, &mut paused);
                // The requester may have gone away; nothing to do then.
                let _ = reply.send(answer);
            }
        }
        self.handle.set_state(VmState::Ended);
        let vcpu_error = controller.threads.stop_all();
        // Bounded: a reader that stopped reading cannot hold the VM's end.
        self.console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish();
        loop_result?;

        let stopped = watcher.lock().unwrap_or_else(|p| p.into_inner()).stopping();
        let reason = self.exit.reason();
        if self.skip_teardown {
            // The process exits next: the kernel takes the VM and its memory down then,
            // without Kiln waiting for it first. Nothing runs the guest any more (the vCPU
            // threads are joined), and the disks' I/O threads still stop as usual.
            std::mem::forget(self.vm_fd);
            std::mem::forget(self.memory);
        }
        match reason {
            Some(StopReason::PowerOff) => Ok(VmOutcome::PowerOff),
            Some(StopReason::Reset) => Ok(VmOutcome::Reset),
            Some(StopReason::Panic) => Ok(VmOutcome::Panic),
            None if stopped => Ok(VmOutcome::Stopped),
            Some(StopReason::VcpuError) | None => {
                if self.kvm.is_pvm {
                    log::warn!(
                        "the guest failed on a PVM host; an ordinary Linux kernel is expected \
                         to fail here (see the PVM warning above)"
                    );
                }
                Err(vcpu_error
                    .map(Error::Vcpu)
                    .unwrap_or(Error::Internal("the VM stopped without a reason")))
            }
        }
    }
}

/// The chain a restored VM's next diff snapshot layers on: the snapshot's own, with its newest
/// file where it was restored from.
fn restored_layers(saved: &VmSnapshot, path: &Path) -> Vec<MemoryLayer> {
    let mut layers = saved.memory_layers.clone();
    if let Some(last) = layers.last_mut() {
        last.path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    }
    layers
}

/// The VM itself: TSS address, in-kernel irqchip (PICs, IOAPIC, LAPICs) and PIT.
fn create_vm_fd(kvm: &KvmHost) -> Result<VmFd, Error> {
    let vm_fd = kvm
        .kvm
        .create_vm()
        .map_err(|e| Error::KvmIoctl("create the VM", e))?;
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(|e| Error::KvmIoctl("set the TSS address", e))?;
    vm_fd
        .create_irq_chip()
        .map_err(|e| Error::KvmIoctl("create the in-kernel irqchip", e))?;
    let pit_config = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd
        .create_pit2(pit_config)
        .map_err(|e| Error::KvmIoctl("create the in-kernel PIT", e))?;
    Ok(vm_fd)
}

/// Loads kernel, initrd and command line and writes the boot tables; returns the entry point.
fn load_guest(
    memory: &GuestMemory,
    config: &VmConfig,
    virtio: &DeviceManager,
) -> Result<GuestAddress, Error> {
    let kernel = load_kernel(memory, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(memory, path, kernel.end)?),
        None => None,
    };
    // One announcement per device: the DSDT when the guest reads ACPI, the command line when
    // it does not (with both, the copy found second fails with "can't request region").
    let device_args = if config.acpi_off() {
        virtio.cmdline_args()
    } else {
        Vec::new()
    };
    let cmdline = config.kernel_cmdline(&device_args);
    let cmdline_size = load_cmdline(memory, &cmdline)?;
    log::debug!("kernel command line: {cmdline}");
    configure_platform(
        memory,
        config,
        &kernel,
        initrd,
        cmdline_size,
        virtio.acpi_devices(),
    )?;
    Ok(kernel.entry)
}

/// The CPUID a new vCPU gets on this host (KVM's supported set, adjusted as Kiln adjusts it).
fn host_cpuid(kvm: &KvmHost, cpus: u8) -> Result<kvm_bindings::CpuId, Error> {
    let mut cpuid = kvm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::KvmIoctl("read the supported CPUID", e))?;
    kiln_arch::cpuid::filter_cpuid(&mut cpuid, 0, cpus).map_err(arch("set up CPUID"))?;
    let tsc_deadline = kvm.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    kiln_arch::cpuid::set_tsc_deadline_timer(&mut cpuid, tsc_deadline)
        .map_err(arch("set up CPUID"))?;
    Ok(cpuid)
}

/// Puts the interrupt controllers and the PIT back as a snapshot saved them.
fn restore_vm_state(vm_fd: &VmFd, saved: &SavedIrqchip) -> Result<(), Error> {
    let kvm = |what| move |err| Error::from(SnapshotError::Kvm(what, err));
    for chip in [&saved.pic_master, &saved.pic_slave, &saved.ioapic] {
        vm_fd
            .set_irqchip(chip)
            .map_err(kvm("restore the interrupt controllers"))?;
    }
    vm_fd.set_pit2(&saved.pit).map_err(kvm("restore the PIT"))?;
    Ok(())
}

/// Puts kvmclock back as the snapshot saved it (no flags: no realtime catch-up), plus the time
/// since the guest TSC was written at `tsc_written`: the TSC runs on from its write, so both
/// clocks continue from the same instant of guest time (Linux's clocksource watchdog compares
/// them and marks the TSC unstable when they disagree by more than about half a millisecond).
fn restore_clock(
    vm_fd: &VmFd,
    saved: &SavedIrqchip,
    tsc_written: std::time::Instant,
) -> Result<(), Error> {
    let since_tsc = tsc_written.elapsed().as_nanos() as u64;
    log::debug!(
        "kvmclock restored to {} + {since_tsc} ns since the TSC write",
        saved.clock.clock
    );
    let clock = kvm_bindings::kvm_clock_data {
        clock: saved.clock.clock.wrapping_add(since_tsc),
        ..Default::default()
    };
    vm_fd
        .set_clock(&clock)
        .map_err(|err| Error::from(SnapshotError::Kvm("restore kvmclock", err)))
}

fn configure_platform(
    memory: &GuestMemory,
    config: &VmConfig,
    kernel: &LoadedKernel,
    initrd: Option<(GuestAddress, usize)>,
    cmdline_size: usize,
    virtio_mmio: Vec<(u64, u64, u32)>,
) -> Result<(), Error> {
    kiln_arch::mptable::setup_mptable(memory, config.cpus).map_err(arch("write the MP table"))?;
    let acpi = kiln_arch::acpi::AcpiConfig {
        num_cpus: config.cpus,
        legacy_devices: kiln_arch::acpi::LegacyDevices::default(),
        virtio_mmio,
    };
    let rsdp =
        kiln_arch::acpi::setup_acpi_tables(memory, acpi).map_err(arch("write the ACPI tables"))?;
    let boot = kiln_arch::boot_params::BootParamsConfig {
        cmdline_addr: GuestAddress(layout::CMDLINE_START),
        cmdline_size,
        initrd,
        setup_header: kernel.setup_header,
        rsdp_addr: Some(rsdp),
    };
    kiln_arch::boot_params::configure_boot_params(memory, boot)
        .map_err(arch("write boot_params"))?;
    Ok(())
}

fn build_buses(
    exit: &ExitNotifier,
    serial: &Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042Device>>,
    start: Instant,
    virtio: &DeviceManager,
) -> Result<(Arc<Bus>, Arc<Bus>), Error> {
    let mut io_bus = Bus::new();
    let bus_err = |what: &'static str| move |err| Error::Bus(what, err);
    io_bus
        .insert(serial.clone(), u64::from(layout::SERIAL_PORT_BASE), 8)
        .map_err(bus_err("serial port"))?;
    io_bus
        .insert(i8042, u64::from(layout::I8042_PORT_BASE), I8042_PORT_LEN)
        .map_err(bus_err("i8042"))?;
    io_bus
        .insert(
            Arc::new(Mutex::new(PvPanicDevice::new(exit.clone()))),
            u64::from(layout::PVPANIC_PORT),
            1,
        )
        .map_err(bus_err("pvpanic port"))?;
    io_bus
        .insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone()))),
            u64::from(layout::ACPI_PM_PORT),
            u64::from(layout::ACPI_PM_PORT_LEN),
        )
        .map_err(bus_err("ACPI PM registers"))?;
    let mut mmio_bus = Bus::new();
    mmio_bus
        .insert(
            Arc::new(Mutex::new(BootTimer::new(start))),
            layout::BOOT_TIMER_START,
            layout::BOOT_TIMER_SIZE,
        )
        .map_err(bus_err("boot timer"))?;
    virtio.attach(&mut mmio_bus)?;
    Ok((Arc::new(io_bus), Arc::new(mmio_bus)))
}

/// Turns an arch-crate error into Kiln's, saying what was being done.
fn arch<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> Error {
    move |err| Error::Arch(what, err.to_string())
}

#[allow(clippy::too_many_arguments)]
fn create_vcpus(
    kvm: &KvmHost,
    vm_fd: &VmFd,
    memory: &GuestMemory,
    config: &VmConfig,
    entry: GuestAddress,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: &ExitNotifier,
    exits: &Arc<VcpuExitCounters>,
) -> Result<Vec<Vcpu>, Error> {
    let supported_cpuid = kvm
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::KvmIoctl("read the supported CPUID", e))?;
    // Hardware-reduced ACPI means no PIT/PIC for Linux: the LAPIC timer in TSC-deadline mode is
    // what keeps time, and older KVMs only advertise it through the capability.
    let tsc_deadline = kvm.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let msr_indices = Arc::new(
        kvm.kvm
            .get_msr_index_list()
            .map_err(|e| Error::KvmIoctl("read the list of saveable MSRs", e))?
            .as_slice()
            .to_vec(),
    );
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::KvmIoctl("create a vCPU", e))?;
        let mut cpuid = supported_cpuid.clone();
        kiln_arch::cpuid::filter_cpuid(&mut cpuid, id, config.cpus)
            .map_err(arch("set up CPUID"))?;
        kiln_arch::cpuid::set_tsc_deadline_timer(&mut cpuid, tsc_deadline)
            .map_err(arch("set up CPUID"))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| Error::KvmIoctl("set the vCPU's CPUID", e))?;
        kiln_arch::msr::setup_msrs(&fd).map_err(arch("set the boot MSRs"))?;
        kiln_arch::regs::setup_regs(&fd, entry).map_err(arch("set the registers"))?;
        kiln_arch::regs::setup_fpu(&fd).map_err(arch("set up the FPU"))?;
        kiln_arch::regs::setup_sregs(memory, &fd).map_err(arch("set the special registers"))?;
        kiln_arch::interrupts::set_lint(&fd).map_err(arch("set up the local APIC"))?;
        vcpus.push(Vcpu {
            id,
            fd,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            memory: memory.clone(),
            msr_indices: msr_indices.clone(),
            cpuid: cpuid.as_slice().to_vec(),
            warnings: LogLimiter::new(),
            exits: exits.clone(),
        });
    }
    Ok(vcpus)
}
