//! The guest console through `kiln run`: a reader that stops reading never stops the VM from
//! stopping, and a reader that keeps up (or catches up) gets every byte in order.
//!
//! The `flood` micro test guest prints numbered lines from ring 0 as fast as the UART takes
//! them; it runs directly on /dev/kvm (PVM hosts included).

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_test_guests::{flood_line, GuestKind, Params, DONE_MARKER};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// The bound: SIGTERM ends Kiln within a second, whatever the console reader does.
const STOP_BOUND: Duration = Duration::from_secs(1);

/// What the flood guest prints for `n` lines.
fn flood_output(n: u64) -> String {
    let mut expected: String = (1..=n).map(flood_line).collect();
    expected.push_str(&format!("{DONE_MARKER} n={n} m=16\n"));
    expected
}

fn flood_cmdline(n: u64, hold: bool) -> String {
    Params {
        n: Some(n),
        hold,
        ..Params::default()
    }
    .cmdline()
}

fn kiln_flood(cmdline: &str) -> Command {
    let mut command = Command::new(KILN);
    command
        .args(["run", "--kernel"])
        .arg(GuestKind::Flood.path())
        .args(["--memory", "64M", "--cmdline", cmdline])
        .stdin(Stdio::null());
    command
}

/// A pipe shrunk to one page, as (read end, write end), so a stalled reader shows at once.
fn small_pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned only here.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ with an int argument on our pipe.
    let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    (File::from(read), write)
}

fn bytes_in_pipe(read: &File) -> usize {
    let mut available: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    assert_eq!(
        unsafe { libc::ioctl(read.as_raw_fd(), libc::FIONREAD, &mut available) },
        0
    );
    available as usize
}

/// Waits until the pipe holds output that has not grown for 300 ms while the guest floods:
/// then whoever writes it is stuck behind the reader.
fn wait_until_the_pipe_is_stuck(read: &File, child: &mut Child) {
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        assert!(
            child.try_wait().expect("poll kiln").is_none(),
            "kiln ended before its console filled"
        );
        let now_in_pipe = bytes_in_pipe(read);
        if now_in_pipe != last.0 {
            last = (now_in_pipe, Instant::now());
        } else if now_in_pipe > 0 && last.1.elapsed() >= Duration::from_millis(300) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest's output never filled the pipe ({now_in_pipe} bytes)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for `child` up to `bound`; kills it (and returns `None`) past that.
fn wait_at_most(child: &mut Child, bound: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("poll kiln") {
            return Some(status);
        }
        if start.elapsed() >= bound {
            child.kill().expect("kill kiln");
            child.wait().expect("reap kiln");
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn collect_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

#[test]
fn sigterm_stops_a_flooding_guest_within_a_second_while_the_reader_is_stalled() {
    let (read, write) = small_pipe();
    let mut child = kiln_flood(&flood_cmdline(u64::MAX, false))
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let stderr = collect_stderr(&mut child);
    wait_until_the_pipe_is_stuck(&read, &mut child);

    sigterm(&child);
    let started = Instant::now();
    let status = wait_at_most(&mut child, STOP_BOUND);
    let took = started.elapsed();
    eprintln!("kiln ended {took:?} after SIGTERM");
    let stderr = stderr.join().expect("stderr collector");
    let status = status.unwrap_or_else(|| {
        panic!("kiln did not exit within {STOP_BOUND:?} of SIGTERM (killed); stderr: {stderr}")
    });
    assert_eq!(status.code(), Some(143), "after {took:?}; stderr: {stderr}");
    assert!(stderr.contains("stopped by signal 15"), "{stderr}");
    assert!(
        stderr.contains("bytes of guest output are lost"),
        "the output the reader never took is reported: {stderr}"
    );

    // What did reach the reader is the start of the flood, in order.
    let mut received = String::new();
    let mut read = read;
    read.read_to_string(&mut received).expect("read the pipe");
    assert!(!received.is_empty());
    let lines = received.lines().count() as u64;
    assert!(
        flood_output(lines + 1).starts_with(&received),
        "not the flood's first lines: {received:?}"
    );
}

#[test]
fn a_reader_that_pauses_then_catches_up_gets_every_byte_in_order() {
    let n = 2000;
    let (read, write) = small_pipe();
    // `hold`: the guest halts after its done line, so the VM cannot end while the reader is
    // paused (its end would give the reader only a short grace period).
    let mut child = kiln_flood(&flood_cmdline(n, true))
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    let stderr = collect_stderr(&mut child);
    wait_until_the_pipe_is_stuck(&read, &mut child);

    let expected = flood_output(n);
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read = read;
    let start = Instant::now();
    while received.len() < expected.len() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {} bytes arrived",
            received.len(),
            expected.len()
        );
        let count = read.read(&mut buf).expect("read the pipe");
        assert_ne!(count, 0, "kiln closed its output early");
        received.extend_from_slice(&buf[..count]);
    }
    sigterm(&child);
    let status = wait_at_most(&mut child, Duration::from_secs(10));
    let stderr = stderr.join().expect("stderr collector");
    assert_eq!(status.and_then(|s| s.code()), Some(143), "stderr: {stderr}");
    read.read_to_end(&mut received).expect("read the rest");
    assert_eq!(String::from_utf8_lossy(&received), expected);
    assert!(!stderr.contains("dropped"), "{stderr}");
}

#[test]
fn a_reader_that_keeps_up_gets_the_whole_output_up_to_the_guests_last_byte() {
    let n = 500;
    let output = kiln_flood(&flood_cmdline(n, false))
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    // The guest resets right after its last line: what was still buffered is written at the end.
    assert_eq!(String::from_utf8_lossy(&output.stdout), flood_output(n));
}

#[test]
fn a_console_file_gets_the_whole_output() {
    let n = 200;
    let path = std::env::temp_dir().join(format!("kiln-console-test-{}.log", std::process::id()));
    let console = format!("file={}", path.display());
    let output = kiln_flood(&flood_cmdline(n, false))
        .args(["--console", &console])
        .output()
        .expect("run kiln");
    let written = std::fs::read_to_string(&path).expect("console file");
    std::fs::remove_file(&path).expect("remove console file");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(written, flood_output(n));
    assert!(output.stdout.is_empty());
}
