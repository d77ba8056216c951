//! Controlling a running VM through its `VmHandle`: pause, resume, stop, vCPU state.
//!
//! Direct /dev/kvm with the `count` micro guest (PVM hosts too): it counts in the u64 at
//! `COUNT_ADDR` from ring 3 and checks after every step that memory and its register agree, so
//! a pause, resume or state restore that loses or corrupts either makes it fault (FAULT marker
//! on the console, pvpanic: the VM ends as a panic). Without /dev/kvm these fail with the
//! reason. The tests run one at a time: the stop-latency bound must not measure the others.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params, COUNT_ADDR, FAULT_MARKER};
use kiln_vmm::config::DiskConfig;
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::{
    ConsoleConfig, ControlError, RunningVm, Vm, VmConfig, VmHandle, VmOutcome, VmState,
};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Counts far beyond what any test waits for.
const FOREVER: u64 = 1 << 60;

struct Running {
    handle: VmHandle,
    memory: kiln_vmm::memory::GuestMemory,
    runner: RunningVm,
    console: PathBuf,
}

impl Running {
    fn start(cpus: u8, name: &str) -> Self {
        Self::start_with_disk(cpus, name, None)
    }

    fn start_with_disk(cpus: u8, name: &str, disk: Option<PathBuf>) -> Self {
        let console =
            std::env::temp_dir().join(format!("kiln-control-{name}-{}.log", std::process::id()));
        let mut config = VmConfig::new(GuestKind::Count.path());
        config.memory_mib = 64;
        config.cpus = cpus;
        config.console = ConsoleConfig::File(console.clone());
        config.cmdline = Some(Params::with_n(FOREVER).cmdline());
        config.disks = disk.into_iter().map(DiskConfig::new).collect();
        let vm = Vm::new(config, Instant::now())
            .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"));
        let handle = vm.handle();
        let memory = vm.guest_memory();
        assert_eq!(handle.state(), VmState::NotStarted);
        assert!(matches!(
            handle.pause(),
            Err(ControlError::NotRunning(VmState::NotStarted))
        ));
        let runner = vm.start().expect("start the VM");
        assert_eq!(handle.state(), VmState::Running);
        let running = Self {
            handle,
            memory,
            runner,
            console,
        };
        running.wait_for_count(1);
        running
    }

    fn count(&self) -> u64 {
        self.memory
            .read_obj::<u64>(GuestAddress(COUNT_ADDR))
            .expect("the counter is in guest memory")
    }

    /// Waits until the guest counted past `at_least` (it has started, or moved on).
    fn wait_for_count(&self, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let count = self.count();
            if count >= at_least {
                return count;
            }
            assert!(
                !self.runner.is_finished(),
                "the guest ended early; console: {}",
                self.console_text()
            );
            assert!(
                Instant::now() < deadline,
                "the guest did not count to {at_least} (at {count})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Stops the VM and checks that it ended because of the stop, without a guest fault.
    fn stop(self) -> Duration {
        let asked = Instant::now();
        self.handle.stop();
        let outcome = self.runner.wait().expect("run");
        let took = asked.elapsed();
        let console = std::fs::read_to_string(&self.console).unwrap_or_default();
        let _ = std::fs::remove_file(&self.console);
        assert!(
            !console.contains(FAULT_MARKER),
            "the guest faulted: {console}"
        );
        assert_eq!(outcome, VmOutcome::Stopped);
        assert_eq!(self.handle.state(), VmState::Ended);
        assert!(matches!(
            self.handle.resume(),
            Err(ControlError::NotRunning(VmState::Ended))
        ));
        self.handle.stop(); // after the end: a no-op
        took
    }
}

#[test]
fn a_paused_guest_stops_counting_and_resumes_where_it_was() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Running::start(1, "pause");
    let before = vm.wait_for_count(1_000);
    vm.handle.pause().expect("pause");
    assert_eq!(vm.handle.state(), VmState::Paused);
    let paused_at = vm.count();
    assert!(paused_at >= before);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.count(), paused_at, "the counter moved while paused");
    vm.handle.pause().expect("pausing a paused VM is a no-op");

    vm.handle.resume().expect("resume");
    assert_eq!(vm.handle.state(), VmState::Running);
    // It continues from where it was: the guest's own check faults if memory and register
    // disagree, and the counter only ever grows.
    let resumed = vm.wait_for_count(paused_at + 1_000);
    assert!(resumed > paused_at);
    vm.handle
        .resume()
        .expect("resuming a running VM is a no-op");
    vm.stop();
}

#[test]
fn a_thousand_pauses_with_four_vcpus_leave_the_guest_consistent() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Running::start(4, "cycles");
    let mut last = vm.count();
    for cycle in 0..1000 {
        vm.handle
            .pause()
            .unwrap_or_else(|err| panic!("pause {cycle}: {err}"));
        let paused = vm.count();
        assert!(paused >= last, "cycle {cycle}: the counter went back");
        last = paused;
        vm.handle
            .resume()
            .unwrap_or_else(|err| panic!("resume {cycle}: {err}"));
    }
    // Still alive and counting, and no fault on the console (checked by stop()).
    vm.wait_for_count(last + 1_000);
    vm.stop();
}

/// One kick must be enough: a vCPU spinning in the guest never leaves KVM_RUN on its own, so a
/// kick lost before KVM_RUN (no `immediate_exit`) would hang this stop. How fast a stop is, is
/// the benchmarks' business (start/stop cycles in docs/benchmarks.md); the bound here only
/// separates "one kick" from "hung", with room for a loaded machine.
#[test]
fn stopping_a_spinning_guest_needs_one_kick() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Running::start(2, "stop");
    vm.wait_for_count(1_000_000);
    let took = vm.stop();
    assert!(took < Duration::from_secs(2), "stop took {took:?}");
}

#[test]
fn restored_vcpu_state_takes_the_guest_back() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let vm = Running::start(2, "state");
    let refused = vm.handle.save_vcpu_states();
    assert!(
        matches!(refused, Err(ControlError::NotPaused)),
        "{refused:?}"
    );
    vm.wait_for_count(1_000);
    vm.handle.pause().expect("pause");
    let saved = vm.handle.save_vcpu_states().expect("save");
    assert_eq!(saved.len(), 2);
    let saved_count = vm.count();

    vm.handle.resume().expect("resume");
    let later = vm.wait_for_count(saved_count + 1_000_000);
    vm.handle.pause().expect("pause again");

    // Back to the saved point: registers from the saved state, the counter from memory as it
    // was then. Were the registers not restored, the guest's check would fault at once.
    assert!(matches!(
        vm.handle.restore_vcpu_states(Vec::new()),
        Err(ControlError::VcpuCount {
            expected: 2,
            given: 0
        })
    ));
    vm.handle.restore_vcpu_states(saved).expect("restore");
    vm.memory
        .write_obj(saved_count, GuestAddress(COUNT_ADDR))
        .expect("write the counter");
    assert!(vm.count() < later);
    vm.handle.resume().expect("resume after restore");
    vm.wait_for_count(saved_count + 1_000);
    vm.stop();
}

#[test]
fn device_states_are_reachable_and_paused_with_the_vm() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let image = std::env::temp_dir().join(format!("kiln-control-disk-{}.img", std::process::id()));
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("write a disk image");
    let vm = Running::start_with_disk(1, "devices", Some(image.clone()));
    let states = vm.handle.device_states().expect("states");
    // The disk, then the entropy device every VM has unless it is turned off.
    assert_eq!(states.len(), 2, "{states:?}");
    assert_eq!(states[1].1.device_type, 4, "the rng: {states:?}");
    let (what, state) = &states[0];
    assert!(what.contains("vda"), "{what}");
    assert_eq!(state.device_type, 2, "a block device");
    // The micro guest has no virtio driver: the device was never activated.
    assert!(!state.active && !state.paused);
    vm.handle.pause().expect("pause");
    let paused = vm.handle.device_states().expect("states");
    assert!(paused[0].1.paused, "{paused:?}");
    vm.handle.resume().expect("resume");
    assert!(!vm.handle.device_states().expect("states")[0].1.paused);
    vm.stop();
    let _ = std::fs::remove_file(&image);
}
