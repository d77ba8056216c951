//! Snapshots of the VMM alone, on direct /dev/kvm with the `count` micro guest (PVM hosts too;
//! without /dev/kvm these fail with the reason).
//!
//! The guest counts in memory and checks after every step that memory and its register agree,
//! so a restore that brings back one without the other makes it fault (FAULT marker, pvpanic).
//! Snapshots are taken through the library; restores happen through the library (to read the
//! counter) and through `kiln restore` in a new process (the guest prints its count).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_test_guests::{parse_counts, GuestKind, Params, COUNT_ADDR, FAULT_MARKER};
use kiln_vmm::config::DiskConfig;
use kiln_vmm::image::{create_overlay, DiskFormat, OverlayOptions};
use kiln_vmm::memory::GuestMemory;
use kiln_vmm::snapshot::{DiskOverride, RestoreConfig, SnapshotError};
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::{ConsoleConfig, ControlError, RunningVm, Vm, VmConfig, VmOutcome};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A scratch directory removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kiln-snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn count(memory: &GuestMemory) -> u64 {
    memory
        .read_obj(GuestAddress(COUNT_ADDR))
        .expect("counter in guest memory")
}

fn wait_for_count(memory: &GuestMemory, at_least: u64, vm: &RunningVm) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = count(memory);
        if now >= at_least {
            return now;
        }
        assert!(!vm.is_finished(), "the guest ended early");
        assert!(
            Instant::now() < deadline,
            "no count to {at_least} (at {now})"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn count_config(params: Params, console: ConsoleConfig, disks: Vec<DiskConfig>) -> VmConfig {
    let mut config = VmConfig::new(GuestKind::Count.path());
    config.memory_mib = 64;
    config.cpus = 2;
    config.console = console;
    config.cmdline = Some(params.cmdline());
    config.disks = disks;
    config
}

fn forever() -> Params {
    Params::with_n(1 << 60)
}

/// Runs a count guest, pauses it past `at_least`, snapshots it, stops it; returns the count
/// at the snapshot.
fn take_snapshot(config: VmConfig, state: &Path, memory_file: &Path, at_least: u64) -> u64 {
    let vm = Vm::new(config, Instant::now())
        .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"));
    let memory = vm.guest_memory();
    let running = vm.start().expect("start");
    let handle = running.handle();
    wait_for_count(&memory, at_least, &running);
    assert!(matches!(
        handle.snapshot(state, memory_file),
        Err(ControlError::Snapshot(SnapshotError::NotPaused))
    ));
    handle.pause().expect("pause");
    let at = count(&memory);
    handle.snapshot(state, memory_file).expect("snapshot");
    assert_eq!(count(&memory), at, "taking the snapshot moved the guest");
    handle.stop();
    assert_eq!(running.wait().expect("run"), VmOutcome::Stopped);
    at
}

fn restore(state: &Path, memory_file: &Path, resume: bool) -> Result<Vm, kiln_vmm::Error> {
    let mut restore = RestoreConfig::new(state, memory_file);
    restore.console = ConsoleConfig::None;
    restore.resume = resume;
    Vm::restore(&restore, Instant::now())
}

#[test]
fn a_restored_guest_continues_from_the_same_count() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("continue");
    let (state, memory_file) = (dir.path("vm.state"), dir.path("vm.mem"));
    let config = count_config(forever(), ConsoleConfig::None, Vec::new());
    let at = take_snapshot(config, &state, &memory_file, 1_000_000);

    let restored = restore(&state, &memory_file, false).expect("restore");
    let memory = restored.guest_memory();
    assert_eq!(
        count(&memory),
        at,
        "the restored memory holds another count"
    );
    let running = restored.start().expect("start the restored VM");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count(&memory), at, "a VM restored paused ran");
    running.handle().resume().expect("resume");
    let later = wait_for_count(&memory, at + 1_000_000, &running);
    assert!(later > at);
    running.handle().stop();
    assert_eq!(running.wait().expect("run"), VmOutcome::Stopped);
}

#[test]
fn unread_keys_stay_in_the_restored_keyboard() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("keyboard");
    let (state, memory_file) = (dir.path("vm.state"), dir.path("vm.mem"));
    let vm = Vm::new(
        count_config(forever(), ConsoleConfig::None, Vec::new()),
        Instant::now(),
    )
    .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"));
    let memory = vm.guest_memory();
    let running = vm.start().expect("start");
    let handle = running.handle();
    wait_for_count(&memory, 1, &running);
    // The count guest never reads its keyboard: a press or two fill its 16-byte buffer.
    let presses = (0..4)
        .take_while(|_| handle.send_ctrl_alt_del().is_ok())
        .count();
    assert!(presses >= 1, "no Ctrl-Alt-Del fitted a fresh keyboard");
    handle.pause().expect("pause");
    handle.snapshot(&state, &memory_file).expect("snapshot");
    handle.stop();
    running.wait().expect("run");

    // A fresh controller would take the keys; the restored one still holds the unread ones.
    let restored = restore(&state, &memory_file, true).expect("restore");
    let running = restored.start().expect("start the restored VM");
    let err = running
        .handle()
        .send_ctrl_alt_del()
        .expect_err("the restored keyboard lost its unread keys");
    assert!(
        err.to_string().contains("not reading its keyboard"),
        "{err}"
    );
    running.handle().stop();
    assert_eq!(running.wait().expect("run"), VmOutcome::Stopped);
}

#[test]
fn one_snapshot_restored_twice_gives_two_independent_guests() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("clones");
    let (state, memory_file) = (dir.path("vm.state"), dir.path("vm.mem"));
    let at = take_snapshot(
        count_config(forever(), ConsoleConfig::None, Vec::new()),
        &state,
        &memory_file,
        1_000_000,
    );
    let file_before = std::fs::read(&memory_file).expect("memory file");

    let first = restore(&state, &memory_file, true).expect("first restore");
    let second = restore(&state, &memory_file, true).expect("second restore");
    let (first_memory, second_memory) = (first.guest_memory(), second.guest_memory());
    let (first, second) = (
        first.start().expect("start"),
        second.start().expect("start"),
    );
    wait_for_count(&first_memory, at + 1_000_000, &first);
    wait_for_count(&second_memory, at + 1_000_000, &second);

    // Pausing one leaves the other counting: separate guests, separate memory.
    first.handle().pause().expect("pause the first");
    let frozen = count(&first_memory);
    let moving = count(&second_memory);
    wait_for_count(&second_memory, moving + 1_000_000, &second);
    assert_eq!(count(&first_memory), frozen);

    for vm in [first, second] {
        vm.handle().stop();
        assert_eq!(vm.wait().expect("run"), VmOutcome::Stopped);
    }
    // The guests wrote their own private copies: the memory file is as it was.
    assert!(std::fs::read(&memory_file).expect("memory file") == file_before);
}

#[test]
fn kiln_restore_runs_the_guest_on_in_a_new_process() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("process");
    let (state, memory_file) = (dir.path("vm.state"), dir.path("vm.mem"));
    // Reports every 2^22 steps; the snapshot is taken well past the first report.
    let params = Params {
        report: Some(22),
        ..forever()
    };
    let at = take_snapshot(
        count_config(params, ConsoleConfig::None, Vec::new()),
        &state,
        &memory_file,
        3 << 22,
    );

    let console = dir.path("console.log");
    let mut child = Command::new(KILN)
        .arg("restore")
        .arg("--state")
        .arg(&state)
        .arg("--memory-file")
        .arg(&memory_file)
        .arg("--console")
        .arg(format!("file={}", console.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln restore");
    // Wait for two reports from the restored guest.
    let deadline = Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let counts = parse_counts(&std::fs::read_to_string(&console).unwrap_or_default());
        if counts.len() >= 2 || Instant::now() > deadline {
            break counts;
        }
        assert!(
            child.try_wait().expect("poll kiln").is_none(),
            "kiln restore ended early"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // SAFETY-free way to stop it the way a user would.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let output = child.wait_with_output().expect("kiln restore");
    let log = String::from_utf8_lossy(&output.stderr);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        !text.contains(FAULT_MARKER),
        "the restored guest faulted: {text}"
    );
    assert!(
        counts.len() >= 2,
        "no reports from the restored guest: {text}\n{log}"
    );
    // The first report after the restore is the next multiple of 2^22 after the snapshot's
    // count: the guest went on from there, it did not start again.
    let next_report = (at / (1 << 22) + 1) << 22;
    assert_eq!(
        counts[0], next_report,
        "counts {counts:?}, snapshot at {at}\n{log}"
    );
    assert_eq!(counts[1], next_report + (1 << 22));
    assert_eq!(output.status.code(), Some(143), "{log}");
    assert!(log.contains("restored in"), "{log}");
}

#[test]
fn broken_snapshots_are_refused_by_name_and_start_nothing() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("broken");
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let (state, memory_file) = (dir.path("vm.state"), dir.path("vm.mem"));
    take_snapshot(
        count_config(forever(), ConsoleConfig::None, vec![DiskConfig::new(&disk)]),
        &state,
        &memory_file,
        1_000,
    );
    let original = std::fs::read(&state).expect("state file");
    let refused = |name: &str, bytes: &[u8], expect: &str| {
        let path = dir.path(name);
        std::fs::write(&path, bytes).expect("write a broken state file");
        let err = restore(&path, &memory_file, true)
            .expect_err(&format!("{name} was accepted"))
            .to_string();
        assert!(err.contains(expect), "{name}: {err}");
    };
    refused(
        "foreign",
        b"#!/bin/sh\necho not a snapshot\n",
        "not a Kiln snapshot",
    );
    refused("truncated", &original[..original.len() / 2], "corrupt");
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    refused("flipped", &flipped, "checksum mismatch");
    let mut version = original.clone();
    version[8] = 99;
    refused("version", &version, "version 99 snapshot");

    // The memory file: wrong size, another snapshot's.
    let short = dir.path("short.mem");
    std::fs::write(&short, vec![0u8; 4096]).expect("short memory file");
    let err = restore(&state, &short, true)
        .expect_err("short memory")
        .to_string();
    assert!(err.contains("memory file") && err.contains("need"), "{err}");
    let (other_state, other_memory) = (dir.path("other.state"), dir.path("other.mem"));
    take_snapshot(
        count_config(forever(), ConsoleConfig::None, vec![DiskConfig::new(&disk)]),
        &other_state,
        &other_memory,
        1_000,
    );
    let err = restore(&state, &other_memory, true)
        .expect_err("foreign memory")
        .to_string();
    assert!(err.contains("another snapshot"), "{err}");

    // The disk: changed since the snapshot, then gone.
    std::fs::write(&disk, vec![1u8; 1 << 20]).expect("change the disk");
    let err = restore(&other_state, &other_memory, true)
        .expect_err("changed disk")
        .to_string();
    assert!(
        err.contains("disk 1") && err.contains("modified after"),
        "{err}"
    );
    std::fs::remove_file(&disk).expect("remove the disk");
    let err = restore(&other_state, &other_memory, true)
        .expect_err("missing disk")
        .to_string();
    assert!(
        err.contains("disk 1") && err.contains("cannot use it"),
        "{err}"
    );
    // An explicit replacement of the same size is accepted; another size is not.
    let copy = dir.path("copy.img");
    std::fs::write(&copy, vec![0u8; 1 << 20]).expect("copy");
    let mut with_copy = RestoreConfig::new(&other_state, &other_memory);
    with_copy.console = ConsoleConfig::None;
    with_copy.disk_overrides = vec![DiskOverride::new(0, &copy)];
    let vm = Vm::restore(&with_copy, Instant::now()).expect("restore with a disk copy");
    drop(vm);
    std::fs::write(&copy, vec![0u8; 2 << 20]).expect("resize the copy");
    let err = Vm::restore(&with_copy, Instant::now())
        .expect_err("other size")
        .to_string();
    assert!(
        err.contains("the guest would see 2097152 bytes, the snapshot's disk had 1048576"),
        "{err}"
    );
    // A clone's qcow2 overlay over the (unchanged) disk: accepted when named as qcow2; taken
    // for a detected image, its backing file is refused.
    let base = dir.path("base.img");
    std::fs::write(&base, vec![0u8; 1 << 20]).expect("base image");
    let overlay = dir.path("clone.qcow2");
    create_overlay(
        &overlay,
        &OverlayOptions {
            backing: Some(base),
            backing_format: Some(DiskFormat::Raw),
            size: None,
            cluster_bits: None,
        },
    )
    .expect("create the overlay");
    with_copy.disk_overrides = vec![DiskOverride::new(0, &overlay)];
    let err = Vm::restore(&with_copy, Instant::now())
        .expect_err("a detected overlay")
        .to_string();
    assert!(err.contains("disk 1") && err.contains("backing"), "{err}");
    with_copy.disk_overrides[0].format = Some(DiskFormat::Qcow2);
    let vm = Vm::restore(&with_copy, Instant::now()).expect("restore with an overlay");
    drop(vm);
    // The original files are untouched by all this.
    assert!(std::fs::read(&state).expect("state file") == original);
}

#[test]
fn a_diff_snapshot_holds_only_changed_pages_and_restores_the_same_guest() {
    use kiln_vmm::snapshot::SnapshotKind;
    use std::os::unix::fs::MetadataExt;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Scratch::new("diff");
    let (full_state, full_memory) = (dir.path("full.state"), dir.path("full.mem"));
    let (diff_state, diff_memory) = (dir.path("diff.state"), dir.path("diff.mem"));
    let mut config = count_config(forever(), ConsoleConfig::None, Vec::new());
    config.memory_mib = 256;
    config.track_dirty_pages = true;
    // The guest touches memory first, so that the full snapshot has something to hold.
    let vm = Vm::new(config, Instant::now()).expect("build the VM");
    let memory = vm.guest_memory();
    memory
        .write_slice(&vec![0x5a; 64 << 20], GuestAddress(64 << 20))
        .expect("fill guest memory");
    let running = vm.start().expect("start");
    let handle = running.handle();
    assert!(matches!(
        {
            wait_for_count(&memory, 1_000, &running);
            handle.pause().expect("pause");
            handle.snapshot_of_kind(SnapshotKind::Diff, &diff_state, &diff_memory)
        },
        Err(ControlError::Snapshot(SnapshotError::Diff(_)))
    ));
    handle
        .snapshot(&full_state, &full_memory)
        .expect("full snapshot");
    handle.resume().expect("resume");
    wait_for_count(&memory, count(&memory) + 1_000_000, &running);
    handle.pause().expect("pause again");
    let refused = handle.snapshot_of_kind(SnapshotKind::Diff, &diff_state, &full_memory);
    assert!(
        matches!(refused, Err(ControlError::Snapshot(SnapshotError::Diff(_)))),
        "a diff over its own base: {refused:?}"
    );
    handle
        .snapshot_of_kind(SnapshotKind::Diff, &diff_state, &diff_memory)
        .expect("diff snapshot");
    let at = count(&memory);
    handle.stop();
    assert_eq!(running.wait().expect("run"), VmOutcome::Stopped);

    let full_bytes = std::fs::metadata(&full_memory).expect("full").blocks() * 512;
    let diff_bytes = std::fs::metadata(&diff_memory).expect("diff").blocks() * 512;
    assert!(
        full_bytes >= 64 << 20,
        "the full snapshot holds {full_bytes} bytes"
    );
    assert!(
        diff_bytes < 4 << 20,
        "the diff holds {diff_bytes} bytes; only a few pages changed"
    );

    let restored = restore(&diff_state, &diff_memory, true).expect("restore the diff");
    let restored_memory = restored.guest_memory();
    assert_eq!(count(&restored_memory), at);
    let mut filled = vec![0u8; 64 << 20];
    restored_memory
        .read_slice(&mut filled, GuestAddress(64 << 20))
        .expect("read guest memory");
    assert!(
        filled.iter().all(|&byte| byte == 0x5a),
        "the base layer is missing"
    );
    let running = restored.start().expect("start the restored VM");
    wait_for_count(&restored_memory, at + 1_000_000, &running);
    running.handle().stop();
    assert_eq!(running.wait().expect("run"), VmOutcome::Stopped);

    // The chain needs its base where it was.
    std::fs::remove_file(&full_memory).expect("remove the base");
    let err = restore(&diff_state, &diff_memory, true)
        .expect_err("no base")
        .to_string();
    assert!(err.contains("full.mem"), "{err}");
}
