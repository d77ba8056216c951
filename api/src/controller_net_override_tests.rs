//! `network_overrides` of `PUT /snapshot/load`: a clone of a NIC guest on its own TAP.

use super::*;

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-api-no-{}-{name}", std::process::id()))
}

/// A TAP name unique to this test process (IFNAMSIZ: at most 15 bytes).
fn tap_name(tag: &str) -> String {
    format!("kno{tag}{}", std::process::id() % 100_000)
}

fn tap_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// A paused count guest with NIC `eth0` on TAP `tap` (Kiln creates it), snapshotted to
/// `state` + `memory`.
fn nic_snapshot(tap: &str, state: &std::path::Path, memory: &std::path::Path) {
    let (mut source, started, _) = controller();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Count.path().display(),
        Params::with_n(1 << 60).cmdline()
    );
    let nic = format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}"}}"#);
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    for (method, path, body) in [
        (Method::Put, "/boot-source", boot.as_str()),
        (
            Method::Put,
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
        ),
        (Method::Put, "/network-interfaces/eth0", nic.as_str()),
        (
            Method::Put,
            "/actions",
            r#"{"action_type": "InstanceStart"}"#,
        ),
        (Method::Patch, "/vm", r#"{"state": "Paused"}"#),
        (Method::Put, "/snapshot/create", create.as_str()),
    ] {
        let response = request(&mut source, method, path, Some(body));
        assert_eq!(response.status, 204, "{path}: {response:?}");
    }
    let running = started.try_recv().expect("the source VM was handed over");
    assert!(tap_exists(tap), "the source runs on {tap}");
    source.vm().unwrap().stop();
    running.wait().unwrap();
}

fn load_body(state: &std::path::Path, memory: &std::path::Path, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "resume_vm": true{extra}}}"#,
        state.display(),
        memory.display()
    )
}

fn load_refused(state: &std::path::Path, memory: &std::path::Path, extra: &str) -> String {
    let (mut clone, started, _) = controller();
    let body = load_body(state, memory, extra);
    let response = request(&mut clone, Method::Put, "/snapshot/load", Some(&body));
    let message = fault_message(&response);
    assert!(started.try_recv().is_err(), "nothing started: {message}");
    let info = json_body(&request(&mut clone, Method::Get, "/", None));
    assert_eq!(info["state"], "Not started", "{message}");
    message
}

#[test]
fn a_clone_of_a_nic_snapshot_runs_on_the_tap_the_load_names_with_the_same_mac() {
    let [state, memory] = ["nic.state", "nic.mem"].map(scratch);
    let (source_tap, clone_tap) = (tap_name("a"), tap_name("b"));
    nic_snapshot(&source_tap, &state, &memory);
    let saved = kiln_vmm::snapshot::read_state_file(&state).unwrap();
    let saved_mac = saved.config.net_macs()[0].to_string();
    assert_eq!(saved.config.nets[0].id.as_deref(), Some("eth0"));

    let (mut clone, restored, _) = controller();
    let extra = format!(
        r#", "network_overrides": [{{"iface_id": "eth0", "host_dev_name": "{clone_tap}"}}]"#
    );
    let body = load_body(&state, &memory, &extra);
    let response = request(&mut clone, Method::Put, "/snapshot/load", Some(&body));
    assert_eq!(response.status, 204, "{response:?}");
    let running = restored.try_recv().expect("the clone was handed over");
    assert!(tap_exists(&clone_tap), "the clone's NIC is on {clone_tap}");
    let full = json_body(&request(&mut clone, Method::Get, "/vm/config", None));
    let nic = &full["network-interfaces"][0];
    assert_eq!(nic["iface_id"], "eth0");
    assert_eq!(nic["host_dev_name"], clone_tap.as_str());
    // The guest keeps its address although the default MAC derives from the TAP's name.
    assert_eq!(nic["guest_mac"], saved_mac.as_str());
    let info = json_body(&request(&mut clone, Method::Get, "/", None));
    assert_eq!(info["state"], "Running");
    clone.vm().unwrap().stop();
    assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);

    // Bad overrides: refused by name, nothing started.
    let unknown = load_refused(
        &state,
        &memory,
        r#", "network_overrides": [{"iface_id": "eth9", "host_dev_name": "x"}]"#,
    );
    assert!(
        unknown.starts_with("Load snapshot error:")
            && unknown.contains("interface 'eth9', which the snapshot does not have")
            && unknown.contains("its interfaces: eth0"),
        "{unknown}"
    );
    let twice = load_refused(
        &state,
        &memory,
        r#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "x"},
                                     {"iface_id": "eth0", "host_dev_name": "y"}]"#,
    );
    assert!(twice.contains("'eth0' is overridden twice"), "{twice}");
    let empty = load_refused(
        &state,
        &memory,
        r#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": " "}]"#,
    );
    assert!(empty.contains("must not be empty"), "{empty}");
    for path in [&state, &memory] {
        let _ = std::fs::remove_file(path);
    }
}
