//! Disks: raw or qcow2 images (regular files or block devices) attached as virtio-blk devices,
//! in order (`vda`, `vdb`, ...).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kiln_arch::layout::{VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST};
use kiln_devices::virtio::block::{DiskFormat, ID_BYTES};

use super::ConfigError;

/// Most disks a VM can have: one virtio-mmio slot (and IRQ line) each.
pub const MAX_DISKS: usize = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as usize;

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file.
    pub path: PathBuf,
    /// `raw` or `qcow2`; detected from the contents when not given (and then a qcow2 image
    /// that names a backing file is refused).
    #[serde(default, with = "format_name", skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// The guest may only read: the image is opened read-only and the device says so.
    #[serde(default)]
    pub readonly: bool,
    /// Boot from this disk: Kiln adds `root=/dev/vdX rw` (`ro` when read-only).
    #[serde(default)]
    pub root: bool,
    /// Serial number the guest sees (at most 20 bytes); the file name when not given.
    #[serde(default)]
    pub id: Option<String>,
    /// For the root disk: boot from the partition with this unique id
    /// (`root=PARTUUID=...`) instead of the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

impl DiskConfig {
    /// A read-write, non-root disk with a derived serial.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            format: None,
            readonly: false,
            root: false,
            id: None,
            partuuid: None,
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses the CLI form: `path=IMG[,format=raw|qcow2][,readonly][,root][,id=ID][,partuuid=UUID]`
    /// first item is the path too).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidDiskSpec {
            spec: spec.to_string(),
            reason,
        };
        let mut path: Option<PathBuf> = None;
        let mut disk = DiskConfig::new("");
        for (position, item) in spec.split(',').enumerate() {
            let repeated = || invalid(format!("'{item}' is given twice"));
            match item.split_once('=') {
                Some(("path", value)) => {
                    if path.is_some() {
                        return Err(repeated());
                    }
                    if value.is_empty() {
                        return Err(invalid("the path is empty".into()));
                    }
                    path = Some(PathBuf::from(value));
                }
                Some(("format", value)) => {
                    if disk.format.is_some() {
                        return Err(repeated());
                    }
                    disk.format = Some(value.parse().map_err(invalid)?);
                }
                Some(("id", value)) => {
                    if disk.id.is_some() {
                        return Err(repeated());
                    }
                    disk.id = Some(value.to_string());
                }
                Some(("partuuid", value)) => {
                    if disk.partuuid.is_some() {
                        return Err(repeated());
                    }
                    disk.partuuid = Some(value.to_string());
                }
                None if item == "readonly" => {
                    if disk.readonly {
                        return Err(repeated());
                    }
                    disk.readonly = true;
                }
                None if item == "root" => {
                    if disk.root {
                        return Err(repeated());
                    }
                    disk.root = true;
                }
                // `--disk IMG,readonly`: a bare first item is the path.
                None if position == 0 && !item.is_empty() => path = Some(PathBuf::from(item)),
                _ => {
                    return Err(invalid(format!(
                        "unknown option '{item}'; expected path=IMG, format=raw|qcow2, readonly, \
                         root, id=ID or partuuid=UUID"
                    )))
                }
            }
        }
        disk.path = path.ok_or_else(|| invalid("no path=IMG given".into()))?;
        Ok(disk)
    }
}

/// `format` in JSON configs: `"raw"` or `"qcow2"`.
mod format_name {
    use kiln_devices::virtio::block::DiskFormat;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        format: &Option<DiskFormat>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match format {
            Some(format) => serializer.serialize_str(format.name()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DiskFormat>, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// The name Linux gives the `index`-th virtio disk: `vda` ... `vdz`, `vdaa`, ...
pub fn disk_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut rest = index;
    loop {
        letters.push(b'a' + (rest % 26) as u8);
        if rest < 26 {
            break;
        }
        rest = rest / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// Checks what can be checked before the images are opened: the files are there, at most one
/// root disk, no image twice, serials that fit.
pub(super) fn validate_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    if disks.len() > MAX_DISKS {
        return Err(ConfigError::TooManyDisks(disks.len()));
    }
    let mut seen: Vec<(usize, PathBuf)> = Vec::new();
    let mut root: Option<usize> = None;
    for (index, disk) in disks.iter().enumerate() {
        let number = index + 1;
        let bad = |problem: String| ConfigError::BadDisk {
            index: number,
            path: disk.path.clone(),
            problem,
        };
        if disk.path.as_os_str().is_empty() {
            return Err(bad("has no path".into()));
        }
        check_image_file(&disk.path).map_err(bad)?;
        if let Some(id) = &disk.id {
            if id.is_empty() || id.len() > ID_BYTES {
                return Err(bad(format!("id '{id}' must be 1 to {ID_BYTES} bytes long")));
            }
            if !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "id '{id}' may only contain printable ASCII characters without spaces"
                )));
            }
        }
        if let Some(partuuid) = &disk.partuuid {
            if !disk.root {
                return Err(bad(format!(
                    "has partuuid '{partuuid}' but is not the root disk; a partuuid only says \
                     which partition of the root disk to boot from"
                )));
            }
            if partuuid.is_empty() || !partuuid.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad(format!(
                    "partuuid '{partuuid}' must be printable ASCII without spaces"
                )));
            }
        }
        if disk.root {
            if let Some(first) = root {
                return Err(bad(format!(
                    "is marked root, but disk {first} already is; only one root disk is allowed"
                )));
            }
            root = Some(number);
        }
        // Canonical paths catch the same image named twice (the second open would also fail
        // on its lock, but for read-only disks shared locks do not conflict).
        let canonical = std::fs::canonicalize(&disk.path).unwrap_or_else(|_| disk.path.clone());
        if let Some((other, _)) = seen.iter().find(|(_, path)| *path == canonical) {
            return Err(bad(format!("is the same image as disk {other}")));
        }
        seen.push((number, canonical));
    }
    Ok(())
}

fn check_image_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => Ok(()),
        Ok(meta) if meta.is_dir() => Err("is a directory, not a disk image".into()),
        Ok(_) => Err("is neither a regular file nor a block device".into()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Err("does not exist".into()),
        Err(err) => Err(format!("cannot be read: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmConfig;

    fn parse(spec: &str) -> Result<DiskConfig, ConfigError> {
        spec.parse()
    }

    fn image(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("kiln-cfg-{}-{name}.img", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
        path
    }

    #[test]
    fn cli_forms_parse() {
        assert_eq!(parse("path=/a.img"), Ok(DiskConfig::new("/a.img")));
        assert_eq!(
            parse("path=/a.img,readonly,root,id=serial-1"),
            Ok(DiskConfig {
                path: "/a.img".into(),
                format: None,
                readonly: true,
                root: true,
                id: Some("serial-1".into()),
                partuuid: None,
            })
        );
        assert_eq!(
            parse("path=/a.qcow2,format=qcow2").unwrap().format,
            Some(DiskFormat::Qcow2)
        );
        assert_eq!(
            parse("/a.img,format=raw").unwrap().format,
            Some(DiskFormat::Raw)
        );
        assert_eq!(
            parse("/b.img,root"),
            Ok(DiskConfig {
                root: true,
                ..DiskConfig::new("/b.img")
            })
        );
        assert_eq!(
            parse("readonly,path=/c.img").unwrap().path,
            PathBuf::from("/c.img")
        );
    }

    #[test]
    fn bad_cli_forms_say_why() {
        for (spec, reason) in [
            ("", "unknown option ''"),
            ("readonly", "no path=IMG given"),
            ("path=", "the path is empty"),
            ("path=/a,path=/b", "given twice"),
            ("path=/a,root,root", "given twice"),
            ("path=/a,readonly,readonly", "given twice"),
            ("path=/a,id=x,id=y", "given twice"),
            ("path=/a,rw", "unknown option 'rw'"),
            ("path=/a,cache=none", "unknown option 'cache=none'"),
            (
                "path=/a,format=vmdk",
                "unknown disk format 'vmdk'; expected raw or qcow2",
            ),
            ("path=/a,format=raw,format=qcow2", "given twice"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidDiskSpec { reason: r, .. } if r.contains(reason)),
                "{spec:?}: {err}"
            );
            assert!(err.to_string().starts_with("invalid --disk"), "{err}");
        }
    }

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(disk_name(0), "vda");
        assert_eq!(disk_name(1), "vdb");
        assert_eq!(disk_name(25), "vdz");
        assert_eq!(disk_name(26), "vdaa");
        assert_eq!(disk_name(27), "vdab");
        assert_eq!(disk_name(701), "vdzz");
        assert_eq!(disk_name(702), "vdaaa");
    }

    #[test]
    fn root_disk_goes_on_the_command_line() {
        let mut config = VmConfig::new("/k");
        config.cmdline = Some("quiet -- init-arg".into());
        config.disks = vec![
            DiskConfig::new("/data.img"),
            DiskConfig {
                root: true,
                ..DiskConfig::new("/root.img")
            },
        ];
        let cmdline = config.kernel_cmdline(&["virtio_mmio.device=4K@0xd0001000:5".into()]);
        assert!(
            cmdline.ends_with(
                " root=/dev/vdb rw virtio_mmio.device=4K@0xd0001000:5 quiet -- init-arg"
            ),
            "{cmdline}"
        );
        config.disks[1].readonly = true;
        assert!(config.full_cmdline().contains(" root=/dev/vdb ro "));
        config.disks.clear();
        assert!(!config.full_cmdline().contains("root="));
    }

    #[test]
    fn valid_disks_pass() {
        let a = image("valid-a");
        let b = image("valid-b");
        let disks = vec![
            DiskConfig {
                root: true,
                ..DiskConfig::new(&a)
            },
            DiskConfig {
                readonly: true,
                id: Some("data_01".into()),
                ..DiskConfig::new(&b)
            },
        ];
        assert_eq!(validate_disks(&disks), Ok(()));
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }

    #[test]
    fn bad_disks_are_named() {
        let a = image("bad-a");
        let b = image("bad-b");
        let check = |disks: Vec<DiskConfig>, index: usize, problem: &str| {
            let err = validate_disks(&disks).unwrap_err();
            assert!(
                matches!(&err, ConfigError::BadDisk { index: i, problem: p, .. } if *i == index && p.contains(problem)),
                "{err}"
            );
            assert!(
                err.to_string().starts_with(&format!("disk {index} (")),
                "{err}"
            );
        };
        check(
            vec![DiskConfig::new(&a), DiskConfig::new("/no/such/image.img")],
            2,
            "does not exist",
        );
        check(
            vec![DiskConfig::new(std::env::temp_dir())],
            1,
            "is a directory",
        );
        check(
            vec![DiskConfig::new("/dev/null")],
            1,
            "neither a regular file nor a block device",
        );
        check(vec![DiskConfig::new("")], 1, "has no path");
        let root = |path: &PathBuf| DiskConfig {
            root: true,
            ..DiskConfig::new(path)
        };
        check(vec![root(&a), root(&b)], 2, "only one root disk");
        check(
            vec![DiskConfig::new(&a), DiskConfig::new(&a)],
            2,
            "same image as disk 1",
        );
        let with_id = |id: &str| DiskConfig {
            id: Some(id.into()),
            ..DiskConfig::new(&a)
        };
        check(vec![with_id("123456789012345678901")], 1, "1 to 20 bytes");
        check(vec![with_id("")], 1, "1 to 20 bytes");
        check(vec![with_id("has space")], 1, "printable ASCII");
        assert_eq!(
            validate_disks(&vec![DiskConfig::new(&a); MAX_DISKS + 1]),
            Err(ConfigError::TooManyDisks(MAX_DISKS + 1))
        );
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }

    #[test]
    fn json_disks_deny_unknown_fields() {
        let config = VmConfig::from_json_str(
            r#"{"kernel": "/k", "disks": [{"path": "/a.img", "readonly": true}, {"path": "/b.img", "root": true, "id": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(config.disks.len(), 2);
        assert!(config.disks[0].readonly && !config.disks[0].root);
        assert_eq!(config.disks[1].id.as_deref(), Some("b"));
        assert_eq!(config.disks[0].format, None);
        let config = VmConfig::from_json_str(
            r#"{"kernel": "/k", "disks": [{"path": "/a.qcow2", "format": "qcow2"}]}"#,
        )
        .unwrap();
        assert_eq!(config.disks[0].format, Some(DiskFormat::Qcow2));
        let err = VmConfig::from_json_str(
            r#"{"kernel": "/k", "disks": [{"path": "/a", "format": "vdi"}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown disk format 'vdi'"), "{err}");
        let err = VmConfig::from_json_str(
            r#"{"kernel": "/k", "disks": [{"path": "/a", "cache": "none"}]}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown field `cache`"), "{err}");
        let err = VmConfig::from_json_str(r#"{"kernel": "/k", "disks": [{"readonly": true}]}"#)
            .unwrap_err();
        assert!(err.contains("missing field `path`"), "{err}");
    }
}
