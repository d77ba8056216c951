//! `vsock_override` of `PUT /snapshot/load`: clones of one vsock guest, each on its own socket.

use super::*;

fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kiln-api-vo-{}-{name}", std::process::id()))
}

/// A paused count guest with a vsock device on `uds`, snapshotted to `state` + `memory`.
fn vsock_snapshot(uds: &std::path::Path, state: &std::path::Path, memory: &std::path::Path) {
    let (mut source, started, _) = controller();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Count.path().display(),
        Params::with_n(1 << 60).cmdline()
    );
    let vsock = format!(r#"{{"guest_cid": 5, "uds_path": "{}"}}"#, uds.display());
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
        (Method::Put, "/vsock", vsock.as_str()),
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
    source.vm().unwrap().stop();
    running.wait().unwrap();
}

fn load_body(state: &std::path::Path, memory: &std::path::Path, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true{extra}}}"#,
        state.display(),
        memory.display()
    )
}

#[test]
fn clones_of_a_vsock_snapshot_listen_on_the_socket_each_load_names() {
    let [original, first, second, state, memory] =
        ["orig.sock", "c1.sock", "c2.sock", "vm.state", "vm.mem"].map(scratch);
    for path in [&original, &first, &second] {
        let _ = std::fs::remove_file(path);
    }
    vsock_snapshot(&original, &state, &memory);
    // The source's socket may stay behind (a killed Kiln leaves it): the clones do not need it.
    let override_to = |uds: &std::path::Path| {
        format!(r#", "vsock_override": {{"uds_path": "{}"}}"#, uds.display())
    };

    let (mut clone1, restored1, _) = controller();
    let body = load_body(&state, &memory, &override_to(&first));
    let response = request(&mut clone1, Method::Put, "/snapshot/load", Some(&body));
    assert_eq!(response.status, 204, "{response:?}");
    let running1 = restored1.try_recv().expect("clone 1 was handed over");
    let full = json_body(&request(&mut clone1, Method::Get, "/vm/config", None));
    assert_eq!(full["vsock"]["uds_path"], first.display().to_string());
    assert_eq!(full["vsock"]["guest_cid"], 5);
    assert!(
        std::os::unix::net::UnixStream::connect(&first).is_ok(),
        "clone 1 should listen on its own socket"
    );

    // A second clone on the first one's socket is refused by name; on its own it runs.
    let (mut clone2, restored2, _) = controller();
    let body = load_body(&state, &memory, &override_to(&first));
    let message = fault_message(&request(
        &mut clone2,
        Method::Put,
        "/snapshot/load",
        Some(&body),
    ));
    assert!(
        message.starts_with("Load snapshot error:") && message.contains("already exists"),
        "{message}"
    );
    let body = load_body(&state, &memory, &override_to(&second));
    let response = request(&mut clone2, Method::Put, "/snapshot/load", Some(&body));
    assert_eq!(response.status, 204, "{response:?}");
    let running2 = restored2.try_recv().expect("clone 2 was handed over");
    let info = json_body(&request(&mut clone2, Method::Get, "/", None));
    assert_eq!(info["state"], "Running");
    assert!(
        std::os::unix::net::UnixStream::connect(&second).is_ok(),
        "clone 2 should listen on its own socket"
    );

    // An empty path is refused before anything is restored.
    let (mut clone3, _, _) = controller();
    let body = load_body(&state, &memory, r#", "vsock_override": {"uds_path": ""}"#);
    let message = fault_message(&request(
        &mut clone3,
        Method::Put,
        "/snapshot/load",
        Some(&body),
    ));
    assert!(message.contains("uds_path is empty"), "{message}");

    for (controller, running) in [(&mut clone1, running1), (&mut clone2, running2)] {
        controller.vm().unwrap().stop();
        assert_eq!(running.wait().unwrap(), VmOutcome::Stopped);
    }
    for path in [&original, &first, &second, &state, &memory] {
        let _ = std::fs::remove_file(path);
    }
}

#[test]
fn a_vsock_override_for_a_snapshot_without_vsock_is_refused() {
    let [state, memory] = ["novsock.state", "novsock.mem"].map(scratch);
    let (mut source, started, _) = controller();
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#,
        GuestKind::Count.path().display(),
        Params::with_n(1 << 60).cmdline()
    );
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    for (method, path, body) in [
        (Method::Put, "/boot-source", boot.as_str()),
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
    let running = started.try_recv().unwrap();
    source.vm().unwrap().stop();
    running.wait().unwrap();

    let (mut clone, _, _) = controller();
    let body = load_body(
        &state,
        &memory,
        r#", "vsock_override": {"uds_path": "/tmp/kiln-unused.sock"}"#,
    );
    let message = fault_message(&request(
        &mut clone,
        Method::Put,
        "/snapshot/load",
        Some(&body),
    ));
    assert!(
        message.contains("vsock device the snapshot does not have"),
        "{message}"
    );
    let info = json_body(&request(&mut clone, Method::Get, "/", None));
    assert_eq!(info["state"], "Not started");
    let _ = std::fs::remove_file(state);
    let _ = std::fs::remove_file(memory);
}
