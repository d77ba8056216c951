//! `kiln run -- CMD` end to end: each test is a host-only script (run on the KVM host, the
//! virtual one in vhost mode) that runs `kiln run ... -- CMD` once; Kiln's stdout, stderr and
//! exit status are the test's outcome. Covers the exit statuses (own, signal, panic, timeout,
//! no report, not found, Ctrl-C), separate and live output, 10 MiB intact, stdin, `--copy`,
//! `--env`, `--workdir`, the default kernel from the cache, and the same with an ext4 root
//! disk. Host checks cover the usage errors that end before a guest exists.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_test_harness::disk::debugfs_cat;
use kiln_test_harness::{images, DiskOptions, GuestOutcome, GuestTest, Suite};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");

/// `run ARGS... -- CMD`: kiln with the test's kernel. Every test script starts with it.
const PRELUDE: &str = r#"
set -u
run() {
    "$KILN" run --kernel "$KERNEL" "$@"
}
"#;

/// A test whose host-only script is `body` (after [`PRELUDE`]).
fn command_test(name: &str, body: &str) -> GuestTest {
    GuestTest::new(name, "true")
        .host_only_script(format!("{PRELUDE}{body}\n"))
        .timeout(Duration::from_secs(90))
}

fn stdout(outcome: &GuestOutcome) -> &str {
    &outcome.stdout
}

fn main() -> ExitCode {
    let mut suite = Suite::new("run_command", KILN);
    let scratch = std::env::temp_dir().join(format!("kiln-run-command-{}", std::process::id()));
    fs::create_dir_all(&scratch).expect("scratch directory");

    suite.guest(
        command_test(
            "true_exits_0_with_the_default_kernel_from_the_cache",
            r#"mkdir -p "$WORK/cache/kernel-test"
ln -s "$KERNEL" "$WORK/cache/kernel-test/vmlinux"
KILN_CACHE_DIR="$WORK/cache" exec "$KILN" run -- true"#,
        ),
        |outcome| outcome.check().exit_code(0).finish(),
    );
    suite.guest(command_test("false_exits_1", "run -- false"), |outcome| {
        outcome.check().exit_code(1).finish()
    });
    suite.guest(
        command_test(
            "stdout_and_stderr_are_separate_and_the_status_is_the_commands",
            "run -- sh -c 'echo out; echo err >&2; exit 7'",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(7)
                .that(outcome.stdout == "out\n", "stdout should be exactly 'out'")
                .that(outcome.stderr == "err\n", "stderr should be exactly 'err'")
                .finish()
        },
    );
    suite.guest(
        command_test("sigkill_gives_137", "run -- sh -c 'kill -9 $$'"),
        |outcome| outcome.check().exit_code(137).finish(),
    );
    suite.guest(
        command_test(
            "a_guest_panic_gives_122",
            "run -- sh -c 'echo c > /proc/sysrq-trigger; sleep 60'",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(122)
                .that(
                    outcome.stderr.contains("panicked"),
                    "stderr names the panic",
                )
                .that(
                    outcome
                        .stderr
                        .contains("Kernel panic - not syncing: sysrq triggered crash"),
                    "stderr shows the end of the guest console, with the panic message",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "a_guest_that_powers_off_without_reporting_gives_123",
            "run -- sh -c 'echo o > /proc/sysrq-trigger; sleep 60'",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(123)
                .that(
                    outcome.stderr.contains("without reporting"),
                    "stderr says the guest did not report",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "timeout_gives_124_within_seconds",
            r#"start=$(cut -d' ' -f1 /proc/uptime)
run --timeout 5 -- sleep 600
status=$?
end=$(cut -d' ' -f1 /proc/uptime)
echo "ELAPSED=$(echo "$start $end" | awk '{printf "%d", $2 - $1}')"
exit $status"#,
        ),
        |outcome| {
            let elapsed: u64 = outcome
                .console_value("ELAPSED=")
                .and_then(|value| value.parse().ok())
                .unwrap_or(u64::MAX);
            outcome
                .check()
                .exit_code(124)
                .that(elapsed < 20, format!("took {elapsed} s, expected 5 to 20"))
                .finish()
        },
    );
    suite.guest(
        command_test(
            "ten_mib_of_random_output_arrive_complete_and_in_order_through_a_stalled_reader",
            r#"run --memory 256M -- sh -c 'head -c 10485760 /dev/urandom > /tmp/r; sha256sum < /tmp/r >&2; cat /tmp/r' 2>"$WORK/err" | (sleep 3; sha256sum) > "$WORK/sum"
status=$?
echo "HOST_SUM=$(cut -d' ' -f1 "$WORK/sum")"
echo "GUEST_SUM=$(cut -d' ' -f1 "$WORK/err")"
exit $status"#,
        )
        .timeout(Duration::from_secs(180)),
        |outcome| {
            let host = outcome.console_value("HOST_SUM=");
            let guest = outcome.console_value("GUEST_SUM=");
            outcome
                .check()
                .exit_code(0)
                .that(
                    host.is_some_and(|sum| sum.len() == 64) && host == guest,
                    format!("checksums differ: host {host:?}, guest {guest:?}"),
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "output_is_live",
            r#"run -- sh -c 'echo first; sleep 3; echo second' > "$WORK/out" &
pid=$!
tries=0
until grep -q first "$WORK/out"; do
    tries=$((tries + 1))
    [ $tries -gt 600 ] && break
    sleep 0.1
done
if grep -q second "$WORK/out"; then echo "LIVE=no"; else echo "LIVE=yes"; fi
wait $pid"#,
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.console_value("LIVE=") == Some("yes"),
                    "the first line should arrive before the second was printed",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "copy_env_workdir_and_stdin_reach_the_command",
            r#"mkdir -p "$WORK/data/sub"
echo "copied $((6 * 7))" > "$WORK/data/sub/file.txt"
printf 'from stdin' | run --copy "$WORK/data:/opt/data" --env GREETING=hello \
    --env 'SPACED=a b' --workdir /opt/data/sub -- \
    sh -c 'echo "PWD=$(pwd)"; echo "FILE=$(cat file.txt)"; echo "ENV=$GREETING $SPACED"; echo "STDIN=$(cat)"'"#,
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.console_value("PWD=") == Some("/opt/data/sub"),
                    "workdir",
                )
                .that(outcome.console_value("FILE=") == Some("copied 42"), "copy")
                .that(outcome.console_value("ENV=") == Some("hello a b"), "env")
                .that(
                    outcome.console_value("STDIN=") == Some("from stdin"),
                    "stdin",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "a_missing_command_gives_127_and_says_so",
            "run -- no-such-command arg",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(127)
                .that(
                    outcome
                        .stderr
                        .contains("no-such-command: command not found"),
                    "stderr says command not found",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "a_command_that_closes_stdout_early_still_reports",
            r#"run -- sh -c 'echo before; exec >&-; echo after-close >&2; exit 3'"#,
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(3)
                .that(stdout(outcome) == "before\n", "stdout is the first line")
                .that(outcome.stderr.contains("after-close"), "stderr goes on")
                .finish()
        },
    );
    suite.guest(
        command_test(
            "a_reader_that_goes_away_ends_a_flooding_command",
            r#"(run -- yes; echo "KILN=$?" > "$WORK/status") | head -n 2
cat "$WORK/status""#,
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(
                    outcome.stdout.starts_with("y\ny\n"),
                    "the reader got its two lines",
                )
                .that(
                    // The guest's vsock (Linux 6.1) fails the write with EPIPE without raising
                    // SIGPIPE, so busybox yes exits 1; 141 would be SIGPIPE. Either way the
                    // command saw its reader go, and Kiln did not hang.
                    matches!(outcome.console_value("KILN="), Some("1" | "141")),
                    "kiln exits with yes's status after the broken pipe",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "sigint_to_kiln_stops_the_guest_with_130",
            r#""$KILN" run --kernel "$KERNEL" -- sh -c 'echo ready; sleep 600' > "$WORK/out" &
pid=$!
tries=0
until grep -q ready "$WORK/out"; do
    tries=$((tries + 1))
    [ $tries -gt 600 ] && break
    sleep 0.1
done
kill -INT $pid
wait $pid"#,
        ),
        |outcome| outcome.check().exit_code(130).finish(),
    );
    suite.guest(
        command_test(
            "tty_runs_the_command_on_a_terminal",
            r#"printf 'tty; echo "SIZE=$(stty size)"; exit 3\n' | run --tty -- sh"#,
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(3)
                .console_contains("/dev/pts/0")
                .that(
                    outcome.console_value("SIZE=") == Some("24 80"),
                    "the terminal is 24x80 when Kiln has none",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "verbose_shows_the_kernel_log_on_stderr_only",
            "run --verbose -- echo hi",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .that(outcome.stdout == "hi\n", "stdout is the command's only")
                .that(
                    outcome.stderr.contains("Linux version"),
                    "stderr has the kernel log",
                )
                .finish()
        },
    );
    suite.guest(
        command_test(
            "net_user_gets_a_lease_and_fetches_from_the_host_loopback_through_passt",
            r#"# passt takes the host interface with the default route as its template.
ip link set lo up
ip addr add 10.0.2.15/24 dev dummy0 && ip link set dummy0 up &&
    ip route add default via 10.0.2.2 dev dummy0 || echo "HOST-FAILURE: no dummy0 for passt"
echo "greeting-$$-from-the-host-loopback" >"$WORK/greeting"
echo "SENT=$(cat "$WORK/greeting")"
nc -l -p 6001 <"$WORK/greeting" &
cat >"$WORK/fetch.sh" <<'FETCH'
echo "ADDRESS=$(ip -4 addr show eth0 | grep -o 'inet [0-9.]*' | cut -d' ' -f2)"
echo "RESOLV-LINES=$(wc -l </etc/resolv.conf)"
gateway=$(ip route | grep '^default' | cut -d' ' -f3)
mkfifo /tmp/hold
exec 5<>/tmp/hold
echo "FETCHED=$(nc -w 10 "$gateway" 6001 <&5)"
FETCH
run --net user --copy "$WORK/fetch.sh:/fetch.sh" -- sh /fetch.sh"#,
        ),
        |outcome| {
            let sent = outcome.console_value("SENT=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .console_lacks("HOST-FAILURE")
                .that(
                    outcome.console_value("ADDRESS=") == Some("10.0.2.15"),
                    "eth0 got passt's address by DHCP before the command started",
                )
                .that(
                    outcome
                        .console_value("RESOLV-LINES=")
                        .is_some_and(|lines| lines.parse::<u32>().is_ok()),
                    "kiln-init wrote /etc/resolv.conf",
                )
                .that(
                    !sent.is_empty() && outcome.console_value("FETCHED=") == Some(sent),
                    "the command fetched the line from the host's loopback server",
                )
                .finish()
        },
    );
    match root_disk(&scratch) {
        Ok(root) => {
            let image = root.clone();
            suite.guest(
                command_test(
                    "in_a_root_disk_copy_env_workdir_status_and_streams_work",
                    r#"echo "copied $((6 * 7))" > "$WORK/file.txt"
run --disk "path=$DISK_0,root" --copy "$WORK/file.txt:/opt/file.txt" --env V=root-env \
    --workdir /opt -- sh -c 'grep " / " /proc/mounts; echo "FILE=$(cat file.txt)"; echo "ENV=$V";
        echo "PWD=$(pwd)"; test -e /kiln/command && echo "INITRAMFS=visible"; echo persisted > /root/from-command;
        echo err >&2; exit 5'"#,
                )
                .disk(&root, DiskOptions::new().id("run-root")),
                move |outcome| {
                    let written = debugfs_cat(&image, "/root/from-command");
                    outcome
                        .check()
                        .exit_code(5)
                        .console_contains("/dev/vda / ext4")
                        .console_lacks("INITRAMFS=visible")
                        .that(outcome.console_value("FILE=") == Some("copied 42"), "copy")
                        .that(outcome.console_value("ENV=") == Some("root-env"), "env")
                        .that(outcome.console_value("PWD=") == Some("/opt"), "workdir")
                        .that(outcome.stderr == "err\n", "stderr is the command's")
                        .that(
                            written.as_deref() == Ok(b"persisted\n".as_slice()),
                            format!("the file written in the root disk: {written:?}"),
                        )
                        .finish()
                },
            );
            suite.guest(
                command_test(
                    "in_a_root_disk_signals_and_missing_commands_map_like_in_the_initramfs",
                    r#"run --disk "path=$DISK_0,root" -- sh -c 'kill -9 $$'
echo "KILLED=$?"
run --disk "path=$DISK_0,root" -- no-such-command"#,
                )
                .disk(&root, DiskOptions::new().id("run-root")),
                |outcome| {
                    outcome
                        .check()
                        .exit_code(127)
                        .that(outcome.console_value("KILLED=") == Some("137"), "kill -9")
                        .finish()
                },
            );
        }
        Err(err) => {
            suite.host("root_disk_image", move || Err(err.clone()));
        }
    }

    suite.host("usage_errors_give_125_before_any_guest", || {
        for (args, message) in [
            (&["run", "--"][..], "no command after --"),
            (&["run", "--kernel", "/k", "--", ""], "empty string"),
            (
                &[
                    "run",
                    "--kernel",
                    "/k",
                    "--copy",
                    "/nonexistent/x:/x",
                    "--",
                    "true",
                ],
                "--copy /nonexistent/x",
            ),
            (
                &[
                    "run",
                    "--kernel",
                    "/k",
                    "--copy",
                    "x:relative",
                    "--",
                    "true",
                ],
                "not absolute",
            ),
            (
                &["run", "--kernel", "/k", "--bogus", "--", "true"],
                "--bogus",
            ),
            (
                &["run", "--kernel", "/k", "--console", "stdio", "--", "true"],
                "--verbose",
            ),
            (
                &["run", "--kernel", "/k", "--initrd", "/i", "--", "true"],
                "--initrd cannot",
            ),
        ] {
            let output = Command::new(KILN)
                .args(args)
                .output()
                .map_err(|err| err.to_string())?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if output.status.code() != Some(125) || !stderr.contains(message) {
                return Err(format!(
                    "kiln {args:?}: status {:?}, stderr {stderr:?}; expected 125 and '{message}'",
                    output.status.code()
                ));
            }
        }
        let output = Command::new(KILN)
            .args(["run", "--timeout", "5"])
            .output()
            .map_err(|err| err.to_string())?;
        if output.status.code() != Some(2) {
            return Err(format!(
                "--timeout without a command: status {:?}, expected 2",
                output.status.code()
            ));
        }
        Ok(())
    });

    let status = suite.main();
    if std::env::var_os("KILN_TEST_KEEP").is_none() {
        let _ = fs::remove_dir_all(&scratch);
    }
    status
}

/// A private copy of the rootfs image (the tests write into it).
fn root_disk(scratch: &std::path::Path) -> Result<PathBuf, String> {
    let rootfs = images::rootfs_image().map_err(|err| err.to_string())?;
    let root = scratch.join("run-root.img");
    fs::copy(&rootfs, &root).map_err(|err| format!("cannot copy the rootfs image: {err}"))?;
    Ok(root)
}
