//! virtio-blk end to end: a guest writes through the ext4 root disk and the host reads the file
//! back from the image with `debugfs`; a read-only disk refuses writes and stays byte-identical;
//! two disks appear as `vda` and `vdb` with their sizes, serials and contents; 64 MiB written and
//! read back through the disk keep their checksum, on the host too. Plus the images Kiln must
//! refuse before a guest starts (missing, directory, empty, partial sector, locked, two roots).
//!
//! The guest tests create their images here and attach them with `GuestTest::disk`, so they run
//! in both harness modes: directly (Kiln gets the host paths) or inside the virtual KVM host
//! (the images are its virtio drives and Kiln gets `/dev/vdX`). Either way the checks read the
//! same image files after the batch has run (docs/testing.md, "Disks").

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_test_harness::disk::debugfs_cat;
use kiln_test_harness::{images, CheckFailure, DiskOptions, GuestOutcome, GuestTest, Suite};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// Where this run's images live; removed at the end unless `KILN_TEST_KEEP` is set.
fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-block-test-{}", std::process::id()))
}

fn image_path(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

/// Writes an image of `size` bytes whose byte `i` is `(i * 13 + 7) % 251`, starting with `head`.
fn write_image(name: &str, size: usize, head: &[u8]) -> PathBuf {
    let mut data: Vec<u8> = (0..size).map(|i| ((i * 13 + 7) % 251) as u8).collect();
    data[..head.len()].copy_from_slice(head);
    let path = image_path(name);
    fs::write(&path, data).unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    path
}

fn disk_arg(path: &Path, options: &str) -> [String; 2] {
    let mut spec = format!("path={}", path.display());
    if !options.is_empty() {
        spec.push(',');
        spec.push_str(options);
    }
    ["--disk".to_string(), spec]
}

/// SHA-256 of the first `len` bytes of `path`, by `sha256sum`.
fn sha256_prefix(path: &Path, len: u64) -> Result<String, String> {
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {len} '{}' | sha256sum | cut -d' ' -f1",
            path.display()
        ))
        .output()
        .map_err(|err| format!("cannot run sha256sum: {err}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn failure(outcome: &GuestOutcome, what: String) -> CheckFailure {
    CheckFailure::new(outcome, what)
}

fn add_guest_tests(suite: &mut Suite) -> Result<(), String> {
    // The ext4 root file system, as the root disk. The harness boots every guest with its
    // initramfs, so the script mounts the disk itself; the kernel still gets root=/dev/vda rw.
    let rootfs = images::rootfs_image().map_err(|err| err.to_string())?;
    let root = image_path("root.ext4");
    fs::copy(&rootfs, &root).map_err(|err| format!("cannot copy the rootfs image: {err}"))?;
    let root_sectors = fs::metadata(&root).map_err(|e| e.to_string())?.len() / 512;
    let root_for_check = root.clone();
    suite.guest(
        GuestTest::new(
            "root_disk_write_reaches_the_image",
            "echo \"CMDLINE=$(cat /proc/cmdline)\"\n\
             mkdir -p /mnt\n\
             mount -t ext4 /dev/vda /mnt && echo MOUNTED\n\
             printf 'kiln-block-%s\\n' \"$((6 * 7))-$(cat /sys/block/vda/size)\" \
             > /mnt/kiln-written.txt\n\
             sync\n\
             umount /mnt && echo UNMOUNTED\n",
        )
        .disk(&root, DiskOptions::new().root())
        .timeout(Duration::from_secs(120)),
        move |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("root=/dev/vda rw")
                // Announced once (DSDT): a second announcement fails to probe at boot.
                .console_lacks("can't request region")
                .console_lacks("virtio_mmio.device=")
                .console_contains("MOUNTED")
                .console_contains("UNMOUNTED")
                .finish()?;
            let expected = format!("kiln-block-42-{root_sectors}\n");
            let written = debugfs_cat(&root_for_check, "/kiln-written.txt")
                .map_err(|err| failure(outcome, err))?;
            if written != expected.as_bytes() {
                return Err(failure(
                    outcome,
                    format!(
                        "the image holds {:?}, the guest wrote {expected:?}",
                        String::from_utf8_lossy(&written)
                    ),
                ));
            }
            let fsck = Command::new("e2fsck")
                .args(["-fn"])
                .arg(&root_for_check)
                .output()
                .map_err(|err| failure(outcome, format!("cannot run e2fsck: {err}")))?;
            if !fsck.status.success() {
                return Err(failure(
                    outcome,
                    format!(
                        "the image fails e2fsck after the guest unmounted it:\n{}",
                        String::from_utf8_lossy(&fsck.stdout)
                    ),
                ));
            }
            Ok(())
        },
    );

    // A read-only disk: the guest sees it read-only, cannot write, and the image does not change.
    let readonly = write_image("readonly.img", 4 << 20, b"KILN-RO");
    let original = fs::read(&readonly).map_err(|e| e.to_string())?;
    let readonly_for_check = readonly.clone();
    suite.guest(
        GuestTest::new(
            "read_only_disk_refuses_writes",
            "echo \"RO_FLAG=$(cat /sys/block/vda/ro)\"\n\
             if dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>/dev/null; then\n\
               echo GUEST_WRITE=accepted\n\
             else\n\
               echo GUEST_WRITE=refused\n\
             fi\n\
             echo \"HEAD=$(head -c 7 /dev/vda)\"\n",
        )
        .disk(&readonly, DiskOptions::new().readonly())
        .timeout(Duration::from_secs(90)),
        move |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.console_value("RO_FLAG=") == Some("1"),
                    "the guest should see the disk read-only (/sys/block/vda/ro = 1)",
                )
                .that(
                    outcome.console_value("GUEST_WRITE=") == Some("refused"),
                    "a write to the read-only disk should fail in the guest",
                )
                .that(
                    outcome.console_value("HEAD=") == Some("KILN-RO"),
                    "the guest should read the image's first bytes",
                )
                .finish()?;
            let after =
                fs::read(&readonly_for_check).map_err(|e| failure(outcome, e.to_string()))?;
            if after != original {
                return Err(failure(outcome, "the read-only image changed".into()));
            }
            Ok(())
        },
    );

    // Two disks, in order, with their sizes, serials and contents.
    let first = write_image("first.img", 8 << 20, b"KILN-DISK-A");
    let second = write_image("second.img", (3 << 20) + 512, b"KILN-DISK-B");
    suite.guest(
        GuestTest::new(
            "two_disks_appear_as_vda_and_vdb",
            "for d in vda vdb; do\n\
               echo \"$d=$(cat /sys/block/$d/size) $(cat /sys/block/$d/serial) $(head -c 11 /dev/$d)\"\n\
             done\n",
        )
        .disk(&first, DiskOptions::new())
        .disk(&second, DiskOptions::new().id("kiln-second"))
        .timeout(Duration::from_secs(90)),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.console_value("vda=") == Some("16384 first.img KILN-DISK-A"),
                    format!(
                        "vda should be 16384 sectors, serial first.img, content KILN-DISK-A: {:?}",
                        outcome.console_value("vda=")
                    ),
                )
                .that(
                    outcome.console_value("vdb=") == Some("6145 kiln-second KILN-DISK-B"),
                    format!(
                        "vdb should be 6145 sectors, serial kiln-second, content KILN-DISK-B: {:?}",
                        outcome.console_value("vdb=")
                    ),
                )
                .finish()
        },
    );

    // 64 MiB through the disk and back, checked in the guest and against the image.
    let bulk = image_path("bulk.img");
    File::create(&bulk)
        .and_then(|file| file.set_len(80 << 20))
        .map_err(|e| e.to_string())?;
    let bulk_for_check = bulk.clone();
    suite.guest(
        GuestTest::new(
            "sixty_four_mib_round_trip",
            "dd if=/dev/urandom of=/tmp/src bs=1M count=64 2>/dev/null\n\
             echo \"SRC=$(sha256sum /tmp/src | cut -d' ' -f1)\"\n\
             dd if=/tmp/src of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo WROTE\n\
             rm /tmp/src\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             echo \"BACK=$(dd if=/dev/vda bs=1M count=64 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n",
        )
        .memory_mib(512)
        .disk(&bulk, DiskOptions::new())
        .timeout(Duration::from_secs(300)),
        move |outcome| {
            let src = outcome.console_value("SRC=").unwrap_or_default().to_string();
            let back = outcome.console_value("BACK=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .console_contains("WROTE")
                .that(src.len() == 64, format!("no checksum of the data: {src:?}"))
                .that(
                    back == src,
                    format!("read back {back:?}, wrote {src:?}"),
                )
                .finish()?;
            let on_host = sha256_prefix(&bulk_for_check, 64 << 20)
                .map_err(|err| failure(outcome, err))?;
            if on_host != src {
                return Err(failure(
                    outcome,
                    format!("the image holds {on_host}, the guest wrote {src}"),
                ));
            }
            Ok(())
        },
    );
    Ok(())
}

/// Runs `kiln run` with `args` (no guest can start: the kernel is a stand-in) and expects it to
/// refuse with exit status `status` and `message` on stderr.
fn expect_refusal(args: &[String], status: i32, message: &str) -> Result<(), String> {
    let output = Command::new(KILN)
        .args(["run", "--kernel", KILN, "--console", "none"])
        .args(args)
        .output()
        .map_err(|err| format!("cannot run kiln: {err}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() != Some(status) || !stderr.contains(message) {
        return Err(format!(
            "expected exit status {status} and {message:?}; got {:?} with stderr:\n{stderr}",
            output.status.code()
        ));
    }
    Ok(())
}

fn add_host_tests(suite: &mut Suite) {
    let missing = image_path("missing.img");
    suite.host("missing_image_is_refused", move || {
        expect_refusal(&disk_arg(&missing, ""), 1, "does not exist")
    });
    suite.host("directory_is_refused", || {
        expect_refusal(&disk_arg(&scratch_dir(), ""), 1, "is a directory")
    });
    suite.host("empty_image_is_refused", || {
        let empty = write_image("empty.img", 0, b"");
        expect_refusal(&disk_arg(&empty, ""), 1, "is empty")
    });
    suite.host("partial_sector_image_is_refused", || {
        let odd = write_image("odd.img", 1000, b"");
        expect_refusal(
            &disk_arg(&odd, ""),
            1,
            "is 1000 bytes, which is not a multiple of the 512-byte sector size",
        )
    });
    suite.host("second_root_disk_is_refused", || {
        let a = write_image("root-a.img", 4096, b"");
        let b = write_image("root-b.img", 4096, b"");
        let mut args = disk_arg(&a, "root").to_vec();
        args.extend(disk_arg(&b, "root"));
        expect_refusal(&args, 1, "only one root disk is allowed")
    });
    suite.host("image_in_use_is_refused", || {
        // Another Kiln attached it read-write: it holds an exclusive lock.
        let image = write_image("locked.img", 4096, b"");
        let holder = File::options()
            .read(true)
            .write(true)
            .open(&image)
            .map_err(|e| e.to_string())?;
        // SAFETY: flock on a descriptor owned by `holder` for the rest of this function.
        if unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(format!("cannot lock: {}", std::io::Error::last_os_error()));
        }
        expect_refusal(&disk_arg(&image, ""), 1, "is in use by another process")?;
        expect_refusal(
            &disk_arg(&image, "readonly"),
            1,
            "is attached read-write by another process",
        )
    });
    suite.host("malformed_disk_option_is_a_usage_error", || {
        expect_refusal(
            &["--disk".into(), "path=/x.img,cache=none".into()],
            2,
            "unknown option 'cache=none'",
        )
    });
}

fn main() -> ExitCode {
    if let Err(err) = fs::create_dir_all(scratch_dir()) {
        eprintln!("cannot create {}: {err}", scratch_dir().display());
        return ExitCode::FAILURE;
    }
    let mut suite = Suite::new("block", KILN);
    add_host_tests(&mut suite);
    if let Err(err) = add_guest_tests(&mut suite) {
        suite.host("guest_disk_tests_set_up", move || Err(err.clone()));
    }
    let status = suite.main();
    if std::env::var_os("KILN_TEST_KEEP").is_none() {
        let _ = fs::remove_dir_all(scratch_dir());
    }
    status
}
