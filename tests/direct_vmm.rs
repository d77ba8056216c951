//! The VMM alone on direct /dev/kvm: Kiln runs the micro test guests from `tests/guests`.
//!
//! No Linux kernel and no virtual KVM host is involved, so these run everywhere /dev/kvm does,
//! PVM hosts included. Without a usable /dev/kvm they fail with a clear message rather than
//! skip silently. The guests come from the `kiln-test-guests` crate (assembled from
//! `tests/guests/asm` by its build script).
//!
//! Guest protocol (see tests/guests/asm/guest.S): `hello` prints KILN-GUEST-HELLO, the loop
//! guests print "KILN-GUEST-DONE n=<n> m=<m>" when done, every guest ends with an i8042 reset
//! (Kiln: exit status 0), and an unexpected exception prints KILN-GUEST-FAULT and writes the
//! pvpanic port (Kiln: exit status 3).

use std::process::Command;
use std::time::Duration;

use kiln_test_guests::process::{run_with_timeout, Finished};
use kiln_test_guests::{
    parse_done, Done, GuestKind, FAULT_MARKER, HELLO_MARKER, REP_INS_OK_MARKER, REP_OUTS_MARKER,
};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// Generous for a 2-core machine running other tests; a hang still fails.
const DEADLINE: Duration = Duration::from_secs(60);
/// What "exits quickly" means for the `exit` guest (it takes ~40 ms on PVM).
const QUICK_EXIT: Duration = Duration::from_secs(5);
/// Kiln's exit status when the guest reports a panic.
const GUEST_PANIC_STATUS: i32 = 3;

fn require_kvm() {
    if let Err(err) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!(
            "/dev/kvm is not usable ({err}): these tests run Kiln directly on KVM; \
             run them on a host with KVM (VT-x, AMD-V or PVM) and access to /dev/kvm"
        );
    }
}

/// Runs `kiln run` with the guest's console on stdout.
fn kiln(guest: GuestKind, cmdline: &str, cpus: u32, memory: &str) -> Finished {
    require_kvm();
    let mut command = Command::new(KILN);
    command
        .arg("run")
        .arg("--kernel")
        .arg(guest.path())
        .args(["--cmdline", cmdline])
        .args(["--cpus", &cpus.to_string()])
        .args(["--memory", memory])
        .args(["--console", "stdio"]);
    run_with_timeout(&mut command, DEADLINE)
        .unwrap_or_else(|err| panic!("cannot run {KILN}: {err}"))
}

fn assert_clean_exit(finished: &Finished, what: &str) {
    assert!(
        finished.succeeded(),
        "{what}: kiln did not exit with status 0: {}",
        finished.describe()
    );
    assert!(
        !finished.stdout.contains(FAULT_MARKER),
        "{what}: the guest faulted: {}",
        finished.describe()
    );
}

/// The `(n, m)` of the guest's done line.
fn done_line(finished: &Finished) -> Option<(u64, u64)> {
    parse_done(&finished.stdout).map(|Done { n, m }| (n, m))
}

#[test]
fn hello_prints_through_stdout_with_one_vcpu() {
    let finished = kiln(GuestKind::Hello, "", 1, "128M");
    assert_clean_exit(&finished, "hello, 1 vCPU");
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "{}",
        finished.describe()
    );
}

#[test]
fn hello_prints_through_stdout_with_four_vcpus() {
    let finished = kiln(GuestKind::Hello, "", 4, "128M");
    assert_clean_exit(&finished, "hello, 4 vCPUs");
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "{}",
        finished.describe()
    );
}

#[test]
fn exit_guest_ends_kiln_quickly_with_status_0() {
    let finished = kiln(GuestKind::Exit, "", 1, "128M");
    assert_clean_exit(&finished, "exit");
    assert!(
        finished.stdout.trim().is_empty(),
        "the exit guest prints nothing: {}",
        finished.describe()
    );
    assert!(
        finished.elapsed < QUICK_EXIT,
        "kiln took {:.3} s for a guest that resets at once",
        finished.elapsed.as_secs_f64()
    );
}

#[test]
fn ignored_port_writes_never_crash() {
    let finished = kiln(GuestKind::PioLoop, "n=1000", 1, "128M");
    assert_clean_exit(&finished, "pio-loop");
    assert_eq!(
        done_line(&finished),
        Some((1000, 16)),
        "{}",
        finished.describe()
    );
}

#[test]
fn unknown_ports_are_ignored_too() {
    // Another port no device decodes, written 100 times.
    let finished = kiln(GuestKind::PioLoop, "n=100 port=0x87", 1, "128M");
    assert_clean_exit(&finished, "pio-loop port 0x87");
    assert_eq!(
        done_line(&finished),
        Some((100, 16)),
        "{}",
        finished.describe()
    );
}

#[test]
fn ignored_mmio_reads_never_crash() {
    let finished = kiln(GuestKind::MmioLoop, "n=1000", 1, "128M");
    assert_clean_exit(&finished, "mmio-loop");
    assert_eq!(
        done_line(&finished),
        Some((1000, 16)),
        "{}",
        finished.describe()
    );
}

#[test]
fn touching_nearly_all_guest_memory_works() {
    // The guest writes from 2 MiB up: 2 + 120 MiB of the 128 MiB guest.
    let finished = kiln(GuestKind::Touch, "m=120", 1, "128M");
    assert_clean_exit(&finished, "touch");
    assert_eq!(
        done_line(&finished),
        Some((1000, 120)),
        "{}",
        finished.describe()
    );
}

#[test]
fn a_guest_fault_ends_as_a_guest_panic() {
    // Nothing is mapped above 4 GiB in the guest's tables: the ring-3 read page-faults, the
    // guest reports it and writes the pvpanic port.
    let finished = kiln(GuestKind::MmioLoop, "n=1 addr=0x100000000", 1, "128M");
    assert!(
        finished.stdout.contains(FAULT_MARKER),
        "{}",
        finished.describe()
    );
    assert_eq!(
        finished.code(),
        Some(GUEST_PANIC_STATUS),
        "a guest panic must give status {GUEST_PANIC_STATUS}: {}",
        finished.describe()
    );
}

#[test]
fn string_port_io_is_one_access_per_element() {
    // `rep outsb` / `rep insb` reach Kiln as one exit with a count: each element is its own
    // access to the same port (not one wide access spread over the next ports).
    let finished = kiln(GuestKind::RepIo, "", 1, "128M");
    assert_clean_exit(&finished, "rep-io");
    assert!(
        finished
            .stdout
            .lines()
            .any(|line| line.trim_end() == REP_OUTS_MARKER),
        "the rep outsb line did not arrive whole: {}",
        finished.describe()
    );
    assert!(
        finished.stdout.contains(REP_INS_OK_MARKER),
        "rep insb did not read the line status register each time: {}",
        finished.describe()
    );
}
