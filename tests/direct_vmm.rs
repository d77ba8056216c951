//! The VMM alone on direct /dev/kvm: Kiln runs the micro test guests from `tests/guests`.
//!
//! No Linux kernel and no virtual KVM host is involved, so these run everywhere /dev/kvm does,
//! PVM hosts included. Without a usable /dev/kvm they fail with a clear message rather than
//! skip silently. The guests are assembled here from `tests/guests/asm` (the root package
//! does not depend on `kiln-test-guests`; its std-only builder is shared by `#[path]`).
//!
//! Guest protocol (see tests/guests/asm/guest.S): `hello` prints KILN-GUEST-HELLO, the loop
//! guests print "KILN-GUEST-DONE n=<n> m=<m>" when done, every guest ends with an i8042 reset
//! (Kiln: exit status 0), and an unexpected exception prints KILN-GUEST-FAULT and writes the
//! pvpanic port (Kiln: exit status 3).

#[allow(dead_code)]
#[path = "guests/src/assemble.rs"]
mod assemble;
#[allow(dead_code)]
#[path = "guests/src/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use process::{run_with_timeout, Finished};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const HELLO_MARKER: &str = "KILN-GUEST-HELLO";
const DONE_MARKER: &str = "KILN-GUEST-DONE";
const FAULT_MARKER: &str = "KILN-GUEST-FAULT";
/// Generous for a 2-core machine running other tests; a hang still fails.
const DEADLINE: Duration = Duration::from_secs(60);
/// What "exits quickly" means for the `exit` guest (it takes ~40 ms on PVM).
const QUICK_EXIT: Duration = Duration::from_secs(5);
/// Kiln's exit status when the guest reports a panic.
const GUEST_PANIC_STATUS: i32 = 3;

/// The directory holding the assembled guests, built once per test process.
fn guest_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = DIR.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-test-guests");
        assemble::assemble_all(&manifest.join("tests/guests/asm"), &out)
            .map(|_| out)
            .map_err(|err| err.to_string())
    });
    match built {
        Ok(dir) => dir,
        Err(err) => panic!("cannot build the test guests: {err}"),
    }
}

fn guest(name: &str) -> PathBuf {
    guest_dir().join(format!("{name}.elf"))
}

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
fn kiln(guest_name: &str, cmdline: &str, cpus: u32, memory: &str) -> Finished {
    require_kvm();
    let mut command = Command::new(KILN);
    command
        .arg("run")
        .arg("--kernel")
        .arg(guest(guest_name))
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
    let line = finished
        .stdout
        .lines()
        .find_map(|line| line.trim_end().strip_prefix(DONE_MARKER))?;
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(key))
            .and_then(|value| value.parse().ok())
    };
    Some((field("n=")?, field("m=")?))
}

#[test]
fn hello_prints_through_stdout_with_one_vcpu() {
    let finished = kiln("hello", "", 1, "128M");
    assert_clean_exit(&finished, "hello, 1 vCPU");
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "{}",
        finished.describe()
    );
}

#[test]
fn hello_prints_through_stdout_with_four_vcpus() {
    let finished = kiln("hello", "", 4, "128M");
    assert_clean_exit(&finished, "hello, 4 vCPUs");
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "{}",
        finished.describe()
    );
}

#[test]
fn exit_guest_ends_kiln_quickly_with_status_0() {
    let finished = kiln("exit", "", 1, "128M");
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
    let finished = kiln("pio-loop", "n=1000", 1, "128M");
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
    let finished = kiln("pio-loop", "n=100 port=0x87", 1, "128M");
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
    let finished = kiln("mmio-loop", "n=1000", 1, "128M");
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
    let finished = kiln("touch", "m=120", 1, "128M");
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
    let finished = kiln("mmio-loop", "n=1 addr=0x100000000", 1, "128M");
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
