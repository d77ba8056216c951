//! Disk images a guest test attaches: the test creates the image on the host, Kiln gets it as a
//! virtio-blk disk, and after the suite has run the test reads the same file back.
//!
//! - direct mode: Kiln gets `--disk path=<host path>,<options>`;
//! - vhost mode: `vhost-run --drive` attaches each image to the virtual KVM host as a raw virtio
//!   drive, and Kiln gets `--disk path=/dev/vdX,<options>,id=<serial>`. The serial is the one
//!   Kiln derives from the host file name in direct mode, so the guest sees the same disk in both
//!   modes.

use std::path::{Path, PathBuf};

pub use kiln_devices::virtio::block::ID_BYTES;

/// How a disk is attached: the options of `kiln run --disk`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskOptions {
    format: Option<String>,
    readonly: bool,
    root: bool,
    id: Option<String>,
}

impl DiskOptions {
    /// A read-write, non-root disk whose serial is its file name.
    pub fn new() -> Self {
        Self::default()
    }

    /// The image format (`format=raw|qcow2`); Kiln detects it when not given.
    pub fn format(mut self, format: impl Into<String>) -> Self {
        self.format = Some(format.into());
        self
    }

    /// The guest may only read (`readonly`); in vhost mode the drive is read-only too.
    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// Kiln boots from this disk (`root`: it adds `root=/dev/vdX` to the command line).
    pub fn root(mut self) -> Self {
        self.root = true;
        self
    }

    /// The serial the guest sees (`id=ID`), instead of the file name.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Whether the disk is read-only.
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }
}

/// One disk of a guest test: a host image and how it is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDisk {
    path: PathBuf,
    options: DiskOptions,
}

impl GuestDisk {
    /// A disk backed by the host image at `path`.
    pub fn new(path: impl Into<PathBuf>, options: DiskOptions) -> Self {
        Self {
            path: path.into(),
            options,
        }
    }

    /// The host image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How it is attached.
    pub fn options(&self) -> &DiskOptions {
        &self.options
    }

    /// Why this disk cannot be attached the same way in both modes, if it cannot: the image must
    /// exist (a regular file or a block device), and the `--disk` syntax has no escape for
    /// commas. Without an explicit id, the file name becomes the serial, which in vhost mode is
    /// passed as `id=`, so it must be a valid id there.
    pub fn problem(&self) -> Option<String> {
        use std::os::unix::fs::FileTypeExt;
        let shown = self.path.display();
        if self.path.as_os_str().is_empty() {
            return Some("a disk has an empty image path".to_string());
        }
        if self.path.as_os_str().as_encoded_bytes().contains(&b',') {
            return Some(format!(
                "disk image path {shown} contains a comma, which `kiln run --disk` cannot express"
            ));
        }
        match std::fs::metadata(&self.path) {
            Ok(meta) if meta.is_file() || meta.file_type().is_block_device() => {}
            Ok(_) => {
                return Some(format!(
                    "disk image {shown} is neither a regular file nor a block device"
                ))
            }
            Err(error) => {
                return Some(format!(
                    "disk image {shown} cannot be used: {error} (the test creates its images \
                     before the suite runs)"
                ))
            }
        }
        match &self.options.id {
            Some(id) if !valid_id(id.as_bytes()) => Some(format!(
                "disk id {id:?} must be 1 to {ID_BYTES} printable ASCII characters without \
                 spaces or commas"
            )),
            Some(_) => None,
            None if !valid_id(&self.default_id()) => Some(format!(
                "the file name of disk image {shown} is not usable as its serial (printable ASCII \
                 without spaces or commas, first {ID_BYTES} bytes); give the disk an id"
            )),
            None => None,
        }
    }

    /// The serial Kiln derives when no id is given.
    fn default_id(&self) -> Vec<u8> {
        kiln_devices::virtio::block::disk::default_id(&self.path)
    }

    /// The `--disk` value for direct mode: the host path and the options as given.
    pub fn direct_spec(&self) -> String {
        self.spec(&self.path.to_string_lossy(), self.options.id.clone())
    }

    /// The `--disk` value inside the virtual host, where the image is the block device
    /// `device` (`/dev/vdX`): the serial is always given, the one direct mode would derive.
    pub fn vhost_spec(&self, device: &str) -> String {
        let id = self
            .options
            .id
            .clone()
            .unwrap_or_else(|| String::from_utf8_lossy(&self.default_id()).into_owned());
        self.spec(device, Some(id))
    }

    fn spec(&self, path: &str, id: Option<String>) -> String {
        let mut spec = format!("path={path}");
        if let Some(format) = &self.options.format {
            spec.push_str(",format=");
            spec.push_str(format);
        }
        if self.options.readonly {
            spec.push_str(",readonly");
        }
        if self.options.root {
            spec.push_str(",root");
        }
        if let Some(id) = id {
            spec.push_str(",id=");
            spec.push_str(&id);
        }
        spec
    }
}

/// What Kiln accepts as `id=` (and `--disk` can carry): 1 to [`ID_BYTES`] printable ASCII
/// characters, no spaces, no commas.
fn valid_id(id: &[u8]) -> bool {
    (1..=ID_BYTES).contains(&id.len()) && id.iter().all(|&b| b.is_ascii_graphic() && b != b',')
}

/// The name Linux gives the `index`-th virtio disk: `vda` ... `vdz`, `vdaa`, ...
pub use kiln_vmm::config::disk_name as virtio_disk_name;

/// `debugfs -R 'cat FILE' IMAGE` (e2fsprogs): a file of an ext4 image, read without mounting it.
pub fn debugfs_cat(image: &Path, file: &str) -> Result<Vec<u8>, String> {
    let output = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {file}"))
        .arg(image)
        .output()
        .map_err(|err| format!("cannot run debugfs (e2fsprogs): {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "debugfs failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of images, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("kiln-harness-disk-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn image(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn direct_spec_keeps_the_host_path_and_options() {
        let scratch = Scratch::new("direct");
        let path = scratch.image("a.img");
        let disk = GuestDisk::new(&path, DiskOptions::new().readonly().root());
        assert_eq!(
            disk.direct_spec(),
            format!("path={},readonly,root", path.display())
        );
        let named = GuestDisk::new(&path, DiskOptions::new().id("serial-1"));
        assert_eq!(
            named.direct_spec(),
            format!("path={},id=serial-1", path.display())
        );
        assert_eq!(disk.problem(), None);
    }

    #[test]
    fn vhost_spec_carries_the_serial_direct_mode_would_derive() {
        let disk = GuestDisk::new("/images/first.img", DiskOptions::new().root());
        assert_eq!(
            disk.vhost_spec("/dev/vdc"),
            "path=/dev/vdc,root,id=first.img"
        );
        let long = GuestDisk::new(
            "/images/a-very-long-image-name.raw",
            DiskOptions::new().readonly(),
        );
        assert_eq!(
            long.vhost_spec("/dev/vda"),
            "path=/dev/vda,readonly,id=a-very-long-image-na"
        );
        let named = GuestDisk::new("/images/x.img", DiskOptions::new().id("kiln-second"));
        assert_eq!(named.vhost_spec("/dev/vdb"), "path=/dev/vdb,id=kiln-second");
        let qcow2 = GuestDisk::new("/images/o.qcow2", DiskOptions::new().format("qcow2").root());
        assert_eq!(
            qcow2.vhost_spec("/dev/vda"),
            "path=/dev/vda,format=qcow2,root,id=o.qcow2"
        );
    }

    #[test]
    fn unusable_disks_say_why() {
        let scratch = Scratch::new("unusable");
        let missing = GuestDisk::new("/nonexistent/kiln.img", DiskOptions::new());
        assert!(missing.problem().unwrap().contains("cannot be used"));
        let comma = GuestDisk::new("/tmp/a,b.img", DiskOptions::new());
        assert!(comma.problem().unwrap().contains("comma"));
        let dir = GuestDisk::new(std::env::temp_dir(), DiskOptions::new());
        assert!(dir.problem().unwrap().contains("neither"));
        let spaced = GuestDisk::new(scratch.image("with space.img"), DiskOptions::new());
        assert!(spaced.problem().unwrap().contains("give the disk an id"));
        let fixed = GuestDisk::new(scratch.image("with space.img"), DiskOptions::new().id("ok"));
        assert_eq!(fixed.problem(), None);
        let bad_id = GuestDisk::new(scratch.image("b.img"), DiskOptions::new().id("a,b"));
        assert!(bad_id.problem().unwrap().contains("disk id"));
        let long_id = GuestDisk::new(
            scratch.image("c.img"),
            DiskOptions::new().id("x".repeat(21)),
        );
        assert!(long_id.problem().is_some());
    }

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(virtio_disk_name(0), "vda");
        assert_eq!(virtio_disk_name(25), "vdz");
        assert_eq!(virtio_disk_name(26), "vdaa");
        assert_eq!(virtio_disk_name(701), "vdzz");
    }
}
