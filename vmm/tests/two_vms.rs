//! Two VMs in one process run and stop independently: the library keeps no per-process VM
//! state (no global signal eventfd, no shared stop flag), so stopping or pausing one leaves
//! the other running. Direct /dev/kvm, `count` micro guest; fails with the reason without KVM.

use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params, COUNT_ADDR};
use kiln_vmm::memory::GuestMemory;
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::{ConsoleConfig, RunningVm, Vm, VmConfig, VmOutcome, VmState};

fn start() -> (RunningVm, GuestMemory) {
    let mut config = VmConfig::new(GuestKind::Count.path());
    config.memory_mib = 64;
    config.console = ConsoleConfig::None;
    config.cmdline = Some(Params::with_n(1 << 60).cmdline());
    let vm = Vm::new(config, Instant::now())
        .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"));
    let memory = vm.guest_memory();
    (vm.start().expect("start"), memory)
}

fn count(memory: &GuestMemory) -> u64 {
    memory
        .read_obj(GuestAddress(COUNT_ADDR))
        .expect("counter in guest memory")
}

/// Waits until the guest's counter moves past `from`.
fn advances(memory: &GuestMemory, from: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if count(memory) > from {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn two_vms_in_one_process_are_independent() {
    let (first, first_memory) = start();
    let (second, second_memory) = start();
    assert!(advances(&first_memory, 0) && advances(&second_memory, 0));

    // Pausing one does not pause the other.
    first.handle().pause().expect("pause the first");
    let frozen = count(&first_memory);
    assert!(advances(&second_memory, count(&second_memory)));
    assert_eq!(count(&first_memory), frozen);
    assert_eq!(second.handle().state(), VmState::Running);

    // Stopping the second leaves the first alive; it resumes and counts on.
    second.handle().stop();
    assert_eq!(second.wait().expect("second run"), VmOutcome::Stopped);
    first.handle().resume().expect("resume the first");
    assert!(advances(&first_memory, frozen), "the first VM stopped too");
    assert!(!first.is_finished());
    first.handle().stop();
    assert_eq!(first.wait().expect("first run"), VmOutcome::Stopped);
}
