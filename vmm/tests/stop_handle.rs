//! An embedder stops a running VM from another thread with its `StopHandle`.
//!
//! Its own test binary: `lifecycle.rs` counts the process's fds and threads, which a second
//! VM running at the same time would disturb. Direct /dev/kvm, micro test guest (PVM hosts too).

use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params};
use kiln_vmm::{ConsoleConfig, Vm, VmConfig, VmOutcome};

#[test]
fn a_stop_handle_ends_a_running_guest_from_another_thread() {
    let mut config = VmConfig::new(GuestKind::Hello.path());
    config.memory_mib = 64;
    config.cpus = 2;
    config.console = ConsoleConfig::None;
    // `hold=1`: the guest never ends by itself.
    config.cmdline = Some(
        Params {
            hold: true,
            ..Default::default()
        }
        .cmdline(),
    );
    let vm = Vm::new(config, Instant::now())
        .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"));
    let handle = vm.stop_handle();
    let runner = std::thread::spawn(move || vm.run());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!runner.is_finished(), "the held guest ended by itself");
    let asked = Instant::now();
    handle.stop();
    let outcome = runner.join().expect("run thread").expect("run");
    assert_eq!(outcome, VmOutcome::Stopped);
    assert!(asked.elapsed() < Duration::from_secs(5));
    handle.stop(); // after the end: a no-op, not a panic
}
