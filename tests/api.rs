//! Kiln's Firecracker-compatible API, driven like Firecracker's users drive it: the `kiln`
//! binary started with `--api-sock`, HTTP/1.1 requests on the Unix socket, and the micro test
//! guests on direct /dev/kvm (PVM hosts included; without a usable /dev/kvm the tests that
//! start a guest fail with the reason).
//!
//! Pause and resume are observed through what the guest really does: the `pio-loop` guest
//! writes to a port in a loop, and the vCPU exit counters in the metrics lines
//! (`FlushMetrics`) stand still while it is paused and move again once it is resumed.

#[path = "support/api_client.rs"]
mod api_client;

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use api_client::{read_response, scratch, Kiln, KILN};
use kiln_test_guests::{GuestKind, Params, HELLO_MARKER};
use serde_json::Value;

fn boot_source(kind: GuestKind, params: &Params) -> String {
    serde_json::json!({
        "kernel_image_path": kind.path(),
        "boot_args": params.cmdline(),
    })
    .to_string()
}

fn image(name: &str, bytes: u64) -> PathBuf {
    let path = scratch(name);
    File::create(&path).unwrap().set_len(bytes).unwrap();
    path
}

const START: &str = r#"{"action_type": "InstanceStart"}"#;

#[test]
fn getting_started_sequence_boots_the_guest_and_kiln_exits_with_it() {
    let rootfs = image("rootfs.img", 1 << 20);
    let mut kiln = Kiln::start("getting-started", &[]);
    let (status, info) = kiln.call("GET", "/", None);
    assert_eq!(status, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["app_name"], "Kiln");
    kiln.ok(
        "PUT",
        "/boot-source",
        &boot_source(GuestKind::Hello, &Params::default()),
    );
    kiln.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 128}"#,
    );
    kiln.ok(
        "PUT",
        "/drives/rootfs",
        &serde_json::json!({
            "drive_id": "rootfs",
            "path_on_host": rootfs,
            "is_root_device": true,
            "is_read_only": false,
        })
        .to_string(),
    );
    let (_, config) = kiln.call("GET", "/vm/config", None);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    kiln.ok("PUT", "/actions", START);
    // The guest prints its marker and resets: Kiln exits 0, as Firecracker does.
    let status = kiln.wait(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", kiln.stderr_text());
    assert!(
        kiln.stdout_text().contains(HELLO_MARKER),
        "{}",
        kiln.stdout_text()
    );
    assert!(!kiln.socket.exists(), "the socket outlived Kiln");
    let _ = std::fs::remove_file(rootfs);
}

/// vCPU port-write exits in a fresh metrics line.
fn flushed_exits(kiln: &Kiln, metrics: &Path) -> u64 {
    kiln.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(metrics).unwrap();
    let last: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    last["vcpu"]["exit_io_out"].as_u64().unwrap()
}

#[test]
fn a_paused_guest_stops_and_a_resumed_one_goes_on() {
    let metrics = scratch("pause.metrics");
    let _ = std::fs::remove_file(&metrics);
    let mut kiln = Kiln::start("pause", &["--metrics-path", metrics.to_str().unwrap()]);
    kiln.ok(
        "PUT",
        "/boot-source",
        &boot_source(GuestKind::PioLoop, &Params::with_n(1 << 40)),
    );
    kiln.ok("PUT", "/actions", START);
    let deadline = Instant::now() + Duration::from_secs(20);
    while flushed_exits(&kiln, &metrics) == 0 {
        assert!(Instant::now() < deadline, "the guest never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    kiln.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(kiln.call("GET", "/", None).1["state"], "Paused");
    flushed_exits(&kiln, &metrics); // what ran before the pause
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(flushed_exits(&kiln, &metrics), 0, "a paused guest ran");
    kiln.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(kiln.call("GET", "/", None).1["state"], "Running");
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        flushed_exits(&kiln, &metrics) > 0,
        "the resumed guest did not run"
    );
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert!(
        last["latencies_us"]["vmm_pause_vm"].as_u64().is_some(),
        "{last}"
    );

    kiln.signal(libc::SIGTERM);
    assert_eq!(kiln.wait(Duration::from_secs(10)).code(), Some(143));
    // The final line was written at exit.
    assert!(std::fs::read_to_string(&metrics).unwrap().lines().count() > lines.lines().count());
    let _ = std::fs::remove_file(metrics);
}

#[test]
fn bad_requests_get_400_with_the_field_and_the_vm_is_not_harmed() {
    let kiln = Kiln::start("bad", &[]);
    let (status, answer) = kiln.raw(b"PUT /boot-source HTTP/1.1\r\nContent-Length: abc\r\n\r\n");
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = kiln.raw(b"not http at all\r\n\r\n");
    assert_eq!(status, 400, "{answer}");
    let big = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        51201
    );
    let (status, answer) = kiln.raw(big.as_bytes());
    assert_eq!(status, 413, "{answer}");
    kiln.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64"#),
        "deserializing the json body",
    );
    kiln.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}"#),
        "unknown field `vcpus`",
    );
    kiln.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": "one", "mem_size_mib": 64}"#),
        "invalid type: string \"one\", expected u8",
    );
    kiln.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#),
        "smt (simultaneous multithreading) is not supported",
    );
    kiln.refused(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
        "kernel image '/nonexistent/vmlinux' does not exist",
    );
    kiln.refused(
        "PUT",
        "/drives/data",
        Some(r#"{"drive_id": "data", "path_on_host": "/nonexistent/data.img", "is_root_device": false}"#),
        "'/nonexistent/data.img') does not exist",
    );
    kiln.refused(
        "GET",
        "/nowhere",
        None,
        "Invalid request method and/or path",
    );
    kiln.refused(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "not supported before starting the microVM",
    );
    kiln.refused(
        "PUT",
        "/actions",
        Some(START),
        "Start microvm error: no kernel given",
    );

    // After all that the VM still starts with a good configuration.
    kiln.ok(
        "PUT",
        "/boot-source",
        &boot_source(GuestKind::PioLoop, &Params::with_n(1 << 40)),
    );
    kiln.ok("PUT", "/actions", START);
    kiln.refused(
        "PUT",
        "/actions",
        Some(START),
        "not supported after starting the microVM",
    );
    kiln.refused(
        "PUT",
        "/boot-source",
        Some(&boot_source(GuestKind::Hello, &Params::default())),
        "not supported after starting the microVM",
    );
    kiln.refused(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        "not supported after starting the microVM",
    );
    assert_eq!(kiln.call("GET", "/", None).1["state"], "Running");
}

#[test]
fn clients_that_vanish_or_come_in_hundreds_are_served() {
    let kiln = Kiln::start("crowd", &[]);
    for partial in [
        &b"PUT /machine-config HTTP/1.1\r\nContent-Length: 60\r\n\r\n{\"vcpu_count\""[..],
        b"GET /machine-con",
    ] {
        let mut stream = UnixStream::connect(&kiln.socket).unwrap();
        stream.write_all(partial).unwrap();
    }
    let clients: Vec<_> = (0..100)
        .map(|i| {
            let socket = kiln.socket.clone();
            std::thread::spawn(move || {
                let mut stream = UnixStream::connect(&socket).unwrap();
                let body = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {}}}"#, 64 + 2 * i);
                let request = format!(
                    "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}\
                     GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                stream.write_all(request.as_bytes()).unwrap();
                let mut reader = BufReader::new(stream);
                (read_response(&mut reader), read_response(&mut reader))
            })
        })
        .collect();
    for client in clients {
        let ((put, _), (get, machine)) = client.join().unwrap();
        assert_eq!((put, get), (204, 200));
        assert!(machine["mem_size_mib"].as_u64().unwrap() >= 64);
    }
    assert_eq!(kiln.call("GET", "/version", None).0, 200);
}

#[test]
fn the_socket_path_is_never_clobbered_unless_stale() {
    // A live socket: refused, and the other server keeps its socket.
    let live_path = scratch("live.sock");
    let _ = std::fs::remove_file(&live_path);
    let live = UnixListener::bind(&live_path).unwrap();
    let mut kiln = Kiln::spawn("live", &["--api-sock", live_path.to_str().unwrap()]);
    assert_eq!(kiln.wait(Duration::from_secs(10)).code(), Some(1));
    assert!(
        kiln.stderr_text().contains("another process is listening"),
        "{}",
        kiln.stderr_text()
    );
    assert!(UnixStream::connect(&live_path).is_ok());
    drop(live);

    // The listener is gone, its socket file stays: a stale socket, replaced.
    assert!(live_path.exists());
    let mut restarted = Kiln::spawn("stale2", &["--api-sock", live_path.to_str().unwrap()]);
    restarted.wait_for_socket();
    assert_eq!(restarted.call("GET", "/", None).0, 200);
    restarted.signal(libc::SIGTERM);
    assert_eq!(restarted.wait(Duration::from_secs(10)).code(), Some(143));
    assert!(!live_path.exists(), "the socket outlived Kiln");

    // Anything else at the path: refused, left alone.
    let file_path = scratch("precious.sock");
    std::fs::write(&file_path, b"precious").unwrap();
    let mut kiln = Kiln::spawn("file", &["--api-sock", file_path.to_str().unwrap()]);
    assert_eq!(kiln.wait(Duration::from_secs(10)).code(), Some(1));
    assert!(
        kiln.stderr_text().contains("is not a socket"),
        "{}",
        kiln.stderr_text()
    );
    assert_eq!(std::fs::read(&file_path).unwrap(), b"precious");
    let _ = std::fs::remove_file(file_path);
}

#[test]
fn a_firecracker_config_file_boots_without_the_api() {
    let config = scratch("vm_config.json");
    std::fs::write(
        &config,
        serde_json::json!({
            "boot-source": {
                "kernel_image_path": GuestKind::Hello.path(),
                "boot_args": Params::default().cmdline(),
                "initrd_path": null
            },
            "drives": [],
            "machine-config": {
                "vcpu_count": 1,
                "mem_size_mib": 128,
                "smt": false,
                "track_dirty_pages": false,
                "huge_pages": "None"
            },
            "network-interfaces": [],
            "vsock": null,
            "logger": null,
            "metrics": null,
            "balloon": null,
            "mmds-config": null,
            "cpu-config": null,
            "entropy": null
        })
        .to_string(),
    )
    .unwrap();
    let mut kiln = Kiln::spawn(
        "config-file",
        &["--no-api", "--config-file", config.to_str().unwrap()],
    );
    let status = kiln.wait(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", kiln.stderr_text());
    assert!(kiln.stdout_text().contains(HELLO_MARKER));

    // A bad file ends Kiln with Firecracker's bad-configuration status, naming the field.
    std::fs::write(
        &config,
        r#"{"boot-source": {"kernel_image_path": "/k"}, "drivez": []}"#,
    )
    .unwrap();
    let mut kiln = Kiln::spawn(
        "config-file-bad",
        &["fc", "--no-api", "--config-file", config.to_str().unwrap()],
    );
    assert_eq!(kiln.wait(Duration::from_secs(10)).code(), Some(152));
    assert!(
        kiln.stderr_text().contains("unknown field `drivez`"),
        "{}",
        kiln.stderr_text()
    );
    let _ = std::fs::remove_file(config);
}

#[test]
fn firecracker_command_line_details() {
    let output = Command::new(KILN)
        .args(["fc", "--version"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.starts_with("Firecracker v1."), "{text}");
    // Tools read the second word as the version.
    assert!(text.split_whitespace().nth(1).unwrap().starts_with("v1."));
    let output = Command::new(KILN)
        .args(["--seccomp-filter", "/f.bpf"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--seccomp-filter is not supported"));
    let output = Command::new(KILN).args(["fc", "--bogus"]).output().unwrap();
    assert_eq!(output.status.code(), Some(153));
    // A stop signal before InstanceStart ends Kiln and removes its socket.
    let mut kiln = Kiln::start("early-signal", &["--id", "vm-42", "--level", "Debug"]);
    assert_eq!(kiln.call("GET", "/", None).1["id"], "vm-42");
    kiln.signal(libc::SIGTERM);
    assert_eq!(kiln.wait(Duration::from_secs(10)).code(), Some(143));
    assert!(!kiln.socket.exists());
    assert!(
        kiln.stderr_text().contains("[vm-42:"),
        "{}",
        kiln.stderr_text()
    );
}
