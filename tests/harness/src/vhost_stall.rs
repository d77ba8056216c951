//! What the harness does when the virtual KVM host stalls (see [`crate::vhost::run`]): the state
//! of its CPUs from vhost-run's log, and copies of writable images so that the interrupted test
//! can run again on what it started with.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest_test::GuestTest;

/// Copies of the writable images a test alone uses, taken before the first boot, so that the test
/// a stalled virtual host interrupted can run again on what it started with. Only images of at
/// most [`PRISTINE_LIMIT`] allocated bytes in all are copied; the others cannot be rerun.
pub struct PristineImages {
    dir: PathBuf,
    /// Image path → its copy.
    copies: Vec<(PathBuf, PathBuf)>,
}

/// At most this many allocated bytes of images are copied before a batch.
const PRISTINE_LIMIT: u64 = 512 << 20;

impl PristineImages {
    /// Copies the writable images of `tests` that no other test uses, into `dir`.
    pub fn save(tests: &[GuestTest], dir: &Path) -> Self {
        let mut users: BTreeMap<PathBuf, usize> = BTreeMap::new();
        for test in tests {
            for disk in test.disks() {
                *users.entry(disk.path().to_path_buf()).or_default() += 1;
            }
        }
        let mut pristine = Self {
            dir: dir.to_path_buf(),
            copies: Vec::new(),
        };
        let mut budget = PRISTINE_LIMIT;
        let writable = tests
            .iter()
            .flat_map(|test| test.disks())
            .filter(|disk| !disk.options().is_readonly() && users[disk.path()] == 1);
        for (number, disk) in writable.enumerate() {
            let allocated = fs::metadata(disk.path())
                .map(|meta| meta.blocks() * 512)
                .unwrap_or(u64::MAX);
            if allocated > budget || fs::create_dir_all(dir).is_err() {
                continue;
            }
            let copy = dir.join(number.to_string());
            if copy_sparse(disk.path(), &copy) {
                budget -= allocated;
                pristine.copies.push((disk.path().to_path_buf(), copy));
            }
        }
        pristine
    }

    /// Puts back `test`'s writable images; false when one of them has no copy.
    pub fn restore(&self, test: &GuestTest) -> bool {
        test.disks()
            .iter()
            .filter(|disk| !disk.options().is_readonly())
            .all(|disk| {
                self.copies
                    .iter()
                    .find(|(image, _)| image == disk.path())
                    .is_some_and(|(image, copy)| copy_sparse(copy, image))
            })
    }

    /// Removes the copies.
    pub fn discard(self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `cp --sparse=always`: an image's holes stay holes, so copying a mostly empty image is cheap.
fn copy_sparse(from: &Path, to: &Path) -> bool {
    Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(to)
        .status()
        .is_ok_and(|status| status.success())
}

/// The instruction pointer, flags, privilege level and halt state of each virtual-host CPU, from
/// the QEMU monitor dump vhost-run writes when it stops a virtual host that did not finish.
pub fn cpu_states(run_log: &Path) -> String {
    let Ok(text) = fs::read_to_string(run_log) else {
        return String::new();
    };
    text.lines()
        .map(str::trim)
        .filter(|line| line.starts_with("RIP=") || line.starts_with("EIP="))
        .enumerate()
        .map(|(cpu, line)| format!("CPU{cpu} {line}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-stall-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_test_alone_on_its_image_gets_it_back_as_it_was() {
        let dir = scratch("restore");
        let own = dir.join("own.img");
        let shared = dir.join("shared.img");
        fs::write(&own, b"before").unwrap();
        fs::write(&shared, b"shared").unwrap();
        let writer = GuestTest::new("writer", "true").disk(&own, DiskOptions::new());
        let sharing = |name| GuestTest::new(name, "true").disk(&shared, DiskOptions::new());
        let tests = [writer.clone(), sharing("a"), sharing("b")];
        let pristine = PristineImages::save(&tests, &dir.join("pristine"));
        fs::write(&own, b"half written").unwrap();
        assert!(pristine.restore(&writer));
        assert_eq!(fs::read(&own).unwrap(), b"before");
        // An image two tests use is not copied: putting it back would undo the other's writes.
        assert!(!pristine.restore(&tests[1]));
        pristine.discard();
        assert!(!dir.join("pristine").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpu_states_come_from_the_monitor_dump() {
        let dir = scratch("cpus");
        let log = dir.join("vhost-run.log");
        fs::write(
            &log,
            "kiln-resources: state of the virtual host when it was stopped (QEMU monitor):\n  \
             RIP=ffffffff81000000 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n  \
             EIP=000fd09a EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\n",
        )
        .unwrap();
        let states = cpu_states(&log);
        assert!(states.starts_with("CPU0 RIP=ffffffff81000000"), "{states}");
        assert!(states.contains("; CPU1 EIP=000fd09a"), "{states}");
        assert_eq!(cpu_states(&dir.join("missing")), "");
        fs::remove_dir_all(&dir).unwrap();
    }
}
