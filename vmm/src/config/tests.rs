use super::*;

fn existing_file() -> PathBuf {
    std::env::current_exe().expect("test binary path")
}

fn valid_config() -> VmConfig {
    VmConfig::new(existing_file())
}

#[test]
fn memory_sizes_parse() {
    assert_eq!(parse_memory_mib("512"), Ok(512));
    assert_eq!(parse_memory_mib("512M"), Ok(512));
    assert_eq!(parse_memory_mib("512MiB"), Ok(512));
    assert_eq!(parse_memory_mib("2G"), Ok(2048));
    assert_eq!(parse_memory_mib("2Gi"), Ok(2048));
    assert_eq!(parse_memory_mib("131072K"), Ok(128));
    assert_eq!(parse_memory_mib(" 64m "), Ok(64));
}

#[test]
fn bad_memory_sizes_are_refused() {
    for bad in [
        "",
        "M",
        "-5M",
        "1.5G",
        "lots",
        "12X",
        "99999999999999999999G",
    ] {
        assert_eq!(
            parse_memory_mib(bad),
            Err(ConfigError::InvalidMemorySize(bad.to_string())),
            "{bad:?}"
        );
    }
    assert_eq!(
        parse_memory_mib("1000K"),
        Err(ConfigError::MemoryNotWholeMib("1000K".to_string()))
    );
}

#[test]
fn console_forms_parse() {
    assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
    assert_eq!("none".parse(), Ok(ConsoleConfig::None));
    assert_eq!(
        "file=/tmp/x.log".parse(),
        Ok(ConsoleConfig::File(PathBuf::from("/tmp/x.log")))
    );
    assert_eq!(
        "file=".parse::<ConsoleConfig>(),
        Err(ConfigError::InvalidConsole("file=".into()))
    );
    assert_eq!(
        "tty".parse::<ConsoleConfig>(),
        Err(ConfigError::InvalidConsole("tty".into()))
    );
}

#[test]
fn valid_config_passes() {
    assert_eq!(valid_config().validate(Some(1024)), Ok(()));
}

#[test]
fn missing_kernel_is_named() {
    let config = VmConfig::new("/nonexistent/vmlinux");
    let err = config.validate(None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel image '/nonexistent/vmlinux' does not exist"
    );
    assert_eq!(
        VmConfig::new("").validate(None),
        Err(ConfigError::MissingKernel)
    );
}

#[test]
fn directory_kernel_and_missing_initrd_are_refused() {
    let config = VmConfig::new("/tmp");
    assert!(config
        .validate(None)
        .unwrap_err()
        .to_string()
        .contains("is a directory"));
    let mut config = valid_config();
    config.initrd = Some(PathBuf::from("/nonexistent/initrd"));
    assert!(matches!(
        config.validate(None),
        Err(ConfigError::BadFile { what: "initrd", .. })
    ));
}

#[test]
fn cpu_counts_are_bounded() {
    let mut config = valid_config();
    config.cpus = 0;
    assert_eq!(config.validate(None), Err(ConfigError::InvalidCpus(0)));
    config.cpus = 255;
    assert_eq!(config.validate(None), Err(ConfigError::InvalidCpus(255)));
    config.cpus = 4;
    assert_eq!(config.validate(None), Ok(()));
}

#[test]
fn memory_is_bounded() {
    let mut config = valid_config();
    config.memory_mib = 31;
    assert_eq!(config.validate(None), Err(ConfigError::MemoryTooSmall(31)));
    config.memory_mib = 4096;
    assert_eq!(
        config.validate(Some(2048)),
        Err(ConfigError::MemoryTooLarge {
            asked: 4096,
            host: 2048
        })
    );
}

#[test]
fn cmdline_is_appended_and_bounded() {
    let mut config = valid_config();
    config.cmdline = Some("  quiet init=/bin/sh ".into());
    assert_eq!(
        config.full_cmdline(),
        format!("{DEFAULT_KERNEL_CMDLINE} quiet init=/bin/sh")
    );
    config.cmdline = Some("x".repeat(2100));
    assert!(matches!(
        config.validate(None),
        Err(ConfigError::CmdlineTooLong { max: 2047, .. })
    ));
    config.cmdline = Some("a\u{e9}".into());
    assert_eq!(config.validate(None), Err(ConfigError::CmdlineInvalid));
}

#[test]
fn json_fills_defaults() {
    let config = VmConfig::from_json_str(r#"{"kernel": "/k"}"#).unwrap();
    assert_eq!(config, VmConfig::new("/k"));
    let config = VmConfig::from_json_str(
        r#"{"kernel": "/k", "cpus": 4, "memory_mib": 256, "console": {"file": "/tmp/c"}}"#,
    )
    .unwrap();
    assert_eq!(config.cpus, 4);
    assert_eq!(config.memory_mib, 256);
    assert_eq!(config.console, ConsoleConfig::File("/tmp/c".into()));
}

#[test]
fn json_unknown_fields_and_wrong_types_name_the_field() {
    let err = VmConfig::from_json_str(r#"{"kernel": "/k", "vcpus": 2}"#).unwrap_err();
    assert!(err.contains("unknown field `vcpus`"), "{err}");
    let err = VmConfig::from_json_str(r#"{"kernel": "/k", "cpus": "two"}"#).unwrap_err();
    assert!(err.contains("invalid type"), "{err}");
    let err = VmConfig::from_json_str(r#"{"cpus": 2}"#).unwrap_err();
    assert!(err.contains("missing field `kernel`"), "{err}");
}

#[test]
fn json_file_errors_name_the_file() {
    let err = VmConfig::from_json_file(Path::new("/nonexistent/vm.json")).unwrap_err();
    assert!(matches!(err, ConfigError::ReadFile { .. }));
    assert!(err.to_string().contains("/nonexistent/vm.json"));
}

#[test]
fn firecracker_style_cmdline_replaces_the_defaults() {
    let mut config = valid_config();
    config.default_cmdline = false;
    config.cmdline = Some("console=ttyS0 reboot=k".into());
    config.disks = vec![DiskConfig {
        root: true,
        readonly: true,
        ..DiskConfig::new("/root.img")
    }];
    assert_eq!(
        config.kernel_cmdline(&["virtio_mmio.device=4K@0xd0001000:5".into()]),
        "root=/dev/vda ro virtio_mmio.device=4K@0xd0001000:5 console=ttyS0 reboot=k"
    );
}

#[test]
fn partuuid_names_the_root_partition() {
    let mut config = valid_config();
    config.disks = vec![
        DiskConfig::new("/data.img"),
        DiskConfig {
            root: true,
            partuuid: Some("0eaa91a0-01".into()),
            ..DiskConfig::new("/root.img")
        },
    ];
    assert!(config
        .full_cmdline()
        .contains("root=PARTUUID=0eaa91a0-01 rw"));
    assert!(!config.full_cmdline().contains("root=/dev/"));
}

#[test]
fn partuuid_without_root_or_with_spaces_is_refused() {
    let image = std::env::temp_dir().join(format!("kiln-cfg-{}-partuuid.img", std::process::id()));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut config = valid_config();
    config.disks = vec![DiskConfig {
        partuuid: Some("abc".into()),
        ..DiskConfig::new(&image)
    }];
    let err = config.validate(None).unwrap_err().to_string();
    assert!(err.contains("not the root disk"), "{err}");
    config.disks[0].root = true;
    assert_eq!(config.validate(None), Ok(()));
    config.disks[0].partuuid = Some("a b".into());
    let err = config.validate(None).unwrap_err().to_string();
    assert!(err.contains("without spaces"), "{err}");
    std::fs::remove_file(&image).unwrap();
}

#[test]
fn huge_pages_default_to_transparent_and_2m_needs_even_memory() {
    let config = VmConfig::from_json_str(r#"{"kernel": "/k"}"#).unwrap();
    assert_eq!(config.huge_pages, HugePages::Transparent);
    assert!(config.default_cmdline);
    let mut config = valid_config();
    config.huge_pages = HugePages::Hugetlbfs2M;
    config.memory_mib = 129;
    assert_eq!(
        config.validate(None),
        Err(ConfigError::MemoryNotHugePageMultiple(129))
    );
    let config = VmConfig::from_json_str(r#"{"kernel": "/k", "huge_pages": "None"}"#).unwrap();
    assert_eq!(config.huge_pages, HugePages::None);
    let err = VmConfig::from_json_str(r#"{"kernel": "/k", "huge_pages": "1G"}"#).unwrap_err();
    assert!(err.contains("unknown variant `1G`"), "{err}");
}

#[test]
fn json_config_takes_vsock_and_rng() {
    let config = VmConfig::from_json_str(
        r#"{"kernel": "/k", "vsock": {"cid": 5, "uds": "/tmp/k.sock"},
            "rng": {"rate_bytes_per_sec": 2048}}"#,
    )
    .unwrap();
    let vsock = config.vsock.unwrap();
    assert_eq!((vsock.cid, vsock.uds), (5, PathBuf::from("/tmp/k.sock")));
    assert!(config.rng.enabled);
    assert_eq!(config.rng.rate_bytes_per_sec, Some(2048));

    let defaults = VmConfig::from_json_str(r#"{"kernel": "/k"}"#).unwrap();
    assert!(defaults.vsock.is_none());
    assert_eq!(defaults.rng, RngConfig::default());
    assert!(defaults.rng.enabled, "the rng is on by default");
    let off = VmConfig::from_json_str(r#"{"kernel": "/k", "rng": {"enabled": false}}"#).unwrap();
    assert!(!off.rng.enabled);

    for (bad, field) in [
        (r#"{"kernel": "/k", "vsock": {"cid": 5}}"#, "uds"),
        (
            r#"{"kernel": "/k", "vsock": {"cid": 5, "uds": "/x", "port": 1}}"#,
            "port",
        ),
        (r#"{"kernel": "/k", "rng": {"rate": 5}}"#, "rate"),
    ] {
        let err = VmConfig::from_json_str(bad).unwrap_err();
        assert!(err.contains(field), "{bad}: {err}");
    }
}

#[test]
fn validation_checks_vsock_rng_and_the_slot_count() {
    let mut config = valid_config();
    config.vsock = Some(VsockConfig {
        cid: 2,
        uds: std::env::temp_dir().join("kiln-cfg-test.sock"),
    });
    assert!(matches!(
        config.validate(None),
        Err(ConfigError::BadVsock { .. })
    ));
    config.vsock = None;
    config.rng.rate_bytes_per_sec = Some(0);
    assert!(matches!(
        config.validate(None),
        Err(ConfigError::InvalidRngSpec { .. })
    ));

    let dir = std::env::temp_dir().join(format!("kiln-cfg-slots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut full = valid_config();
    full.disks = (0..MAX_DISKS)
        .map(|i| {
            let image = dir.join(format!("d{i}.img"));
            std::fs::write(&image, [0u8; 512]).unwrap();
            DiskConfig::new(image)
        })
        .collect();
    let err = full.validate(None).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(err, ConfigError::TooManyDevices { others: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("--rng off"), "{err}");
    full.rng.enabled = false;
    full.disks.clear();
    assert_eq!(full.validate(None), Ok(()));
}

#[test]
fn acpi_off_is_read_from_the_kernel_arguments_only_and_the_last_one_wins() {
    let mut config = valid_config();
    assert!(!config.acpi_off());
    config.cmdline = Some("quiet acpi=off".into());
    assert!(config.acpi_off());
    config.cmdline = Some("acpi=off acpi=force".into());
    assert!(!config.acpi_off());
    // After `--` the arguments are init's.
    config.cmdline = Some("quiet -- acpi=off".into());
    assert!(!config.acpi_off());
    config.cmdline = Some("acpi=offline".into());
    assert!(!config.acpi_off());
}
