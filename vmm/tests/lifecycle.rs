//! The library's promise to embedders: a VM built and run in-process ends cleanly and leaves
//! nothing behind — no file descriptors, no threads — however many times it is done.
//!
//! Runs on direct /dev/kvm with a micro test guest (no Linux kernel), so it runs on PVM hosts
//! too. Without /dev/kvm it fails with the reason; it never skips.

use std::time::Instant;

use kiln_test_guests::GuestKind;
use kiln_vmm::{ConsoleConfig, Vm, VmConfig, VmOutcome};

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("cannot list {dir}: {err}"))
        .count()
}

fn run_hello(cpus: u8) -> VmOutcome {
    let mut config = VmConfig::new(GuestKind::Hello.path());
    config.memory_mib = 64;
    config.cpus = cpus;
    config.console = ConsoleConfig::None;
    Vm::new(config, Instant::now())
        .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"))
        .run()
        .unwrap_or_else(|err| panic!("the VM failed: {err}"))
}

#[test]
fn repeated_runs_leak_no_fds_or_threads() {
    // The first run installs process-wide signal handlers; count after it.
    assert_eq!(run_hello(2), VmOutcome::Reset);
    let fds = count_entries("/proc/self/fd");
    let threads = count_entries("/proc/self/task");
    for round in 0..10 {
        let cpus = if round % 2 == 0 { 1 } else { 4 };
        assert_eq!(run_hello(cpus), VmOutcome::Reset, "round {round}");
    }
    assert_eq!(
        count_entries("/proc/self/fd"),
        fds,
        "file descriptors leaked"
    );
    assert_eq!(
        count_entries("/proc/self/task"),
        threads,
        "threads left running"
    );
}
