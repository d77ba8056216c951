//! The virtual KVM host's drives for one batch: every distinct disk image of the batch's tests
//! becomes one raw virtio drive of the virtual host (`vhost-run --drive`), in order of first use,
//! so the `n`-th drive is `/dev/vd<n>` inside, and each test's `kiln` gets those devices.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::disk::{virtio_disk_name, GuestDisk};
use crate::guest_test::GuestTest;

/// Most drives one virtual-host boot attaches: each is a PCI device on the q35 root bus, which
/// has about 30 free slots.
pub const MAX_DRIVES: usize = 24;

/// One drive of the virtual host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// The host image, canonical (the same file used by two tests is one drive).
    pub image: PathBuf,
    /// Read-only unless some test attaches it read-write.
    pub readonly: bool,
    /// Its size in bytes, which the runner compares with the device inside.
    pub bytes: u64,
}

impl Drive {
    /// The `vhost-run --drive` value.
    pub fn argument(&self) -> String {
        let mut argument = self.image.to_string_lossy().into_owned();
        if self.readonly {
            argument.push_str(",readonly");
        }
        argument
    }
}

/// The drives of a batch and, per test, the drive index of each of its disks (or why the test
/// cannot run).
#[derive(Debug, Default)]
pub struct DrivePlan {
    /// The drives, in `vhost-run --drive` order.
    pub drives: Vec<Drive>,
    /// Per test, in batch order: the drive of each disk, or the reason it cannot run.
    pub tests: Vec<Result<Vec<usize>, String>>,
    /// Per test, in batch order: its backing files, as (drive, path to link it at).
    pub links: Vec<Vec<(usize, PathBuf)>>,
}

impl DrivePlan {
    /// Assigns drives to the disks of `tests`.
    pub fn new(tests: &[GuestTest]) -> Self {
        let mut plan = Self::default();
        for test in tests {
            let assigned = plan.assign(test);
            let links = match assigned {
                Ok(_) => plan.link_backing_files(test),
                Err(_) => Ok(Vec::new()),
            };
            match links {
                Ok(links) => {
                    plan.tests.push(assigned);
                    plan.links.push(links);
                }
                Err(problem) => {
                    plan.tests.push(Err(problem));
                    plan.links.push(Vec::new());
                }
            }
        }
        plan
    }

    /// The device inside the virtual host of drive `index`.
    pub fn device(index: usize) -> String {
        format!("/dev/{}", virtio_disk_name(index))
    }

    /// The runner's list of a test's drives: one `vdX BYTES` line per disk.
    pub fn runner_list(&self, drives: &[usize]) -> String {
        drives
            .iter()
            .map(|&index| {
                format!(
                    "{} {}\n",
                    virtio_disk_name(index),
                    self.drives.get(index).map_or(0, |drive| drive.bytes)
                )
            })
            .collect()
    }

    /// Read-only drives for a test's backing files (or the drives already holding them).
    fn link_backing_files(&mut self, test: &GuestTest) -> Result<Vec<(usize, PathBuf)>, String> {
        let mut links = Vec::new();
        for path in test.backing_files() {
            let disk = GuestDisk::new(path, crate::disk::DiskOptions::new().readonly());
            let (image, bytes) = examine(&disk)?;
            let index = match self.drives.iter().position(|drive| drive.image == image) {
                Some(index) => index,
                None if self.drives.len() == MAX_DRIVES => {
                    return Err(format!(
                        "the batch uses more than {MAX_DRIVES} distinct disk images, more than one \
                         virtual-host boot attaches; split the suite"
                    ))
                }
                None => {
                    self.drives.push(Drive {
                        image,
                        readonly: true,
                        bytes,
                    });
                    self.drives.len() - 1
                }
            };
            links.push((index, path.clone()));
        }
        Ok(links)
    }

    fn assign(&mut self, test: &GuestTest) -> Result<Vec<usize>, String> {
        if let Some(problem) = test.problem() {
            return Err(problem);
        }
        // Work on a copy, so that a test that cannot run adds no drive.
        let mut drives = self.drives.clone();
        let mut assigned = Vec::with_capacity(test.disks().len());
        for disk in test.disks() {
            let (image, bytes) = examine(disk)?;
            let readonly = disk.options().is_readonly();
            let index = match drives.iter().position(|drive| drive.image == image) {
                Some(index) => {
                    drives[index].readonly &= readonly;
                    index
                }
                None if drives.len() == MAX_DRIVES => {
                    return Err(format!(
                        "the batch uses more than {MAX_DRIVES} distinct disk images, more than one \
                         virtual-host boot attaches; split the suite"
                    ))
                }
                None => {
                    drives.push(Drive {
                        image,
                        readonly,
                        bytes,
                    });
                    drives.len() - 1
                }
            };
            assigned.push(index);
        }
        self.drives = drives;
        Ok(assigned)
    }
}

/// The canonical path and size of a disk's image, or why the virtual host cannot attach it as
/// it is.
fn examine(disk: &GuestDisk) -> Result<(PathBuf, u64), String> {
    let shown = disk.path().display();
    let image = disk
        .path()
        .canonicalize()
        .map_err(|error| format!("disk image {shown}: {error}"))?;
    let bytes = size(&image).map_err(|error| format!("disk image {shown}: {error}"))?;
    if bytes % 512 != 0 {
        return Err(format!(
            "disk image {shown} is {bytes} bytes, not a whole number of 512-byte sectors: the \
             virtual host's drive would round it up, so Kiln inside would not see the image as \
             it is"
        ));
    }
    Ok((image, bytes))
}

fn size(image: &Path) -> std::io::Result<u64> {
    let meta = std::fs::metadata(image)?;
    if meta.file_type().is_block_device() {
        // A block device's metadata says 0 bytes; its end is its size.
        File::open(image)?.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("kiln-harness-drives-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn image(&self, name: &str, bytes: u64) -> PathBuf {
            let path = self.0.join(name);
            File::create(&path).unwrap().set_len(bytes).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn images_map_to_drives_across_the_batch() {
        let scratch = Scratch::new("map");
        let a = scratch.image("a.img", 4096);
        let b = scratch.image("b.img", 8192);
        let tests = [
            GuestTest::new("one", "true").disk(&a, DiskOptions::new().readonly()),
            GuestTest::new("none", "true"),
            GuestTest::new("two", "true")
                .disk(&b, DiskOptions::new().readonly())
                .disk(&a, DiskOptions::new()),
        ];
        let plan = DrivePlan::new(&tests);
        assert_eq!(plan.drives.len(), 2);
        assert_eq!(plan.drives[0].image, a.canonicalize().unwrap());
        // Attached read-write by "two", so the drive is read-write.
        assert!(!plan.drives[0].readonly);
        assert!(plan.drives[1].readonly);
        assert_eq!(
            plan.drives[1].argument(),
            format!("{},readonly", b.canonicalize().unwrap().display())
        );
        assert_eq!(plan.tests[0], Ok(vec![0]));
        assert_eq!(plan.tests[1], Ok(vec![]));
        assert_eq!(plan.tests[2], Ok(vec![1, 0]));
        assert_eq!(plan.runner_list(&[1, 0]), "vdb 8192\nvda 4096\n");
        assert_eq!(DrivePlan::device(1), "/dev/vdb");
    }

    #[test]
    fn backing_files_become_read_only_drives_linked_at_their_paths() {
        let scratch = Scratch::new("backing");
        let base = scratch.image("base.raw", 4096);
        let overlay = scratch.image("overlay.qcow2", 8192);
        let tests = [
            GuestTest::new("one", "true")
                .disk(&overlay, DiskOptions::new().format("qcow2"))
                .backing_file(&base),
            GuestTest::new("relative", "true").backing_file("base.raw"),
        ];
        let plan = DrivePlan::new(&tests);
        assert_eq!(plan.tests[0], Ok(vec![0]));
        assert_eq!(plan.links[0], vec![(1, base.clone())]);
        assert!(plan.drives[1].readonly);
        assert!(plan.tests[1]
            .as_ref()
            .unwrap_err()
            .contains("absolute path"));
        assert_eq!(plan.drives.len(), 2);
    }

    #[test]
    fn a_test_that_cannot_run_adds_no_drive() {
        let scratch = Scratch::new("reject");
        let good = scratch.image("good.img", 512);
        let odd = scratch.image("odd.img", 1000);
        let tests = [
            GuestTest::new("odd", "true")
                .disk(&good, DiskOptions::new())
                .disk(&odd, DiskOptions::new()),
            GuestTest::new("missing", "true").disk(scratch.0.join("gone.img"), DiskOptions::new()),
            GuestTest::new("fine", "true").disk(&good, DiskOptions::new()),
        ];
        let plan = DrivePlan::new(&tests);
        assert!(plan.tests[0]
            .as_ref()
            .unwrap_err()
            .contains("not a whole number of 512-byte sectors"));
        assert!(plan.tests[1].as_ref().unwrap_err().contains("gone.img"));
        assert_eq!(plan.tests[2], Ok(vec![0]));
        assert_eq!(plan.drives.len(), 1);
    }

    #[test]
    fn too_many_images_fail_the_test_that_overflows() {
        let scratch = Scratch::new("many");
        let tests: Vec<GuestTest> = (0..=MAX_DRIVES)
            .map(|n| {
                GuestTest::new(format!("t{n}"), "true")
                    .disk(scratch.image(&format!("{n}.img"), 512), DiskOptions::new())
            })
            .collect();
        let plan = DrivePlan::new(&tests);
        assert_eq!(plan.drives.len(), MAX_DRIVES);
        assert!(plan.tests[MAX_DRIVES - 1].is_ok());
        assert!(plan.tests[MAX_DRIVES]
            .as_ref()
            .unwrap_err()
            .contains("more than"));
    }
}
