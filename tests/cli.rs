//! `kiln` as a user meets it: bad input ends in a clear message and the documented exit status,
//! before any guest runs; a stop signal ends a running guest cleanly with 128+N.
//!
//! The signal test runs a micro test guest on direct /dev/kvm (PVM hosts included).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_test_guests::{GuestKind, Params};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const EXIT_KILN_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;

fn kiln(args: &[&str]) -> Output {
    Command::new(KILN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kiln")
}

fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("kiln-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

/// Asserts the status and that stderr contains every fragment.
fn assert_refused(output: &Output, status: i32, fragments: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    for fragment in fragments {
        assert!(
            stderr.contains(fragment),
            "stderr lacks {fragment:?}: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "kiln panicked: {stderr}");
    assert!(output.stdout.is_empty(), "no guest should have run");
}

/// Reads the child's stdout on a thread until the guest's hello marker shows (so a stop request
/// is known to reach a running guest), then keeps collecting; returns the collector.
fn wait_for_hello(child: &mut std::process::Child) -> std::thread::JoinHandle<String> {
    use std::io::Read;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (seen_tx, seen_rx) = std::sync::mpsc::channel();
    let collector = std::thread::spawn(move || {
        let mut collected = Vec::new();
        let mut buf = [0u8; 4096];
        let mut announced = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            collected.extend_from_slice(&buf[..n]);
            if !announced && String::from_utf8_lossy(&collected).contains("KILN-GUEST-HELLO") {
                announced = true;
                let _ = seen_tx.send(());
            }
        }
        String::from_utf8_lossy(&collected).into_owned()
    });
    seen_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the guest did not print its hello marker within 30 s");
    collector
}

#[test]
fn missing_kernel_is_named() {
    let output = kiln(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_refused(
        &output,
        EXIT_KILN_ERROR,
        &["kernel image '/nonexistent/vmlinux' does not exist"],
    );
}

#[test]
fn no_kernel_at_all_says_what_to_pass() {
    assert_refused(&kiln(&["run"]), EXIT_KILN_ERROR, &["--kernel"]);
}

#[test]
fn a_file_that_is_no_kernel_is_refused() {
    let path = temp_file("not-a-kernel", b"#!/bin/sh\necho hi\n");
    let output = kiln(&["run", "--kernel", path.to_str().unwrap(), "--memory", "64M"]);
    std::fs::remove_file(&path).unwrap();
    assert_refused(
        &output,
        EXIT_KILN_ERROR,
        &["neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn bad_sizes_and_counts_are_usage_errors() {
    let kernel = GuestKind::Exit.path().to_str().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["--memory", "lots"], "invalid memory size 'lots'"),
        (&["--cpus", "0x"], "invalid value '0x'"),
        (&["--console", "tty"], "invalid console 'tty'"),
        (&["--disk", "readonly"], "--disk"),
    ];
    for (extra, fragment) in cases {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend_from_slice(extra);
        assert_refused(&kiln(&args), EXIT_USAGE, &[fragment]);
    }
}

#[test]
fn out_of_range_values_are_refused_with_the_limits() {
    let kernel = GuestKind::Exit.path().to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["--cpus", "0"], "must be between 1 and 254"),
        (&["--memory", "16M"], "at least 32 MiB"),
        (&["--memory", "100000G"], "more than this host has"),
    ];
    for (extra, fragment) in cases {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend_from_slice(extra);
        assert_refused(&kiln(&args), EXIT_KILN_ERROR, &[fragment]);
    }
    let long = format!("x{}", "y".repeat(2100));
    assert_refused(
        &kiln(&["run", "--kernel", kernel, "--cmdline", &long]),
        EXIT_KILN_ERROR,
        &["the x86 boot protocol allows at most 2047"],
    );
}

#[test]
fn initrd_that_does_not_fit_is_refused() {
    let kernel = GuestKind::Exit.path().to_str().unwrap();
    let initrd = temp_file("huge-initrd", &vec![0u8; 40 << 20]);
    let output = kiln(&[
        "run",
        "--kernel",
        kernel,
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "32M",
    ]);
    std::fs::remove_file(&initrd).unwrap();
    assert_refused(&output, EXIT_KILN_ERROR, &["initrd", "does not fit"]);
}

#[test]
fn config_file_errors_name_the_field() {
    let config = temp_file("bad.json", br#"{"kernel": "/k", "vcpus": 2}"#);
    let output = kiln(&["run", "--config", config.to_str().unwrap()]);
    std::fs::remove_file(&config).unwrap();
    assert_refused(&output, EXIT_KILN_ERROR, &["unknown field `vcpus`"]);
    let config = temp_file(
        "wrong-type.json",
        br#"{"kernel": "/k", "memory_mib": "big"}"#,
    );
    let output = kiln(&["run", "--config", config.to_str().unwrap()]);
    std::fs::remove_file(&config).unwrap();
    assert_refused(&output, EXIT_KILN_ERROR, &["invalid type", "line 1"]);
}

#[test]
fn bad_vsock_and_rng_arguments_are_refused_before_the_guest_runs() {
    let kernel = GuestKind::Exit.path().to_str().unwrap();
    for (extra, fragment) in [
        (&["--vsock", "cid=3"][..], "no uds=PATH given"),
        (
            &["--vsock", "cid=3,uds=/tmp/x,mode=fast"],
            "unknown option 'mode=fast'",
        ),
        (&["--rng", "rate=0/s"], "at least 1 byte per second"),
    ] {
        let mut args = vec!["run", "--kernel", kernel];
        args.extend_from_slice(extra);
        assert_refused(&kiln(&args), EXIT_USAGE, &[fragment]);
    }
    let taken = temp_file("taken.sock", b"");
    let taken_spec = format!("cid=3,uds={}", taken.display());
    let free = std::env::temp_dir().join(format!("kiln-cli-{}-free.sock", std::process::id()));
    let reserved_spec = format!("cid=2,uds={}", free.display());
    let nowhere = "cid=3,uds=/nonexistent-kiln-dir/v.sock".to_string();
    for (spec, fragment) in [
        (taken_spec, "already exists"),
        (reserved_spec, "must be between 3 and"),
        (nowhere, "not an existing directory"),
    ] {
        assert_refused(
            &kiln(&["run", "--kernel", kernel, "--vsock", &spec]),
            EXIT_KILN_ERROR,
            &[fragment],
        );
    }
    std::fs::remove_file(&taken).unwrap();
    assert!(!free.exists());
}

#[test]
fn the_vsock_socket_is_removed_when_the_vm_ends() {
    let socket = std::env::temp_dir().join(format!("kiln-cli-{}-vm.sock", std::process::id()));
    let output = kiln(&[
        "run",
        "--kernel",
        GuestKind::Exit.path().to_str().unwrap(),
        "--vsock",
        &format!("cid=3,uds={}", socket.display()),
        "--console",
        "none",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn sigterm_stops_a_running_guest_with_143() {
    let cmdline = Params {
        hold: true,
        ..Params::default()
    }
    .cmdline();
    let kernel = GuestKind::Hello.path().to_str().unwrap().to_string();
    let mut child = Command::new(KILN)
        .args(["run", "--kernel", &kernel, "--memory", "64M", "--cpus", "2"])
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    // The held guest never ends by itself: once it is up, stop it.
    let collector = wait_for_hello(&mut child);
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let started = Instant::now();
    let output = child.wait_with_output().expect("wait for kiln");
    let stdout = collector.join().expect("stdout collector");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(143), "stderr: {stderr}");
    assert!(
        stdout.contains("KILN-GUEST-HELLO"),
        "guest never ran: {stdout}"
    );
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "kiln took long to stop"
    );
}

#[test]
fn ctrl_a_x_on_a_terminal_stops_the_guest_like_ctrl_c() {
    use std::os::fd::{FromRawFd, OwnedFd};

    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty fills two descriptors; the name/termios/winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned only here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut terminal = std::fs::File::from(master);

    let cmdline = Params {
        hold: true,
        ..Params::default()
    }
    .cmdline();
    let kernel = GuestKind::Hello.path().to_str().unwrap().to_string();
    let mut child = Command::new(KILN)
        .args(["run", "--kernel", &kernel, "--memory", "64M"])
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let collector = wait_for_hello(&mut child);
    use std::io::Write;
    terminal.write_all(b"\x01x").expect("type Ctrl-A x");
    let output = child.wait_with_output().expect("wait for kiln");
    collector.join().expect("stdout collector");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "stderr: {stderr}");
    assert!(stderr.contains("Ctrl-A x: stopping the VM"), "{stderr}");
}
