//! qcow2 disks end to end, with images made and checked by QEMU's tools (Debian's
//! qemu-utils): an ext4 root on an overlay boots and its writes reach the overlay only; zlib and
//! zstd compressed images read correctly; `qemu-img check` is clean after a guest writes 64 MiB
//! and powers off, and after Kiln is killed mid-write (with the flushed data there); a guest
//! discard frees clusters. Plus the images `kiln run` must refuse before a guest starts, and
//! `kiln image create`.
//!
//! Overlays name their backing files by absolute path: in vhost mode the harness links those
//! paths to the virtual host's drives (`GuestTest::backing_file`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_test_harness::{images, CheckFailure, DiskOptions, GuestOutcome, GuestTest, Suite};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const MIB: u64 = 1 << 20;

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("kiln-qcow2-test-{}", std::process::id()))
}

fn image_path(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

/// Runs a tool; its stdout, or why it failed.
fn tool(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("cannot run {program} (Debian's qemu-utils): {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap_or_default()
}

/// `qemu-img check`: (corruptions and check errors, leaks, allocated clusters).
fn qemu_img_check(image: &Path) -> Result<(u64, u64, u64), String> {
    let output = Command::new("qemu-img")
        .args(["check", "--output=json", path_str(image)])
        .output()
        .map_err(|err| format!("cannot run qemu-img: {err}"))?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|err| {
        format!(
            "qemu-img check gave no report ({err}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let field = |name: &str| report.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    Ok((
        field("corruptions") + field("check-errors"),
        field("leaks"),
        field("allocated-clusters"),
    ))
}

/// The guest-visible contents of an image as a raw file next to it.
fn convert_to_raw(image: &Path) -> Result<PathBuf, String> {
    let raw = image.with_extension("contents.raw");
    let _ = fs::remove_file(&raw);
    tool(
        "qemu-img",
        &["convert", "-O", "raw", path_str(image), path_str(&raw)],
    )?;
    Ok(raw)
}

fn sha256(path: &Path, len: Option<u64>) -> Result<String, String> {
    let command = match len {
        Some(len) => format!("head -c {len} '{}' | sha256sum", path.display()),
        None => format!("sha256sum < '{}'", path.display()),
    };
    let out = tool("sh", &["-c", &command])?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Deterministic bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Grows an image file to `bytes` (sparse zeros, which qcow2 ignores): in vhost mode the image
/// is a block device of the virtual host that cannot grow as Kiln allocates clusters, and
/// its size must be whole sectors.
fn make_room(image: &Path, bytes: u64) -> Result<(), String> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(image)
        .map_err(|err| format!("{}: {err}", image.display()))?;
    let len = file.metadata().map_err(|err| err.to_string())?.len();
    file.set_len(len.max(bytes).div_ceil(512) * 512)
        .map_err(|err| format!("{}: {err}", image.display()))
}

fn create_overlay(overlay: &Path, base: &Path, base_format: &str) -> Result<(), String> {
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(base),
            "-F",
            base_format,
            path_str(overlay),
        ],
    )
    .map(drop)
}

fn failure(outcome: &GuestOutcome, what: impl Into<String>) -> CheckFailure {
    CheckFailure::new(outcome, what)
}

/// Checks an image after the guest: no corruption, at most `max_leaks` leaked clusters.
fn check_image(outcome: &GuestOutcome, image: &Path, max_leaks: u64) -> Result<u64, CheckFailure> {
    let (corruptions, leaks, allocated) =
        qemu_img_check(image).map_err(|err| failure(outcome, err))?;
    if corruptions != 0 || leaks > max_leaks {
        return Err(failure(
            outcome,
            format!(
                "qemu-img check of {}: {corruptions} corruptions, {leaks} leaks",
                image.display()
            ),
        ));
    }
    Ok(allocated)
}

fn add_root_overlay_test(suite: &mut Suite) -> Result<(), String> {
    let rootfs = images::rootfs_image().map_err(|err| err.to_string())?;
    let base = image_path("root-base.ext4");
    fs::copy(&rootfs, &base).map_err(|err| format!("cannot copy the rootfs image: {err}"))?;
    let base_sum = sha256(&base, None)?;
    let overlay = image_path("root-overlay.qcow2");
    create_overlay(&overlay, &base, "raw")?;
    make_room(&overlay, 64 * MIB)?;
    suite.guest(
        GuestTest::new(
            "ext4_root_on_a_qcow2_overlay",
            "echo \"CMDLINE=$(cat /proc/cmdline)\"\n\
             mkdir -p /mnt\n\
             mount -t ext4 /dev/vda /mnt && echo MOUNTED\n\
             echo kiln-on-qcow2 > /mnt/kiln-overlay.txt\n\
             dd if=/dev/urandom of=/mnt/bulk bs=1M count=8 2>/dev/null\n\
             sync\n\
             umount /mnt && echo UNMOUNTED\n",
        )
        .disk(&overlay, DiskOptions::new().format("qcow2").root())
        .backing_file(&base)
        .timeout(Duration::from_secs(150)),
        move |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("root=/dev/vda rw")
                .console_contains("MOUNTED")
                .console_contains("UNMOUNTED")
                .finish()?;
            check_image(outcome, &overlay, 0)?;
            let raw = convert_to_raw(&overlay).map_err(|err| failure(outcome, err))?;
            let written = tool("debugfs", &["-R", "cat /kiln-overlay.txt", path_str(&raw)])
                .map_err(|err| failure(outcome, err))?;
            if written != "kiln-on-qcow2\n" {
                return Err(failure(outcome, format!("the overlay holds {written:?}")));
            }
            tool("e2fsck", &["-fn", path_str(&raw)])
                .map_err(|err| failure(outcome, format!("e2fsck of the overlay: {err}")))?;
            let _ = fs::remove_file(&raw);
            let after = sha256(&base, None).map_err(|err| failure(outcome, err))?;
            if after != base_sum {
                return Err(failure(outcome, "the base image changed"));
            }
            Ok(())
        },
    );
    Ok(())
}

fn add_compressed_test(suite: &mut Suite) -> Result<(), String> {
    let source = image_path("compressible.raw");
    let mut data: Vec<u8> = (0..8 * MIB as usize)
        .map(|i| ((i / 97) % 13) as u8)
        .collect();
    data[3 * MIB as usize..4 * MIB as usize].copy_from_slice(&pattern(1, MIB as usize));
    fs::write(&source, &data).map_err(|err| err.to_string())?;
    let expected = sha256(&source, None)?;
    let mut images = Vec::new();
    for compression in ["zlib", "zstd"] {
        let image = image_path(&format!("{compression}.qcow2"));
        tool(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={compression}"),
                path_str(&source),
                path_str(&image),
            ],
        )?;
        // Compressed data ends anywhere; the virtual host's drives are whole sectors.
        make_room(&image, 0)?;
        images.push(image);
    }
    suite.guest(
        GuestTest::new(
            "compressed_images_read_correctly",
            "echo \"ZLIB=$(sha256sum /dev/vda | cut -d' ' -f1)\"\n\
             echo \"ZSTD=$(sha256sum /dev/vdb | cut -d' ' -f1)\"\n",
        )
        // zlib: detected (a qcow2 image without a backing file); zstd: given.
        .disk(&images[0], DiskOptions::new().readonly())
        .disk(&images[1], DiskOptions::new().format("qcow2").readonly())
        .timeout(Duration::from_secs(120)),
        move |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.console_value("ZLIB=") == Some(expected.as_str()),
                    format!(
                        "zlib image: read {:?}, expected {expected}",
                        outcome.console_value("ZLIB=")
                    ),
                )
                .that(
                    outcome.console_value("ZSTD=") == Some(expected.as_str()),
                    format!(
                        "zstd image: read {:?}, expected {expected}",
                        outcome.console_value("ZSTD=")
                    ),
                )
                .finish()
        },
    );
    Ok(())
}

fn add_bulk_test(suite: &mut Suite) -> Result<(), String> {
    let image = image_path("bulk.qcow2");
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&image), "80M"],
    )?;
    make_room(&image, 96 * MIB)?;
    suite.guest(
        GuestTest::new(
            "sixty_four_mib_then_power_off",
            "dd if=/dev/urandom of=/tmp/src bs=1M count=64 2>/dev/null\n\
             echo \"SRC=$(sha256sum /tmp/src | cut -d' ' -f1)\"\n\
             dd if=/tmp/src of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo WROTE\n\
             rm /tmp/src\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             echo \"BACK=$(dd if=/dev/vda bs=1M count=64 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n",
        )
        .memory_mib(512)
        .disk(&image, DiskOptions::new().format("qcow2"))
        .timeout(Duration::from_secs(300)),
        move |outcome| {
            let src = outcome.console_value("SRC=").unwrap_or_default().to_string();
            outcome
                .check()
                .exit_code(0)
                .console_contains("WROTE")
                .that(src.len() == 64, format!("no checksum of the data: {src:?}"))
                .that(
                    outcome.console_value("BACK=") == Some(src.as_str()),
                    "the guest read back something else",
                )
                .finish()?;
            check_image(outcome, &image, 0)?;
            let raw = convert_to_raw(&image).map_err(|err| failure(outcome, err))?;
            let on_host = sha256(&raw, Some(64 * MIB)).map_err(|err| failure(outcome, err))?;
            let _ = fs::remove_file(&raw);
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

fn add_kill_test(suite: &mut Suite) -> Result<(), String> {
    let base = image_path("kill-base.raw");
    fs::write(&base, pattern(2, 64 * MIB as usize)).map_err(|err| err.to_string())?;
    let base_sum = sha256(&base, None)?;
    let overlay = image_path("kill-overlay.qcow2");
    create_overlay(&overlay, &base, "raw")?;
    make_room(&overlay, 96 * MIB)?;
    // Kiln is killed (SIGKILL at the time limit) while the guest writes without flushing.
    suite.guest(
        GuestTest::new(
            "killed_mid_write_keeps_what_was_flushed",
            "dd if=/dev/urandom of=/tmp/flushed bs=1M count=8 2>/dev/null\n\
             echo \"FLUSHED_SUM=$(sha256sum /tmp/flushed | cut -d' ' -f1)\"\n\
             dd if=/tmp/flushed of=/dev/vda bs=1M conv=fsync 2>/dev/null && echo FLUSHED\n\
             dd if=/dev/urandom of=/tmp/chunk bs=64k count=16 2>/dev/null\n\
             i=0\n\
             while true; do\n\
               dd if=/tmp/chunk of=/dev/vda bs=64k seek=$((256 + (i * 37) % 700)) oflag=direct 2>/dev/null\n\
               i=$((i + 1))\n\
               [ $((i % 10)) = 0 ] && echo \"UNFLUSHED=$i\"\n\
             done\n",
        )
        .disk(&overlay, DiskOptions::new().format("qcow2"))
        .backing_file(&base)
        .timeout(Duration::from_secs(45)),
        move |outcome| {
            let flushed = outcome.console_value("FLUSHED_SUM=").unwrap_or_default().to_string();
            outcome
                .check()
                .timed_out()
                .console_contains("FLUSHED")
                .console_contains("UNFLUSHED=")
                .that(flushed.len() == 64, "no checksum of the flushed data")
                .finish()?;
            check_image(outcome, &overlay, u64::MAX)?;
            let raw = convert_to_raw(&overlay).map_err(|err| failure(outcome, err))?;
            let on_host = sha256(&raw, Some(8 * MIB)).map_err(|err| failure(outcome, err))?;
            let _ = fs::remove_file(&raw);
            if on_host != flushed {
                return Err(failure(outcome, "the flushed data is not in the overlay"));
            }
            if sha256(&base, None).map_err(|err| failure(outcome, err))? != base_sum {
                return Err(failure(outcome, "the base image changed"));
            }
            Ok(())
        },
    );
    Ok(())
}

fn add_discard_test(suite: &mut Suite) -> Result<(), String> {
    let base = image_path("discard-base.raw");
    fs::write(&base, pattern(3, 32 * MIB as usize)).map_err(|err| err.to_string())?;
    let overlay = image_path("discard-overlay.qcow2");
    create_overlay(&overlay, &base, "raw")?;
    make_room(&overlay, 48 * MIB)?;
    suite.guest(
        GuestTest::new(
            "guest_discard_frees_clusters",
            "echo \"DISCARD_MAX=$(cat /sys/block/vda/queue/discard_max_bytes)\"\n\
             dd if=/dev/urandom of=/dev/vda bs=1M count=16 conv=fsync 2>/dev/null && echo WROTE\n\
             blkdiscard -o 0 -l 12582912 /dev/vda && echo DISCARDED\n\
             sync\n\
             echo 3 > /proc/sys/vm/drop_caches\n\
             cmp -n 12582912 /dev/vda /dev/zero && echo ZEROS\n",
        )
        .disk(&overlay, DiskOptions::new().format("qcow2"))
        .backing_file(&base)
        .timeout(Duration::from_secs(120)),
        move |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome
                        .console_value("DISCARD_MAX=")
                        .is_some_and(|max| max != "0"),
                    "the guest should see a disk that discards",
                )
                .console_contains("WROTE")
                .console_contains("DISCARDED")
                .console_contains("ZEROS")
                .finish()?;
            let allocated = check_image(outcome, &overlay, 0)?;
            // 4 MiB of 64 KiB clusters stay, plus a few of metadata.
            if allocated > 64 + 16 {
                return Err(failure(
                    outcome,
                    format!("{allocated} clusters still allocated after the discard"),
                ));
            }
            Ok(())
        },
    );
    Ok(())
}

/// Runs `kiln run` with a stand-in kernel: it must refuse the disks before anything starts.
fn expect_refusal(disk: &str, message: &str) -> Result<(), String> {
    let output = Command::new(KILN)
        .args(["run", "--kernel", KILN, "--console", "none", "--disk", disk])
        .output()
        .map_err(|err| format!("cannot run kiln: {err}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() != Some(1) || !stderr.contains(message) {
        return Err(format!(
            "expected exit status 1 and {message:?}; got {:?} with stderr:\n{stderr}",
            output.status.code()
        ));
    }
    Ok(())
}

fn add_host_tests(suite: &mut Suite) {
    suite.host("detected_qcow2_with_a_backing_file_is_refused", || {
        let base = image_path("host-base.raw");
        fs::write(&base, vec![0u8; MIB as usize]).map_err(|err| err.to_string())?;
        let overlay = image_path("host-overlay.qcow2");
        create_overlay(&overlay, &base, "raw")?;
        let spec = format!("path={}", overlay.display());
        expect_refusal(&spec, "names a backing file")?;
        expect_refusal(&spec, "format=qcow2")
    });
    suite.host("qcow2_with_a_table_past_its_end_is_refused", || {
        let image = image_path("short.qcow2");
        tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", path_str(&image), "1G"],
        )?;
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|file| file.set_len(65536))
            .map_err(|err| err.to_string())?;
        expect_refusal(
            &format!("path={},format=qcow2", image.display()),
            "reaches past the end of the file",
        )
    });
    suite.host("missing_backing_file_is_refused", || {
        let base = image_path("gone.raw");
        fs::write(&base, vec![0u8; MIB as usize]).map_err(|err| err.to_string())?;
        let overlay = image_path("orphan.qcow2");
        create_overlay(&overlay, &base, "raw")?;
        fs::remove_file(&base).map_err(|err| err.to_string())?;
        expect_refusal(
            &format!("path={},format=qcow2", overlay.display()),
            "does not exist",
        )
    });
    suite.host("kiln_image_create_makes_an_overlay", || {
        let base = image_path("cli-base.raw");
        fs::write(&base, pattern(4, 2 * MIB as usize)).map_err(|err| err.to_string())?;
        let overlay = image_path("cli-overlay.qcow2");
        let output = Command::new(KILN)
            .args([
                "image",
                "create",
                "--backing",
                "cli-base.raw",
                path_str(&overlay),
            ])
            .output()
            .map_err(|err| format!("cannot run kiln: {err}"))?;
        if !output.status.success() {
            return Err(format!(
                "kiln image create failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let info = tool("qemu-img", &["info", path_str(&overlay)])?;
        if !info.contains("backing file: cli-base.raw")
            || !info.contains("backing file format: raw")
        {
            return Err(format!("qemu-img info: {info}"));
        }
        let (corruptions, leaks, _) = qemu_img_check(&overlay)?;
        if corruptions + leaks != 0 {
            return Err(format!("{corruptions} corruptions, {leaks} leaks"));
        }
        let again = Command::new(KILN)
            .args([
                "image",
                "create",
                "--backing",
                "cli-base.raw",
                path_str(&overlay),
            ])
            .output()
            .map_err(|err| format!("cannot run kiln: {err}"))?;
        let stderr = String::from_utf8_lossy(&again.stderr);
        if again.status.code() != Some(1) || !stderr.contains("exists already") {
            return Err(format!("a second create should be refused: {stderr}"));
        }
        Ok(())
    });
}

fn main() -> ExitCode {
    if let Err(err) = fs::create_dir_all(scratch_dir()) {
        eprintln!("cannot create {}: {err}", scratch_dir().display());
        return ExitCode::FAILURE;
    }
    let mut suite = Suite::new("qcow2", KILN);
    add_host_tests(&mut suite);
    type Setup = fn(&mut Suite) -> Result<(), String>;
    let setups: [(&str, Setup); 5] = [
        ("root_overlay", add_root_overlay_test),
        ("compressed", add_compressed_test),
        ("bulk", add_bulk_test),
        ("kill", add_kill_test),
        ("discard", add_discard_test),
    ];
    for (name, setup) in setups {
        if let Err(err) = setup(&mut suite) {
            suite.host(format!("{name}_set_up"), move || Err(err.clone()));
        }
    }
    let status = suite.main();
    if std::env::var_os("KILN_TEST_KEEP").is_none() {
        let _ = fs::remove_dir_all(scratch_dir());
    }
    status
}
