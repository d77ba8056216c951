use super::*;

fn parse(method: Method, path: &str, body: Option<&str>) -> Result<Action, ApiError> {
    Action::parse(&method, path, body.map(str::as_bytes))
}

fn fault(method: Method, path: &str, body: Option<&str>) -> String {
    let err = parse(method, path, body).expect_err("refused");
    assert_eq!(err.status, 400);
    err.message
}

#[test]
fn gets_route_without_bodies() {
    for (path, action) in [
        ("/", Action::GetInstanceInfo),
        ("/version", Action::GetVersion),
        ("/vm/config", Action::GetFullConfig),
        ("/machine-config", Action::GetMachineConfig),
        ("/machine-config/", Action::GetMachineConfig),
    ] {
        assert_eq!(parse(Method::Get, path, None), Ok(action), "{path}");
    }
    assert_eq!(
        fault(Method::Get, "/machine-config", Some("{}")),
        "GET request cannot have a body."
    );
}

#[test]
fn puts_and_patches_need_a_body() {
    assert_eq!(
        fault(Method::Put, "/boot-source", None),
        "Empty PUT request."
    );
    assert_eq!(fault(Method::Patch, "/vm", None), "Empty PATCH request.");
    assert_eq!(
        fault(Method::Patch, "/machine-config", Some("{}")),
        "Empty PATCH request."
    );
}

#[test]
fn unknown_paths_and_methods_are_invalid() {
    assert_eq!(
        fault(Method::Get, "/nope", None),
        "Invalid request method and/or path: GET /nope."
    );
    assert_eq!(
        fault(Method::Put, "/version", Some("{}")),
        "Invalid request method and/or path: PUT /version."
    );
    assert_eq!(
        fault(Method::Other("DELETE".into()), "/drives/a", None),
        "Invalid request method and/or path: DELETE /drives/a."
    );
    assert_eq!(
        fault(Method::Get, "/vm", None),
        "Invalid request method and/or path: GET /vm."
    );
}

#[test]
fn boot_source_parses_and_refuses_unknown_fields_and_wrong_types() {
    assert_eq!(
        parse(
            Method::Put,
            "/boot-source",
            Some(
                r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0", "initrd_path": "/i"}"#
            )
        ),
        Ok(Action::PutBootSource(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: Some("/i".into()),
            boot_args: Some("console=ttyS0".into()),
        }))
    );
    let message = fault(
        Method::Put,
        "/boot-source",
        Some(r#"{"kernel_image_path": "/k", "kernel_args": "x"}"#),
    );
    assert!(
        message.starts_with("An error occurred when deserializing the json body of a request: ")
    );
    assert!(message.contains("unknown field `kernel_args`"), "{message}");
    let message = fault(
        Method::Put,
        "/boot-source",
        Some(r#"{"kernel_image_path": 7}"#),
    );
    assert!(
        message.contains("invalid type: integer `7`, expected a string"),
        "{message}"
    );
    let message = fault(Method::Put, "/boot-source", Some(r#"{"boot_args": "x"}"#));
    assert!(
        message.contains("missing field `kernel_image_path`"),
        "{message}"
    );
    let message = fault(Method::Put, "/boot-source", Some("{not json"));
    assert!(message.contains("key must be a string"), "{message}");
}

#[test]
fn machine_config_put_needs_counts_and_patch_takes_any() {
    let put = parse(
        Method::Put,
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#),
    )
    .unwrap();
    assert_eq!(
        put,
        Action::PutMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(2),
            mem_size_mib: Some(256),
            smt: Some(false),
            cpu_template: None,
            track_dirty_pages: Some(false),
            huge_pages: Some(HugePages::Hugetlbfs2M),
        })
    );
    let message = fault(Method::Put, "/machine-config", Some(r#"{"vcpu_count": 2}"#));
    assert!(
        message.contains("missing field `mem_size_mib`"),
        "{message}"
    );
    let message = fault(
        Method::Put,
        "/machine-config",
        Some(r#"{"vcpu_count": 300, "mem_size_mib": 256}"#),
    );
    assert!(message.contains("expected u8"), "{message}");
    let message = fault(
        Method::Put,
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "1G"}"#),
    );
    assert!(message.contains("unknown variant `1G`"), "{message}");
    assert_eq!(
        parse(
            Method::Patch,
            "/machine-config",
            Some(r#"{"mem_size_mib": 64}"#)
        ),
        Ok(Action::PatchMachineConfig(MachineConfigUpdate {
            mem_size_mib: Some(64),
            ..MachineConfigUpdate::default()
        }))
    );
    let message = fault(Method::Patch, "/machine-config", Some(r#"{"vcpus": 2}"#));
    assert!(message.contains("unknown field `vcpus`"), "{message}");
}

#[test]
fn drive_ids_come_from_the_path_and_must_match_the_body() {
    let body = r#"{"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": true, "is_read_only": false}"#;
    match parse(Method::Put, "/drives/rootfs", Some(body)).unwrap() {
        Action::PutDrive(drive) => {
            assert_eq!(drive.drive_id, "rootfs");
            assert!(drive.is_root_device);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fault(Method::Put, "/drives/other", Some(body)),
        "The id from the path does not match the id from the body!"
    );
    assert_eq!(
        fault(Method::Put, "/drives", Some(body)),
        "The ID cannot be empty."
    );
    assert_eq!(
        fault(Method::Put, "/drives/ro-ot", Some(body)),
        "API Resource IDs can only contain alphanumeric characters and underscores."
    );
    assert!(fault(Method::Put, "/drives/a/b", Some(body)).contains("more than one id"));
    let message = fault(
        Method::Put,
        "/drives/rootfs",
        Some(
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "readonly": true}"#,
        ),
    );
    assert!(message.contains("unknown field `readonly`"), "{message}");
    let message = fault(
        Method::Put,
        "/drives/rootfs",
        Some(r#"{"drive_id": "rootfs", "path_on_host": "/r"}"#),
    );
    assert!(
        message.contains("missing field `is_root_device`"),
        "{message}"
    );
    let message = fault(
        Method::Put,
        "/drives/rootfs",
        Some(
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "cache_type": "None"}"#,
        ),
    );
    assert!(message.contains("unknown variant `None`"), "{message}");
}

#[test]
fn drive_patches_parse() {
    assert_eq!(
        parse(
            Method::Patch,
            "/drives/data",
            Some(r#"{"drive_id": "data", "path_on_host": "/new.img"}"#)
        ),
        Ok(Action::PatchDrive(PartialDrive {
            drive_id: "data".into(),
            path_on_host: Some("/new.img".into()),
            rate_limiter: None,
        }))
    );
    let message = fault(
        Method::Patch,
        "/drives/data",
        Some(r#"{"drive_id": "data", "is_read_only": true}"#),
    );
    assert!(
        message.contains("unknown field `is_read_only`"),
        "{message}"
    );
}

#[test]
fn actions_and_vm_states_parse() {
    for (name, action) in [
        ("InstanceStart", ActionType::InstanceStart),
        ("SendCtrlAltDel", ActionType::SendCtrlAltDel),
        ("FlushMetrics", ActionType::FlushMetrics),
    ] {
        assert_eq!(
            parse(
                Method::Put,
                "/actions",
                Some(&format!(r#"{{"action_type": "{name}"}}"#))
            ),
            Ok(Action::Action(action))
        );
    }
    let message = fault(
        Method::Put,
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
    );
    assert!(message.contains("unknown variant `Reboot`"), "{message}");
    let message = fault(
        Method::Put,
        "/actions",
        Some(r#"{"action_type": "InstanceStart", "payload": 1}"#),
    );
    assert!(message.contains("unknown field `payload`"), "{message}");
    assert_eq!(
        parse(Method::Patch, "/vm", Some(r#"{"state": "Paused"}"#)),
        Ok(Action::PatchVm(VmStateChange::Paused))
    );
    assert_eq!(
        parse(Method::Patch, "/vm", Some(r#"{"state": "Resumed"}"#)),
        Ok(Action::PatchVm(VmStateChange::Resumed))
    );
    let message = fault(Method::Patch, "/vm", Some(r#"{"state": "Stopped"}"#));
    assert!(message.contains("unknown variant `Stopped`"), "{message}");
}

#[test]
fn logger_metrics_entropy_net_and_vsock_bodies_parse() {
    assert_eq!(
        parse(
            Method::Put,
            "/logger",
            Some(
                r#"{"log_path": "/tmp/l", "level": "Debug", "show_level": true, "show_log_origin": false}"#
            )
        ),
        Ok(Action::PutLogger(Logger {
            log_path: Some("/tmp/l".into()),
            level: Some("Debug".into()),
            show_level: Some(true),
            show_log_origin: Some(false),
            module: None,
        }))
    );
    assert_eq!(
        parse(
            Method::Put,
            "/metrics",
            Some(r#"{"metrics_path": "/tmp/m"}"#)
        ),
        Ok(Action::PutMetrics(Metrics {
            metrics_path: "/tmp/m".into()
        }))
    );
    assert!(fault(Method::Put, "/metrics", Some("{}")).contains("missing field `metrics_path`"));
    assert!(matches!(
        parse(Method::Put, "/entropy", Some("{}")),
        Ok(Action::PutEntropy(_))
    ));
    assert!(matches!(
        parse(
            Method::Put,
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#)
        ),
        Ok(Action::PutNetworkInterface(_))
    ));
    assert!(matches!(
        parse(
            Method::Put,
            "/vsock",
            Some(r#"{"guest_cid": 3, "uds_path": "/tmp/v.sock"}"#)
        ),
        Ok(Action::PutVsock(_))
    ));
}

#[test]
fn firecracker_endpoints_kiln_lacks_say_so() {
    for (method, path, body) in [
        (Method::Put, "/balloon", Some("{}")),
        (Method::Get, "/balloon/statistics", None),
        (Method::Put, "/mmds", Some("{}")),
        (Method::Put, "/cpu-config", Some("{}")),
        (Method::Put, "/serial", Some("{}")),
        (Method::Patch, "/network-interfaces/eth0", Some("{}")),
    ] {
        assert!(
            matches!(parse(method, path, body), Ok(Action::NotImplemented(_))),
            "{path}"
        );
    }
}

#[test]
fn snapshot_requests_parse() {
    assert_eq!(
        parse(
            Method::Put,
            "/snapshot/create",
            Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}"#)
        ),
        Ok(Action::CreateSnapshot(SnapshotCreateParams {
            mem_file_path: "/m".into(),
            snapshot_path: "/s".into(),
            snapshot_type: Some(SnapshotType::Diff),
        }))
    );
    let message = fault(
        Method::Put,
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "version": "1.0"}"#),
    );
    assert!(message.contains("unknown field `version`"), "{message}");
    match parse(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "File", "backend_path": "/m"}, "resume_vm": true}"#),
    )
    .unwrap()
    {
        Action::LoadSnapshot(load) => {
            assert!(load.resume_vm);
            assert_eq!(load.mem_backend.unwrap().backend_path, "/m");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        fault(Method::Put, "/snapshot/load", Some("{}")).contains("missing field `snapshot_path`")
    );
    match parse(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "vsock_override": {"uds_path": "/c.sock"}}"#),
    )
    .unwrap()
    {
        Action::LoadSnapshot(load) => {
            assert_eq!(load.vsock_override.unwrap().uds_path, "/c.sock");
        }
        other => panic!("{other:?}"),
    }
    let message = fault(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "vsock_override": {"uds_path": "/c", "cid": 4}}"#),
    );
    assert!(message.contains("unknown field `cid`"), "{message}");
    let message = fault(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "vsock_override": {}}"#),
    );
    assert!(message.contains("missing field `uds_path`"), "{message}");
    match parse(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "mem_file_path": "/m", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}]}"#),
    )
    .unwrap()
    {
        Action::LoadSnapshot(load) => assert_eq!(
            load.network_overrides,
            [NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "tap7".into()
            }]
        ),
        other => panic!("{other:?}"),
    }
    let message = fault(
        Method::Put,
        "/snapshot/load",
        Some(
            r#"{"snapshot_path": "/s", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "t", "guest_mac": "02:00:00:00:00:01"}]}"#,
        ),
    );
    assert!(message.contains("unknown field `guest_mac`"), "{message}");
    let message = fault(
        Method::Put,
        "/snapshot/load",
        Some(r#"{"snapshot_path": "/s", "network_overrides": [{"iface_id": "eth0"}]}"#),
    );
    assert!(
        message.contains("missing field `host_dev_name`"),
        "{message}"
    );
    assert!(fault(Method::Put, "/snapshot/other", Some("{}")).contains("Invalid request"));
}

#[test]
fn ordering_rules_follow_firecracker() {
    let pre_boot_only = [
        Action::PutBootSource(BootSource::default()),
        Action::PutMachineConfig(MachineConfigUpdate::default()),
        Action::PatchMachineConfig(MachineConfigUpdate::default()),
        Action::PutLogger(Logger::default()),
        Action::PutMetrics(Metrics {
            metrics_path: String::new(),
        }),
        Action::PutEntropy(EntropyDevice { rate_limiter: None }),
        Action::PutVsock(Vsock {
            guest_cid: 3,
            uds_path: String::new(),
            vsock_id: None,
        }),
        Action::Action(ActionType::InstanceStart),
    ];
    for action in pre_boot_only {
        assert!(action.allowed(false) && !action.allowed(true), "{action:?}");
    }
    let post_boot_only = [
        Action::PatchVm(VmStateChange::Paused),
        Action::Action(ActionType::FlushMetrics),
        Action::Action(ActionType::SendCtrlAltDel),
        Action::PatchDrive(PartialDrive {
            drive_id: "a".into(),
            path_on_host: None,
            rate_limiter: None,
        }),
    ];
    for action in post_boot_only {
        assert!(!action.allowed(false) && action.allowed(true), "{action:?}");
    }
    for action in [
        Action::GetInstanceInfo,
        Action::GetVersion,
        Action::GetFullConfig,
        Action::GetMachineConfig,
    ] {
        assert!(action.allowed(false) && action.allowed(true), "{action:?}");
    }
}
