//! Self-tests of the guest-test harness: a passing guest passes, a wrong marker is caught by the
//! checking API, a hung guest is stopped at its time limit and reported as such. Plus the ext4
//! root file system image builder, which has no guest test yet.

use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_test_harness::{images, GuestTest, Suite};

/// Time limit of the hanging guest.
const HANG_LIMIT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let mut suite = Suite::new("harness_selftest", env!("CARGO_BIN_EXE_kiln"));

    suite.guest(
        GuestTest::new("marker_passes", "echo kiln-selftest-marker-$((6 * 7))"),
        // The shell computes 42, so the marker cannot come from an echo of the script itself.
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("kiln-selftest-marker-42")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "wrong_marker_is_caught",
            "echo kiln-selftest-marker-$((6 * 7))",
        ),
        |outcome| {
            // The checking API must reject a marker the guest did not print...
            let wrong = outcome
                .check()
                .exit_code(0)
                .console_contains("kiln-selftest-marker-43")
                .finish();
            let mut check = outcome.check();
            // ...while the run itself was fine.
            check
                .exit_code(0)
                .console_contains("kiln-selftest-marker-42");
            match wrong {
                Ok(()) => {
                    check.that(false, "a check for a marker the guest did not print passed");
                }
                Err(failure) => {
                    check.that(
                        failure.failures().len() == 1
                            && failure.failures()[0].contains("kiln-selftest-marker-43"),
                        format!(
                            "the failure should name only the missing marker: {:?}",
                            failure.failures()
                        ),
                    );
                }
            }
            check.finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "hung_guest_times_out",
            "echo kiln-selftest-hanging\nsleep 1000",
        )
        .timeout(HANG_LIMIT),
        |outcome| {
            let expected = format!("timed out after {}s", HANG_LIMIT.as_secs());
            // An ordinary check of a hung run fails, and says why.
            let ordinary = outcome.check().exit_code(0).finish();
            let mut check = outcome.check();
            check
                .timed_out()
                // What the guest printed before it hung is kept.
                .console_contains("kiln-selftest-hanging")
                .that(
                    outcome.exit_code.is_none(),
                    "a killed run has no exit status",
                )
                .that(
                    outcome.elapsed >= HANG_LIMIT - Duration::from_secs(1)
                        && outcome.elapsed < HANG_LIMIT + Duration::from_secs(20),
                    format!("stopped after {:?}, not at its limit", outcome.elapsed),
                );
            match ordinary {
                Ok(()) => {
                    check.that(false, "an ordinary check of a timed-out run passed");
                }
                Err(failure) => {
                    check.that(
                        failure.to_string().contains(&expected),
                        format!(
                            "the report should say {expected:?}: {:?}",
                            failure.failures()
                        ),
                    );
                }
            }
            check.finish()
        },
    );

    suite.host("rootfs_image_builds", check_rootfs_image);

    suite.main()
}

/// The ext4 image builds, passes e2fsck and holds the init and busybox.
fn check_rootfs_image() -> Result<(), String> {
    let image = images::rootfs_image().map_err(|error| error.to_string())?;
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .map_err(|error| format!("cannot run e2fsck: {error}"))?;
    if !fsck.status.success() {
        return Err(format!(
            "e2fsck -fn {} failed:\n{}",
            image.display(),
            String::from_utf8_lossy(&fsck.stdout)
        ));
    }
    for path in [
        "/init",
        "/bin/busybox",
        "/sbin/init",
        "/dev",
        "/proc",
        "/sys",
    ] {
        let stat = Command::new("debugfs")
            .args(["-R", &format!("stat {path}")])
            .arg(&image)
            .output()
            .map_err(|error| format!("cannot run debugfs: {error}"))?;
        let text = String::from_utf8_lossy(&stat.stdout);
        if !text.contains("Inode:") {
            return Err(format!("{} has no {path}", image.display()));
        }
    }
    Ok(())
}
