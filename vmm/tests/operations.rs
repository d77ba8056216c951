//! The `VmHandle` operations the Firecracker API maps onto: metrics, disk replacement,
//! Ctrl-Alt-Del and the guest clock, on direct /dev/kvm with the micro test guests (they fail with the reason when
//! /dev/kvm is unusable). One test at a time, so that timing-sensitive ones run alone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params, COUNT_ADDR, FAULT_MARKER};
use kiln_vmm::config::DiskConfig;
use kiln_vmm::device_manager::DeviceError;
use kiln_vmm::vm_memory::{Bytes, GuestAddress};
use kiln_vmm::{ConsoleConfig, ControlError, Vm, VmConfig, VmOutcome};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-ops-{}-{name}", std::process::id()))
}

fn image(name: &str, bytes: u64) -> PathBuf {
    let path = scratch(name);
    File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

fn config(kind: GuestKind, params: Params, console: &Path) -> VmConfig {
    let mut config = VmConfig::new(kind.path());
    config.memory_mib = 64;
    config.console = ConsoleConfig::File(console.to_path_buf());
    config.cmdline = Some(params.cmdline());
    config
}

fn build(config: VmConfig) -> Vm {
    Vm::new(config, Instant::now())
        .unwrap_or_else(|err| panic!("cannot build the VM (is /dev/kvm usable?): {err}"))
}

/// Polls `probe` until it is true or 20 s passed.
fn wait_until(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn exit_counters_grow_while_running_and_stand_still_while_paused() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let console = scratch("metrics.log");
    let vm = build(config(
        GuestKind::PioLoop,
        Params::with_n(1 << 40),
        &console,
    ));
    let handle = vm.handle();
    assert_eq!(handle.metrics().vcpu.io_out, 0, "counted before the start");
    let running = vm.start().unwrap();
    wait_until("port writes", || handle.metrics().vcpu.io_out > 100);

    handle.pause().unwrap();
    let paused = handle.metrics();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.metrics(), paused, "a paused VM kept exiting");

    handle.resume().unwrap();
    wait_until("port writes after resume", || {
        handle.metrics().vcpu.io_out > paused.vcpu.io_out + 100
    });
    assert_eq!(handle.metrics().vcpu.failures, 0);

    handle.stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    // Final totals stay readable after the end.
    assert!(handle.metrics().vcpu.io_out > paused.vcpu.io_out);
    let _ = std::fs::remove_file(&console);
}

#[test]
fn ctrl_alt_del_reaches_the_keyboard_and_a_guest_that_ignores_it_runs_on() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let console = scratch("cad.log");
    let vm = build(config(GuestKind::Count, Params::with_n(1 << 60), &console));
    let memory = vm.guest_memory();
    let handle = vm.handle();
    let running = vm.start().unwrap();
    let count = || memory.read_obj::<u64>(GuestAddress(COUNT_ADDR)).unwrap();
    wait_until("the count guest", || count() > 0);
    // The keys go into the keyboard; this guest never reads them, so within a few presses the
    // keyboard's 16-byte buffer is full and the next press is refused, with nothing queued.
    handle
        .send_ctrl_alt_del()
        .expect("the first press fits the buffer");
    let err = (0..4)
        .find_map(|_| handle.send_ctrl_alt_del().err())
        .expect("an unread keyboard never filled up");
    assert!(matches!(err, ControlError::Keyboard(_)), "{err}");
    assert!(
        err.to_string().contains("not reading its keyboard"),
        "{err}"
    );
    let before = count();
    wait_until("the guest to go on counting", || count() > before);
    handle.stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    let _ = std::fs::remove_file(&console);
}

#[test]
fn a_disk_image_is_replaced_while_the_guest_runs() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let console = scratch("replace.log");
    let old = image("old.img", 1 << 20);
    let new = image("new.img", 4 << 20);
    let mut config = config(GuestKind::Count, Params::with_n(1 << 60), &console);
    config.disks = vec![DiskConfig {
        id: Some("data".into()),
        ..DiskConfig::new(&old)
    }];
    let vm = build(config);
    let memory = vm.guest_memory();
    let handle = vm.handle();
    let running = vm.start().unwrap();
    let count = || memory.read_obj::<u64>(GuestAddress(COUNT_ADDR)).unwrap();
    wait_until("the count guest", || count() > 0);

    // Refusals name the problem and leave the VM running with its disk.
    let missing = scratch("missing.img");
    let err = handle.replace_disk(0, &missing).unwrap_err();
    assert!(err.to_string().contains("missing.img"), "{err}");
    assert!(matches!(
        handle.replace_disk(1, &new),
        Err(ControlError::Device(DeviceError::NoSuchDisk {
            index: 1,
            count: 1
        }))
    ));
    assert!(lock_is_held(&old), "a refused swap dropped the old image");

    handle.replace_disk(0, &new).unwrap();
    assert!(!lock_is_held(&old), "the old image is still open");
    assert!(lock_is_held(&new), "the new image is not locked");
    let before = count();
    wait_until("the guest to go on counting", || count() > before);

    handle.stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(!text.contains(FAULT_MARKER), "the guest faulted: {text}");
    for path in [console, old, new] {
        let _ = std::fs::remove_file(path);
    }
}

/// Whether someone (the VM) holds a `flock` on the image: a non-blocking exclusive lock of our
/// own fails then.
fn lock_is_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap();
    // SAFETY: flock on a descriptor owned by `file`, which outlives the call.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    ret != 0
}

#[test]
fn the_guest_clock_stands_still_while_paused_and_goes_on_from_there() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let console = scratch("clock.log");
    let vm = build(config(GuestKind::Count, Params::with_n(1 << 60), &console));
    let handle = vm.handle();
    let running = vm.start().unwrap();
    let ms = |ns: u64| ns / 1_000_000;

    handle.pause().unwrap();
    let paused_at = handle.guest_clock_ns().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        handle.guest_clock_ns().unwrap(),
        paused_at,
        "the clock ran while paused"
    );
    handle.resume().unwrap();
    let resumed_at = handle.guest_clock_ns().unwrap();
    assert!(
        resumed_at >= paused_at && ms(resumed_at - paused_at) < 200,
        "the clock jumped by {} ms over a 400 ms pause",
        ms(resumed_at - paused_at)
    );
    std::thread::sleep(Duration::from_millis(200));
    let later = handle.guest_clock_ns().unwrap();
    assert!(
        ms(later - resumed_at) >= 150,
        "the clock stopped after the resume"
    );

    handle.stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    let _ = std::fs::remove_file(&console);
}
