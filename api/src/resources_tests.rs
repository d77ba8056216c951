use std::path::Path;

use super::*;

fn existing_file() -> String {
    std::env::current_exe()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn image(name: &str) -> String {
    let path = std::env::temp_dir().join(format!("kiln-res-{}-{name}.img", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    path.to_string_lossy().into_owned()
}

fn drive(id: &str, path: &str, root: bool) -> Drive {
    Drive {
        drive_id: id.into(),
        path_on_host: Some(path.into()),
        is_root_device: root,
        partuuid: None,
        is_read_only: false,
        cache_type: None,
        rate_limiter: None,
        io_engine: None,
        socket: None,
    }
}

fn resources() -> Resources {
    Resources::new(ConsoleConfig::None)
}

#[test]
fn defaults_are_firecrackers() {
    let config = resources().vm_config();
    assert_eq!((config.cpus, config.memory_mib), (1, 128));
    assert_eq!(config.huge_pages, HugePages::Transparent);
    assert!(!config.default_cmdline);
    assert_eq!(config.full_cmdline(), FIRECRACKER_DEFAULT_CMDLINE);
}

#[test]
fn boot_args_replace_the_default_command_line() {
    let mut resources = resources();
    resources
        .set_boot_source(BootSource {
            kernel_image_path: existing_file(),
            initrd_path: None,
            boot_args: Some("console=ttyS0 reboot=k".into()),
        })
        .unwrap();
    assert_eq!(
        resources.vm_config().full_cmdline(),
        "console=ttyS0 reboot=k"
    );
}

#[test]
fn a_missing_kernel_or_initrd_is_refused_and_nothing_changes() {
    let mut resources = resources();
    let err = resources
        .set_boot_source(BootSource {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            ..BootSource::default()
        })
        .unwrap_err();
    assert_eq!(
        err.message,
        "Boot source error: kernel image '/nonexistent/vmlinux' does not exist"
    );
    let err = resources
        .set_boot_source(BootSource {
            kernel_image_path: existing_file(),
            initrd_path: Some("/nonexistent/initrd".into()),
            boot_args: None,
        })
        .unwrap_err();
    assert!(err
        .message
        .contains("initrd '/nonexistent/initrd' does not exist"));
    let err = resources
        .set_boot_source(BootSource {
            kernel_image_path: existing_file(),
            initrd_path: None,
            boot_args: Some("x".repeat(3000)),
        })
        .unwrap_err();
    assert!(
        err.message.contains("kernel command line is 3000 bytes"),
        "{err:?}"
    );
    assert_eq!(resources.boot_source, None);
}

#[test]
fn machine_updates_apply_whole_or_not_at_all() {
    let mut resources = resources();
    resources
        .update_machine(&MachineConfigUpdate {
            vcpu_count: Some(2),
            mem_size_mib: Some(256),
            huge_pages: Some(HugePages::None),
            ..MachineConfigUpdate::default()
        })
        .unwrap();
    assert_eq!(resources.machine.vcpu_count, 2);
    for (update, expected) in [
        (
            MachineConfigUpdate {
                vcpu_count: Some(0),
                ..MachineConfigUpdate::default()
            },
            "invalid vCPU count 0",
        ),
        (
            MachineConfigUpdate {
                mem_size_mib: Some(16),
                ..MachineConfigUpdate::default()
            },
            "guest memory of 16 MiB is too small",
        ),
        (
            MachineConfigUpdate {
                mem_size_mib: Some(129),
                huge_pages: Some(HugePages::Hugetlbfs2M),
                ..MachineConfigUpdate::default()
            },
            "not a multiple of the 2 MiB huge page size",
        ),
        (
            MachineConfigUpdate {
                vcpu_count: Some(4),
                smt: Some(true),
                ..MachineConfigUpdate::default()
            },
            "smt (simultaneous multithreading) is not supported by Kiln",
        ),
        (
            MachineConfigUpdate {
                cpu_template: Some(CpuTemplate::T2),
                ..MachineConfigUpdate::default()
            },
            "cpu_template T2 is not supported by Kiln",
        ),
    ] {
        let err = resources.update_machine(&update).unwrap_err();
        assert!(err.message.starts_with("Machine config error: "), "{err:?}");
        assert!(err.message.contains(expected), "{err:?}");
    }
    assert_eq!(resources.machine.vcpu_count, 2);
    assert_eq!(resources.machine.mem_size_mib, 256);
    // Off values of the unimplemented fields are what Kiln does anyway.
    resources
        .update_machine(&MachineConfigUpdate {
            smt: Some(false),
            cpu_template: Some(CpuTemplate::None),
            ..MachineConfigUpdate::default()
        })
        .unwrap();
    resources
        .update_machine(&MachineConfigUpdate {
            track_dirty_pages: Some(true),
            ..MachineConfigUpdate::default()
        })
        .unwrap();
    assert!(resources.vm_config().track_dirty_pages);
}

#[test]
fn the_root_drive_is_first_and_unique() {
    let (a, b, root) = (image("a"), image("b"), image("root"));
    let mut resources = resources();
    resources.put_drive(drive("data", &a, false)).unwrap();
    resources.put_drive(drive("rootfs", &root, true)).unwrap();
    resources.put_drive(drive("more", &b, false)).unwrap();
    let ids: Vec<&str> = resources
        .drives
        .iter()
        .map(|d| d.drive_id.as_str())
        .collect();
    assert_eq!(ids, ["rootfs", "data", "more"]);
    let config = resources.vm_config();
    assert!(config.disks[0].root);
    assert_eq!(config.disks[0].id.as_deref(), Some("rootfs"));
    assert!(config.full_cmdline().starts_with("root=/dev/vda rw"));

    let err = resources.put_drive(drive("other", &a, true)).unwrap_err();
    assert_eq!(
        err.message,
        "Drive config error: A root block device already exists!"
    );
    // Updating a drive by id replaces it in place; making "data" root moves it first.
    resources.put_drive(drive("rootfs", &root, false)).unwrap();
    resources.put_drive(drive("data", &a, true)).unwrap();
    let ids: Vec<&str> = resources
        .drives
        .iter()
        .map(|d| d.drive_id.as_str())
        .collect();
    assert_eq!(ids, ["data", "rootfs", "more"]);
    for path in [a, b, root] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn drives_kiln_cannot_serve_are_refused_by_field() {
    let a = image("refused");
    let mut resources = resources();
    let cases = [
        (
            Drive {
                path_on_host: Some("/nonexistent/disk.img".into()),
                ..drive("d", &a, false)
            },
            "'/nonexistent/disk.img') does not exist",
        ),
        (
            Drive {
                path_on_host: None,
                ..drive("d", &a, false)
            },
            "path_on_host is required",
        ),
        (
            Drive {
                socket: Some("/tmp/vhost.sock".into()),
                ..drive("d", &a, false)
            },
            "socket (a vhost-user block backend) is not supported",
        ),
        (
            Drive {
                rate_limiter: Some(serde_json::json!({"ops": {"size": 1, "refill_time": 1}})),
                ..drive("d", &a, false)
            },
            "rate_limiter is not supported",
        ),
        (
            Drive {
                io_engine: Some(IoEngine::Async),
                ..drive("d", &a, false)
            },
            "io_engine Async is not supported",
        ),
        (
            Drive {
                partuuid: Some("abc".into()),
                ..drive("d", &a, false)
            },
            "not the root disk",
        ),
    ];
    for (bad, expected) in cases {
        let err = resources.put_drive(bad).unwrap_err();
        assert!(err.message.contains(expected), "{expected}: {err:?}");
    }
    assert!(resources.drives.is_empty());
    resources
        .put_drive(Drive {
            rate_limiter: Some(serde_json::Value::Null),
            io_engine: Some(IoEngine::Sync),
            cache_type: Some(CacheType::Writeback),
            ..drive("d", &a, false)
        })
        .unwrap();
    std::fs::remove_file(&a).unwrap();
    assert!(!Path::new(&a).exists());
}

#[test]
fn partuuid_boots_from_the_partition_and_long_ids_keep_the_default_serial() {
    let a = image("part");
    let mut resources = resources();
    resources
        .put_drive(Drive {
            partuuid: Some("0eaa91a0-01".into()),
            is_read_only: true,
            ..drive("a_drive_id_longer_than_twenty_bytes", &a, true)
        })
        .unwrap();
    let config = resources.vm_config();
    assert!(config
        .full_cmdline()
        .starts_with("root=PARTUUID=0eaa91a0-01 ro"));
    assert_eq!(config.disks[0].id, None);
    assert!(config.disks[0].readonly);
    std::fs::remove_file(&a).unwrap();
}

fn interface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterface {
    NetworkInterface {
        iface_id: id.into(),
        host_dev_name: tap.into(),
        guest_mac: mac.map(String::from),
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    }
}

fn net_error(resources: &mut Resources, interface: NetworkInterface) -> String {
    let before = resources.clone();
    let err = resources
        .put_network_interface(interface)
        .expect_err("refused");
    assert_eq!(
        *resources, before,
        "a refused interface changed the resources"
    );
    err.message
}

#[test]
fn network_interfaces_keep_their_order_and_are_replaced_by_id() {
    let mut resources = resources();
    let eth0 = interface("eth0", "tap0", Some("06:00:00:00:00:01"));
    resources.put_network_interface(eth0).unwrap();
    resources
        .put_network_interface(interface("eth1", "tap1", None))
        .unwrap();
    // The same id again replaces it in place (a new TAP and MAC).
    resources
        .put_network_interface(interface("eth0", "tap2", Some("06:00:00:00:00:02")))
        .unwrap();
    let nets = resources.vm_config().nets;
    let taps: Vec<_> = nets.iter().map(|n| n.tap.clone().unwrap()).collect();
    assert_eq!(taps, ["tap2", "tap1"]);
    assert_eq!(
        nets[0].mac.map(String::from).as_deref(),
        Some("06:00:00:00:00:02")
    );
    assert_eq!(nets[1].mac, None, "Kiln derives a stable MAC for eth1");
}

#[test]
fn bad_network_interfaces_are_refused_with_the_reason() {
    let mut resources = resources();
    resources
        .put_network_interface(interface("eth0", "tap0", Some("06:00:00:00:00:01")))
        .unwrap();
    assert_eq!(
        net_error(
            &mut resources,
            interface("eth1", "tap1", Some("06:00:00:00:00:01"))
        ),
        "Network config error: The guest MAC address 06:00:00:00:00:01 is already in use."
    );
    assert_eq!(
        net_error(&mut resources, interface("eth1", "tap0", None)),
        "Network config error: The host device name tap0 is already in use."
    );
    let multicast = net_error(
        &mut resources,
        interface("eth1", "tap1", Some("01:00:5e:00:00:01")),
    );
    assert!(multicast.contains("guest_mac"), "{multicast}");
    let malformed = net_error(&mut resources, interface("eth1", "tap1", Some("06:00:00")));
    assert!(malformed.contains("guest_mac"), "{malformed}");
    let mut limited = interface("eth1", "tap1", None);
    limited.tx_rate_limiter = Some(serde_json::json!({"bandwidth": {"size": 1, "refill_time": 1}}));
    assert!(net_error(&mut resources, limited).contains("tx_rate_limiter is not supported"));
    let mut mtu = interface("eth1", "tap1", None);
    mtu.mtu = Some(9000);
    assert!(net_error(&mut resources, mtu).contains("mtu is not supported"));
}

#[test]
fn entropy_attaches_the_rng_with_its_bandwidth_as_a_rate() {
    let mut resources = resources();
    assert!(
        !resources.vm_config().rng.enabled,
        "no entropy device before PUT /entropy"
    );
    resources
        .put_entropy(EntropyDevice { rate_limiter: None })
        .unwrap();
    let rng = resources.vm_config().rng;
    assert!(rng.enabled);
    assert_eq!(rng.rate_bytes_per_sec, None);
    let limited = serde_json::json!({"bandwidth": {"size": 1000, "refill_time": 100}});
    resources
        .put_entropy(EntropyDevice {
            rate_limiter: Some(limited),
        })
        .unwrap();
    assert_eq!(resources.vm_config().rng.rate_bytes_per_sec, Some(10_000));
    for refused in [
        serde_json::json!({"ops": {"size": 1, "refill_time": 1}}),
        serde_json::json!({"bandwidth": {"size": 1, "refill_time": 1, "one_time_burst": 5}}),
        serde_json::json!({"bandwidth": {"size": 0, "refill_time": 1}}),
        serde_json::json!({"bandwidth": {"size": 10}}),
        serde_json::json!({"weird": 1}),
    ] {
        let before = resources.clone();
        let err = resources
            .put_entropy(EntropyDevice {
                rate_limiter: Some(refused.clone()),
            })
            .expect_err("refused");
        assert!(
            err.message.starts_with("Entropy device error: "),
            "{refused}: {}",
            err.message
        );
        assert_eq!(resources, before);
    }
}
