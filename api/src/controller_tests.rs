//! The controller's ordering rules and request handling. Tests that start a VM use the `count`
//! micro guest on /dev/kvm and fail with the reason when it is unusable.

use std::sync::mpsc::{channel, Receiver};
use std::sync::Mutex;

use kiln_test_guests::{GuestKind, Params};
use kiln_vmm::{ConsoleConfig, VmOutcome};

use super::*;
use crate::http::Method;

/// Records every logger configuration it is given.
#[derive(Default)]
struct RecordingLogging(Mutex<Vec<Logger>>);

impl Logging for RecordingLogging {
    fn configure(&self, config: &Logger) -> Result<(), String> {
        if config.log_path.as_deref() == Some("/nonexistent/dir/log") {
            return Err("cannot open '/nonexistent/dir/log'".into());
        }
        self.0.lock().unwrap().push(config.clone());
        Ok(())
    }
}

fn controller() -> (Controller, Receiver<RunningVm>, Arc<RecordingLogging>) {
    let (sender, receiver) = channel();
    let logging = Arc::new(RecordingLogging::default());
    let sender = Mutex::new(sender);
    let controller = Controller::new(
        "test-vm",
        Resources::new(ConsoleConfig::None),
        logging.clone(),
        Box::new(move |running| {
            let _ = sender.lock().unwrap().send(running);
        }),
    );
    (controller, receiver, logging)
}

fn request(
    controller: &mut Controller,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Response {
    match Action::parse(&method, path, body.map(str::as_bytes)) {
        Ok(action) => controller.handle(action),
        Err(err) => Response::fault(err.status, &err.message),
    }
}

fn fault_message(response: &Response) -> String {
    assert_eq!(response.status, 400, "{response:?}");
    let body: serde_json::Value = serde_json::from_str(response.body.as_ref().unwrap()).unwrap();
    body["fault_message"].as_str().unwrap().to_string()
}

fn json_body(response: &Response) -> serde_json::Value {
    assert_eq!(response.status, 200, "{response:?}");
    serde_json::from_str(response.body.as_ref().unwrap()).unwrap()
}

#[test]
fn post_boot_requests_are_refused_before_the_start() {
    let (mut controller, _, _) = controller();
    for (method, path, body) in [
        (Method::Patch, "/vm", Some(r#"{"state": "Paused"}"#)),
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        ),
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        ),
        (
            Method::Patch,
            "/drives/a",
            Some(r#"{"drive_id": "a", "path_on_host": "/x"}"#),
        ),
    ] {
        assert_eq!(
            fault_message(&request(&mut controller, method, path, body)),
            "The requested operation is not supported before starting the microVM.",
            "{path}"
        );
    }
}

#[test]
fn instance_info_version_and_defaults_before_the_start() {
    let (mut controller, _, _) = controller();
    let info = json_body(&request(&mut controller, Method::Get, "/", None));
    assert_eq!(
        info,
        serde_json::json!({
            "app_name": "Kiln",
            "id": "test-vm",
            "state": "Not started",
            "vmm_version": FIRECRACKER_API_VERSION,
        })
    );
    let version = json_body(&request(&mut controller, Method::Get, "/version", None));
    assert_eq!(version["firecracker_version"], FIRECRACKER_API_VERSION);
    let machine = json_body(&request(
        &mut controller,
        Method::Get,
        "/machine-config",
        None,
    ));
    assert_eq!(
        machine,
        serde_json::json!({
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": false,
            "track_dirty_pages": false,
            "huge_pages": "Transparent",
        })
    );
    let full = json_body(&request(&mut controller, Method::Get, "/vm/config", None));
    for key in [
        "balloon",
        "drives",
        "boot-source",
        "cpu-config",
        "logger",
        "machine-config",
        "metrics",
        "mmds-config",
        "network-interfaces",
        "vsock",
        "entropy",
    ] {
        assert!(
            full.get(key).is_some(),
            "GET /vm/config lacks {key}: {full}"
        );
    }
    assert_eq!(full["machine-config"], machine);
}

#[test]
fn network_interfaces_and_entropy_reach_the_vm_config() {
    let (mut controller, _, _) = controller();
    let eth0 = r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}"#;
    let put = |controller: &mut Controller, path: &str, body: &str| {
        request(controller, Method::Put, path, Some(body)).status
    };
    assert_eq!(put(&mut controller, "/network-interfaces/eth0", eth0), 204);
    assert_eq!(put(&mut controller, "/entropy", "{}"), 204);
    let full = json_body(&request(&mut controller, Method::Get, "/vm/config", None));
    assert_eq!(full["network-interfaces"][0]["host_dev_name"], "tap0");
    assert_eq!(full["entropy"], serde_json::json!({ "rate_limiter": null }));
    let config = controller.resources().vm_config();
    assert_eq!(config.nets.len(), 1);
    assert_eq!(config.nets[0].tap.as_deref(), Some("tap0"));
    assert_eq!(
        config.nets[0].mac.map(String::from).as_deref(),
        Some("06:00:ac:10:00:02")
    );
    assert!(config.rng.enabled);
    // Another interface on the same TAP is refused by name, and changes nothing.
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/network-interfaces/eth1",
        Some(r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#),
    ));
    assert_eq!(
        message,
        "Network config error: The host device name tap0 is already in use."
    );
    assert_eq!(controller.resources().vm_config().nets.len(), 1);
}

#[test]
fn devices_kiln_lacks_are_refused_by_name() {
    let (mut controller, _, _) = controller();
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": true}"#),
    ));
    assert_eq!(
        message,
        "Kiln does not implement the balloon device (/balloon)."
    );
}

#[test]
fn logger_and_metrics_are_configured_once_and_checked() {
    let (mut controller, _, logging) = controller();
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/logger",
        Some(r#"{"level": "Loud"}"#),
    ));
    assert!(
        message.starts_with("Logger error: invalid level 'Loud'"),
        "{message}"
    );
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/logger",
        Some(r#"{"log_path": "/nonexistent/dir/log"}"#),
    ));
    assert!(message.contains("cannot open"), "{message}");
    let response = request(
        &mut controller,
        Method::Put,
        "/logger",
        Some(r#"{"level": "warning", "show_level": true}"#),
    );
    assert_eq!(response.status, 204);
    assert_eq!(logging.0.lock().unwrap().len(), 1);

    let path = std::env::temp_dir().join(format!("kiln-ctl-metrics-{}", std::process::id()));
    let body = format!(r#"{{"metrics_path": "{}"}}"#, path.display());
    assert_eq!(
        request(&mut controller, Method::Put, "/metrics", Some(&body)).status,
        204
    );
    assert_eq!(
        fault_message(&request(
            &mut controller,
            Method::Put,
            "/metrics",
            Some(&body)
        )),
        "Metrics error: Reinitialization of metrics not allowed."
    );
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/metrics",
        Some(r#"{"metrics_path": "/nonexistent/dir/m"}"#),
    ));
    assert!(message.contains("Reinitialization"), "{message}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn instance_start_without_a_kernel_is_refused_and_the_vm_stays_unstarted() {
    let (mut controller, started, _) = controller();
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    ));
    assert!(
        message.starts_with("Start microvm error: no kernel given"),
        "{message}"
    );
    assert!(controller.vm().is_none());
    assert!(started.try_recv().is_err());
}

#[test]
fn the_lifecycle_through_the_controller() {
    let (mut controller, started, _) = controller();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Count.path().display(),
        Params::with_n(1 << 60).cmdline()
    );
    for (method, path, body) in [
        (Method::Put, "/boot-source", Some(boot.as_str())),
        (
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
        ),
    ] {
        let response = request(&mut controller, method, path, body);
        assert_eq!(response.status, 204, "{path}: {response:?}");
    }
    let response = request(
        &mut controller,
        Method::Put,
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(
        response.status, 204,
        "InstanceStart failed (is /dev/kvm usable?): {response:?}"
    );
    let running = started.try_recv().expect("the VM was handed over");
    let state = |controller: &mut Controller| {
        json_body(&request(controller, Method::Get, "/", None))["state"].clone()
    };
    assert_eq!(state(&mut controller), "Running");

    for (method, path, body) in [
        (
            Method::Put,
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        ),
        (Method::Put, "/boot-source", Some(boot.as_str())),
        (
            Method::Patch,
            "/machine-config",
            Some(r#"{"vcpu_count": 1}"#),
        ),
        (Method::Put, "/logger", Some(r#"{"level": "Info"}"#)),
        (
            Method::Put,
            "/metrics",
            Some(r#"{"metrics_path": "/tmp/m"}"#),
        ),
    ] {
        assert_eq!(
            fault_message(&request(&mut controller, method, path, body)),
            "The requested operation is not supported after starting the microVM.",
            "{path}"
        );
    }
    // GETs still work and show what runs.
    let machine = json_body(&request(
        &mut controller,
        Method::Get,
        "/machine-config",
        None,
    ));
    assert_eq!(machine["vcpu_count"], 2);

    let pause = Some(r#"{"state": "Paused"}"#);
    assert_eq!(
        request(&mut controller, Method::Patch, "/vm", pause).status,
        204
    );
    assert_eq!(state(&mut controller), "Paused");
    assert_eq!(
        request(&mut controller, Method::Patch, "/vm", pause).status,
        204
    );
    let resume = Some(r#"{"state": "Resumed"}"#);
    assert_eq!(
        request(&mut controller, Method::Patch, "/vm", resume).status,
        204
    );
    assert_eq!(state(&mut controller), "Running");
    // Without metrics configured FlushMetrics writes nothing and succeeds, as in Firecracker.
    let flush = Some(r#"{"action_type": "FlushMetrics"}"#);
    assert_eq!(
        request(&mut controller, Method::Put, "/actions", flush).status,
        204
    );
    // The keys reach the keyboard; this guest does not read them, so within a few presses its
    // buffer is full.
    let ctrl_alt_del = Some(r#"{"action_type": "SendCtrlAltDel"}"#);
    assert_eq!(
        request(&mut controller, Method::Put, "/actions", ctrl_alt_del).status,
        204
    );
    let refused = (0..4)
        .map(|_| request(&mut controller, Method::Put, "/actions", ctrl_alt_del))
        .find(|response| response.status != 204)
        .expect("an unread keyboard never filled up");
    let message = fault_message(&refused);
    assert!(message.contains("not reading its keyboard"), "{message}");
    let message = fault_message(&request(
        &mut controller,
        Method::Patch,
        "/drives/nope",
        Some(r#"{"drive_id": "nope", "path_on_host": "/x"}"#),
    ));
    assert_eq!(message, "Drive config error: there is no drive 'nope'");

    controller.vm().unwrap().stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    assert_eq!(state(&mut controller), "Ended");
    let message = fault_message(&request(&mut controller, Method::Patch, "/vm", pause));
    assert!(message.contains("not running"), "{message}");
}

#[test]
fn a_snapshot_taken_over_the_api_loads_in_a_fresh_instance() {
    let dir = std::env::temp_dir();
    let state = dir.join(format!("kiln-api-snap-{}.state", std::process::id()));
    let memory = dir.join(format!("kiln-api-snap-{}.mem", std::process::id()));
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    let (mut source, started, _) = controller();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Count.path().display(),
        Params::with_n(1 << 60).cmdline()
    );
    assert_eq!(
        request(&mut source, Method::Put, "/boot-source", Some(&boot)).status,
        204
    );
    assert_eq!(
        request(
            &mut source,
            Method::Put,
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        )
        .status,
        204
    );
    assert_eq!(
        fault_message(&request(
            &mut source,
            Method::Put,
            "/snapshot/create",
            Some(&create)
        )),
        "The requested operation is not supported before starting the microVM."
    );
    let start = Some(r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(
        request(&mut source, Method::Put, "/actions", start).status,
        204
    );
    let running = started.try_recv().unwrap();
    let message = fault_message(&request(
        &mut source,
        Method::Put,
        "/snapshot/create",
        Some(&create),
    ));
    assert_eq!(
        message,
        "Create snapshot error: Cannot save the microVM state: Operation not allowed: \
         save/restore unavailable while running"
    );
    let pause = Some(r#"{"state": "Paused"}"#);
    assert_eq!(
        request(&mut source, Method::Patch, "/vm", pause).status,
        204
    );
    let response = request(&mut source, Method::Put, "/snapshot/create", Some(&create));
    assert_eq!(response.status, 204, "{response:?}");
    source.vm().unwrap().stop();
    running.wait().unwrap();

    let load = |extra: &str| {
        format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}{extra}}}"#,
            state.display(),
            memory.display()
        )
    };
    let (mut configured, _, _) = controller();
    assert_eq!(
        request(&mut configured, Method::Put, "/boot-source", Some(&boot)).status,
        204
    );
    let message = fault_message(&request(
        &mut configured,
        Method::Put,
        "/snapshot/load",
        Some(&load("")),
    ));
    assert!(
        message.contains("not allowed after configuring boot-specific resources"),
        "{message}"
    );

    let (mut fresh, restored, _) = controller();
    let uffd = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "/u.sock"}}}}"#,
        state.display()
    );
    let message = fault_message(&request(
        &mut fresh,
        Method::Put,
        "/snapshot/load",
        Some(&uffd),
    ));
    assert!(message.contains("Uffd is not supported"), "{message}");
    let response = request(
        &mut fresh,
        Method::Put,
        "/snapshot/load",
        Some(&load(r#", "resume_vm": true"#)),
    );
    assert_eq!(response.status, 204, "{response:?}");
    let running = restored
        .try_recv()
        .expect("the restored VM was handed over");
    let info = json_body(&request(&mut fresh, Method::Get, "/", None));
    assert_eq!(info["state"], "Running");
    let machine = json_body(&request(&mut fresh, Method::Get, "/machine-config", None));
    assert_eq!(machine["mem_size_mib"], 64);
    assert_eq!(
        fault_message(&request(
            &mut fresh,
            Method::Put,
            "/snapshot/load",
            Some(&load(""))
        )),
        "The requested operation is not supported after starting the microVM."
    );
    fresh.vm().unwrap().stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    let _ = std::fs::remove_file(state);
    let _ = std::fs::remove_file(memory);
}

#[test]
fn put_vsock_attaches_a_vsock_device_and_checks_it_first() {
    let (mut controller, _, _) = controller();
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/kiln-api-v.sock"}"#),
    ));
    assert!(
        message.starts_with("Vsock config error:") && message.contains("guest CID 2"),
        "{message}"
    );
    let message = fault_message(&request(
        &mut controller,
        Method::Put,
        "/vsock",
        Some(r#"{"guest_cid": 3, "uds_path": "/nonexistent-dir/v.sock"}"#),
    ));
    assert!(message.contains("not an existing directory"), "{message}");
    let full = json_body(&request(&mut controller, Method::Get, "/vm/config", None));
    assert!(full["vsock"].is_null(), "a refused vsock was kept: {full}");

    let uds = std::env::temp_dir().join(format!("kiln-api-vsock-{}.sock", std::process::id()));
    let body = format!(r#"{{"guest_cid": 7, "uds_path": "{}"}}"#, uds.display());
    assert_eq!(
        request(&mut controller, Method::Put, "/vsock", Some(&body)).status,
        204
    );
    let full = json_body(&request(&mut controller, Method::Get, "/vm/config", None));
    assert_eq!(full["vsock"]["guest_cid"], 7);
    assert_eq!(full["vsock"]["uds_path"], uds.display().to_string());
    let vsock = controller
        .resources()
        .vm_config()
        .vsock
        .expect("the VM config has the vsock device");
    assert_eq!((vsock.cid, vsock.uds), (7, uds));
}

#[path = "controller_vsock_override_tests.rs"]
mod vsock_override;

#[path = "controller_net_override_tests.rs"]
mod net_override;
