//! Every test guest boots under QEMU TCG, through both entries, and does what it says.
//!
//! `Entry::Pvh` is QEMU's own PVH boot of the guest ELF; `Entry::Direct` goes through the
//! direct-entry shim, which recreates Kiln's 64-bit boot state (zero page, GDT, identity
//! tables at 0x9000) and jumps to `e_entry`. These run without /dev/kvm, so they prove the
//! guests before (and independently of) Kiln. QEMU must be installed: its absence fails.

use std::time::Duration;

use kiln_test_guests::process::{run_with_timeout, Finished};
use kiln_test_guests::qemu::{Entry, QemuRun, QEMU};
use kiln_test_guests::{
    flood_line, parse_counts, parse_done, Done, GuestKind, Params, FAULT_MARKER, HELLO_MARKER,
    REP_INS_OK_MARKER, REP_OUTS_MARKER,
};

const MEMORY_MIB: u64 = 128;
/// TCG boots these in well under a second; the margin covers a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(120);

fn run(machine: &str, entry: Entry, kind: GuestKind, params: Params) -> Finished {
    let cmdline = params.cmdline();
    let run = QemuRun {
        machine,
        accel: "tcg",
        guest: kind.path(),
        entry,
        memory_mib: MEMORY_MIB,
        cmdline: &cmdline,
    };
    let finished = run_with_timeout(&mut run.command(), DEADLINE).unwrap_or_else(|err| {
        panic!("cannot run {QEMU} (install qemu-system-x86 to run these tests): {err}")
    });
    assert!(
        finished.succeeded(),
        "{kind} on {machine} ({entry:?}) did not exit cleanly: {}",
        finished.describe()
    );
    assert!(
        !finished.stdout.contains(FAULT_MARKER),
        "{kind} on {machine} ({entry:?}) faulted: {}",
        finished.describe()
    );
    finished
}

fn assert_done(finished: &Finished, kind: GuestKind, expected: Done) {
    assert_eq!(
        parse_done(&finished.stdout),
        Some(expected),
        "{kind}: missing or wrong done line: {}",
        finished.describe()
    );
}

fn exit_ends_at_once(machine: &str, entry: Entry) {
    let finished = run(machine, entry, GuestKind::Exit, Params::default());
    assert!(
        finished.stdout.trim().is_empty(),
        "exit printed something: {}",
        finished.describe()
    );
}

fn hello_prints_its_marker(machine: &str, entry: Entry) {
    let finished = run(machine, entry, GuestKind::Hello, Params::default());
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "no hello marker: {}",
        finished.describe()
    );
}

fn loops_take_n_from_the_cmdline(entry: Entry) {
    for kind in [GuestKind::PioLoop, GuestKind::MmioLoop] {
        let finished = run("microvm", entry, kind, Params::with_n(1234));
        assert_done(&finished, kind, Done { n: 1234, m: 16 });
    }
}

fn touch_covers_most_of_memory(entry: Entry) {
    // 2 MiB below the touched range plus 100 MiB: close to the 128 MiB the VM has.
    let finished = run("microvm", entry, GuestKind::Touch, Params::with_m(100));
    assert_done(&finished, GuestKind::Touch, Done { n: 1000, m: 100 });
}

#[test]
fn exit_pvh_microvm() {
    exit_ends_at_once("microvm", Entry::Pvh);
}

#[test]
fn exit_direct_microvm() {
    exit_ends_at_once("microvm", Entry::Direct);
}

#[test]
fn exit_pvh_q35() {
    exit_ends_at_once("q35", Entry::Pvh);
}

#[test]
fn hello_pvh_microvm() {
    hello_prints_its_marker("microvm", Entry::Pvh);
}

#[test]
fn hello_direct_microvm() {
    hello_prints_its_marker("microvm", Entry::Direct);
}

#[test]
fn hello_pvh_q35() {
    hello_prints_its_marker("q35", Entry::Pvh);
}

#[test]
fn loops_pvh_microvm() {
    loops_take_n_from_the_cmdline(Entry::Pvh);
}

#[test]
fn loops_direct_microvm() {
    loops_take_n_from_the_cmdline(Entry::Direct);
}

#[test]
fn touch_pvh_microvm() {
    touch_covers_most_of_memory(Entry::Pvh);
}

#[test]
fn touch_direct_microvm() {
    touch_covers_most_of_memory(Entry::Direct);
}

#[test]
fn flood_prints_n_numbered_lines_in_order() {
    for entry in [Entry::Pvh, Entry::Direct] {
        let finished = run("microvm", entry, GuestKind::Flood, Params::with_n(300));
        let lines: String = (1..=300).map(flood_line).collect();
        assert!(
            finished.stdout.contains(&lines),
            "flood ({entry:?}) did not print lines 1..=300 in order: {}",
            finished.describe()
        );
        assert!(!finished.stdout.contains(&flood_line(301)));
        assert_done(&finished, GuestKind::Flood, Done { n: 300, m: 16 });
    }
}

#[test]
fn defaults_apply_without_a_cmdline() {
    let finished = run(
        "microvm",
        Entry::Direct,
        GuestKind::PioLoop,
        Params::default(),
    );
    assert_done(&finished, GuestKind::PioLoop, Done { n: 1000, m: 16 });
}

#[test]
fn port_and_address_parameters_are_honoured() {
    // Hex and decimal both parse; another unused port and another unused MMIO page.
    let params = Params {
        n: Some(0x10),
        port: Some(0x87),
        mmio_addr: Some(0xd020_0000),
        ..Params::default()
    };
    for kind in [GuestKind::PioLoop, GuestKind::MmioLoop] {
        let finished = run("microvm", Entry::Pvh, kind, params);
        assert_done(&finished, kind, Done { n: 16, m: 16 });
    }
}

#[test]
fn a_fault_in_ring_3_is_reported() {
    // Above 4 GiB the guest maps nothing: a user-mode read page-faults (vector 14, error 4).
    let cmdline = Params {
        n: Some(1),
        mmio_addr: Some(1 << 32),
        ..Params::default()
    }
    .cmdline();
    let run = QemuRun {
        machine: "microvm",
        accel: "tcg",
        guest: GuestKind::MmioLoop.path(),
        entry: Entry::Direct,
        memory_mib: MEMORY_MIB,
        cmdline: &cmdline,
    };
    let finished = run_with_timeout(&mut run.command(), DEADLINE)
        .unwrap_or_else(|err| panic!("cannot run {QEMU}: {err}"));
    assert!(finished.succeeded(), "{}", finished.describe());
    assert!(
        finished
            .stdout
            .contains("KILN-GUEST-FAULT vector=0x000000000000000e error=0x0000000000000004 rip=0x"),
        "{}",
        finished.describe()
    );
    assert_eq!(parse_done(&finished.stdout), None);
}

#[test]
fn hold_keeps_the_vm_running_after_its_work() {
    let params = Params {
        hold: true,
        ..Params::default()
    };
    let cmdline = params.cmdline();
    let run = QemuRun {
        machine: "microvm",
        accel: "tcg",
        guest: GuestKind::Hello.path(),
        entry: Entry::Pvh,
        memory_mib: MEMORY_MIB,
        cmdline: &cmdline,
    };
    // TCG prints the marker within a fraction of a second; the VM must still be up after 5 s.
    let finished = run_with_timeout(&mut run.command(), Duration::from_secs(5))
        .unwrap_or_else(|err| panic!("cannot run {QEMU}: {err}"));
    assert!(
        finished.status.is_none(),
        "the VM ended: {}",
        finished.describe()
    );
    assert!(
        finished.stdout.contains(HELLO_MARKER),
        "{}",
        finished.describe()
    );
}

#[test]
fn count_counts_to_n_under_both_entries() {
    for entry in [Entry::Pvh, Entry::Direct] {
        let params = Params {
            n: Some(100_000),
            report: Some(15),
            ..Params::default()
        };
        let finished = run("microvm", entry, GuestKind::Count, params);
        assert_done(&finished, GuestKind::Count, Done { n: 100_000, m: 16 });
        // Every 2^15 steps: 32768, 65536, 98304.
        assert_eq!(
            parse_counts(&finished.stdout),
            vec![32768, 65536, 98304],
            "{}",
            finished.describe()
        );
    }
}

#[test]
fn rep_io_prints_both_markers() {
    for entry in [Entry::Pvh, Entry::Direct] {
        let finished = run("microvm", entry, GuestKind::RepIo, Params::default());
        assert!(
            finished.stdout.contains(REP_OUTS_MARKER)
                && finished.stdout.contains(REP_INS_OK_MARKER),
            "rep-io ({entry:?}): {}",
            finished.describe()
        );
    }
}
