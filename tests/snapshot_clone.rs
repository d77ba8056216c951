//! Clones of a guest with user-mode networking, on direct /dev/kvm with the `count` micro guest:
//! `kiln run --net user,hostfwd=... --api-sock` boots it from the command line and serves the
//! Firecracker API for it; the API pauses it and takes a snapshot; `kiln restore --net
//! 1=user,hostfwd=...` starts two clones at once, each with its own passt forwarding its own
//! host port. The guest has no network driver: what is checked is Kiln's side (each clone's
//! passt listens on the clone's port, not the snapshot's), and that both clones count on from the
//! snapshot. Bad overrides are refused by name and start nothing; so are an unusable
//! `--api-sock` path, a kernel that is not there (no socket left behind) and `--api-sock` with a
//! command. (A Linux guest's view of a restored NIC is in tests/snapshot_linux.rs.)

#[path = "support/api_client.rs"]
mod api_client;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use api_client::{scratch, Kiln, KILN};
use kiln_test_guests::{parse_counts, GuestKind, Params, FAULT_MARKER};

/// Reports every 2^22 steps.
const REPORT_BITS: u64 = 22;

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).is_ok()
}

/// Whether `port` stops accepting within 5 s (a killed Kiln's passt goes away with it).
fn closes(port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while listening(port) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn counts_in(path: &Path) -> Vec<u64> {
    parse_counts(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Waits until the console at `path` shows `wanted` reports.
fn wait_for_counts(kiln: &mut Kiln, path: &Path, wanted: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = counts_in(path);
        if counts.len() >= wanted {
            return counts;
        }
        assert!(
            Instant::now() < deadline,
            "{} report(s) of {wanted} after 30 s; kiln's log: {}",
            counts.len(),
            kiln.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn restore_args<'a>(state: &'a str, memory: &'a str, console: &'a str) -> Vec<&'a str> {
    vec![
        "restore",
        "--state",
        state,
        "--memory-file",
        memory,
        "--console",
        console,
    ]
}

/// Runs kiln to its end; one still running after 20 s (a guest that started) is killed and
/// fails the test.
fn kiln_to_end(args: &[&str]) -> Output {
    let mut child = Command::new(KILN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll kiln").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("kiln's output");
            panic!(
                "kiln {args:?} was still running after 20 s: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("kiln's output")
}

/// Kiln refusing `args` before starting anything: exit `status`, stderr naming `fragment`.
/// Returns stderr for further checks.
fn refused(args: &[&str], status: i32, fragment: &str) -> String {
    let output = kiln_to_end(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(status), "{args:?}: {stderr}");
    assert!(
        stderr.contains(fragment),
        "{args:?}: {stderr:?} lacks {fragment:?}"
    );
    stderr
}

#[test]
fn clones_of_a_user_networking_guest_each_forward_their_own_port() {
    let params = Params {
        report: Some(REPORT_BITS),
        ..Params::with_n(1 << 60)
    };
    let state = scratch("clone.state");
    let memory = scratch("clone.mem");
    let console = scratch("clone-origin.console");
    let (origin_port, port_a, port_b) = (free_port(), free_port(), free_port());
    let hostfwd = |port: u16| format!("user,hostfwd=tcp:127.0.0.1:{port}-:80");
    let socket = scratch("clone-origin.sock");
    let _ = std::fs::remove_file(&socket);
    let (kernel, cmdline) = (GuestKind::Count.path(), params.cmdline());
    let origin_net = hostfwd(origin_port);
    let console_arg = format!("file={}", console.display());
    let mut origin = Kiln::spawn(
        "clone-origin",
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            &cmdline,
            "--cpus",
            "2",
            "--memory",
            "64M",
            "--console",
            &console_arg,
            "--net",
            &origin_net,
            "--api-sock",
            socket.to_str().unwrap(),
        ],
    );
    origin.wait_for_socket();
    assert_eq!(origin.call("GET", "/", None).1["state"], "Running");
    wait_for_counts(&mut origin, &console, 2);
    assert!(
        listening(origin_port),
        "the origin's passt forwards its port"
    );

    // Firecracker's rule: only a paused VM is snapshotted. Then the origin goes away.
    origin.refused(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        )),
        "save/restore unavailable while running",
    );
    origin.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    origin.ok(
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        ),
    );
    // Complete lines only: the pause can cut a report in the middle.
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
    let last_before = *parse_counts(complete)
        .last()
        .expect("reports before the snapshot");
    origin.signal(libc::SIGKILL);
    origin.wait(Duration::from_secs(10));
    assert!(
        closes(origin_port),
        "the killed origin's passt still forwards its port"
    );

    let (state_arg, memory_arg) = (state.to_str().unwrap(), memory.to_str().unwrap());
    let null_console = "none";
    let bad = |extra: &[&str], fragment: &str| {
        let mut args = restore_args(state_arg, memory_arg, null_console);
        args.extend_from_slice(extra);
        refused(&args, 1, fragment);
    };
    bad(
        &["--net", "2=user"],
        "NIC 2 was given a backend (user), but the snapshot has 1 NIC(s)",
    );
    bad(
        &["--net", "1=user,mac=02:00:00:00:00:01"],
        "NIC 1 keeps the MAC its guest knows",
    );
    bad(
        &["--net", "1=user", "--net", "1=user"],
        "NIC 1 is given twice",
    );

    let mut clones = Vec::new();
    for (name, port) in [("clone-a", port_a), ("clone-b", port_b)] {
        let console = scratch(&format!("{name}.console"));
        let _ = std::fs::remove_file(&console);
        let console_arg = format!("file={}", console.display());
        let net = format!("1={}", hostfwd(port));
        let mut args = restore_args(state_arg, memory_arg, &console_arg);
        args.extend_from_slice(&["--net", &net]);
        clones.push((Kiln::spawn(name, &args), console, port));
    }
    for (clone, console, port) in &mut clones {
        let counts = wait_for_counts(clone, console, 2);
        let text = std::fs::read_to_string(&*console).unwrap_or_default();
        assert!(!text.contains(FAULT_MARKER), "a clone faulted: {text}");
        // The next report after the snapshot (or the one after, if a report line was cut by
        // the pause): the clone went on from there, it did not start again.
        let step = 1u64 << REPORT_BITS;
        assert!(
            counts[0] % step == 0 && counts[0] > last_before && counts[0] <= last_before + 2 * step,
            "clone counts {counts:?} after a snapshot whose last report was {last_before}"
        );
        assert!(
            listening(*port),
            "the clone's passt forwards its own port {port}: {}",
            clone.stderr_text()
        );
    }
    assert!(
        !listening(origin_port),
        "no clone forwards the snapshot's port"
    );

    // A third clone on a port another one holds: refused, and the others run on.
    let taken = format!("1={}", hostfwd(port_a));
    let mut args = restore_args(state_arg, memory_arg, null_console);
    args.extend_from_slice(&["--net", &taken]);
    refused(&args, 1, &port_a.to_string());

    for (clone, console, _) in &mut clones {
        let before = counts_in(console).len();
        wait_for_counts(clone, console, before + 1);
        clone.signal(libc::SIGTERM);
        assert_eq!(clone.wait(Duration::from_secs(10)).code(), Some(143));
        let _ = std::fs::remove_file(&*console);
    }
    for path in [&state, &memory, &console] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn kiln_run_api_sock_refusals_start_nothing() {
    let kernel = GuestKind::Count.path().to_str().unwrap();
    let precious = scratch("precious-not-a-socket");
    std::fs::write(&precious, b"keep me").unwrap();
    let precious_arg = precious.to_str().unwrap();
    let stderr = refused(
        &["run", "--kernel", kernel, "--api-sock", precious_arg],
        1,
        "is not a socket",
    );
    assert!(!stderr.contains("started"), "a VM started: {stderr}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let _ = std::fs::remove_file(&precious);

    let socket = scratch("never.sock");
    let socket_arg = socket.to_str().unwrap();
    refused(
        &[
            "run",
            "--kernel",
            "/nonexistent/vmlinux",
            "--api-sock",
            socket_arg,
        ],
        1,
        "/nonexistent/vmlinux",
    );
    assert!(!socket.exists(), "the socket was left behind");

    refused(
        &[
            "run",
            "--kernel",
            kernel,
            "--api-sock",
            socket_arg,
            "--",
            "true",
        ],
        125,
        "--api-sock cannot be used with a command",
    );
}
