//! Snapshots of a Linux guest, end to end through Firecracker's API and `kiln restore`: host-only
//! scripts (`GuestTest::host_only_script`, run on the KVM host, the virtual one in vhost mode)
//! boot the guest with `kiln --api-sock`, pause it, take a snapshot with `PUT /snapshot/create`,
//! kill Kiln with SIGKILL and restore the snapshot in a new Kiln process.
//!
//! - A shell loop appending numbered lines to a file on its ext4 disk goes on where it was: the
//!   console of both processes together and the file on the image hold every number once, in
//!   order; `e2fsck` finds the image clean after the guest unmounted it and powered off.
//! - A vsock listener in the guest accepts a new host connection after `PUT /snapshot/load`,
//!   and the connection open at snapshot time is reset in the guest (transport reset).
//! - Clones of a `--net user` guest (`kiln run --api-sock`, `kiln restore --net 1=user,...`):
//!   each answers a host client on its own forwarded port, and only its own.
//! - Refusals: a snapshot of a running VM (Firecracker's error), and a snapshot whose disk was
//!   written after it was taken (`kiln restore` and `PUT /snapshot/load`: nothing starts, the
//!   snapshot files stay as they were).
//!
//! The refusals that need no Linux guest are in tests/snapshot.rs (direct /dev/kvm).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_test_harness::disk::debugfs_cat;
use kiln_test_harness::host_scripts::API_SCRIPT_PRELUDE;
use kiln_test_harness::{images, CheckFailure, DiskOptions, GuestOutcome, GuestTest, Suite};

/// What this file's host-only scripts add to the harness's API functions.
const LOCAL_FUNCTIONS: &str = r#"
# boot_source: the test's kernel and initrd, with a serial console.
boot_source() {
    expect 204 PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1\"}"
}
# snapshot_and_kill: pause, snapshot to $WORK/vm.state + vm.mem, SIGKILL this Kiln.
snapshot_and_kill() {
    expect 204 PATCH /vm '{"state": "Paused"}'
    expect 204 PUT /snapshot/create "{\"snapshot_type\": \"Full\", \"snapshot_path\": \"$WORK/vm.state\", \"mem_file_path\": \"$WORK/vm.mem\"}"
    kill -KILL "$KILN_PID"
    wait "$KILN_PID" 2>/dev/null
    mv "$WORK/console" "$WORK/console.before"
    mv "$WORK/kiln.log" "$WORK/kiln.before.log"
}
LOAD_BODY="{\"snapshot_path\": \"$WORK/vm.state\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"$WORK/vm.mem\"}, \"resume_vm\": true}"
"#;

/// A host-only script: the harness's API shell functions, this file's, then `body`.
fn api_script(body: &str) -> String {
    format!("{API_SCRIPT_PRELUDE}\n{LOCAL_FUNCTIONS}\n{body}")
}

/// What Linux logs when it finds a virtio-mmio device twice (command line and ACPI DSDT).
const PROBE_FAILED: &str = "can't request region";

/// The most kvm-clock and the TSC may disagree across a restore. Linux's clocksource watchdog
/// marks the TSC unstable above about half a millisecond; in the virtual KVM host (QEMU TCG, its
/// TSCs unsynchronized) 5-8 ms remain after Kiln's part is right (it was 94-300 ms when kvmclock
/// was frozen later than the TSC), so this bounds Kiln's error, not the host's.
const MAX_CLOCK_SKEW_NS: i64 = 30_000_000;

/// The kvm-clock and TSC nanoseconds of the guest's clocksource watchdog complaint, if any.
fn watchdog_skew_ns(console: &str) -> Option<i64> {
    let value = |key: &str| -> Option<i64> {
        let at = console.find(key)? + key.len();
        let digits: String = console[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '-')
            .collect();
        digits.parse().ok()
    };
    Some(value("'kvm-clock' wd_nsec:")? - value("'tsc' cs_nsec:")?)
}

/// Lines the guest's loop writes (one every 0.2 s of guest time).
const LOOP_LINES: u32 = 40;

/// Every `LOOP n` number on a console, in order (a kernel message can follow on the same line).
fn loop_numbers(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|line| line.strip_prefix("LOOP "))
        .filter_map(|rest| {
            let rest = rest.trim_start();
            let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            rest[..digits].parse().ok()
        })
        .collect()
}

/// The part of the script's output between `begin` and `end` marker lines.
fn section<'a>(text: &'a str, begin: &str, end: &str) -> &'a str {
    let Some(start) = text.find(begin) else {
        return "";
    };
    let rest = &text[start + begin.len()..];
    &rest[..rest.find(end).unwrap_or(rest.len())]
}

fn failure(outcome: &GuestOutcome, what: impl Into<String>) -> CheckFailure {
    CheckFailure::new(outcome, what)
}

/// `e2fsck -fn IMAGE`: Ok when the file system is clean.
fn e2fsck_clean(image: &Path) -> Result<(), String> {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .map_err(|err| format!("cannot run e2fsck: {err}"))?;
    if fsck.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn fails on the image after the guest powered off:\n{}",
            String::from_utf8_lossy(&fsck.stdout)
        ))
    }
}

/// The guest's loop: mounts its ext4 disk, appends `line N` to a file and prints `LOOP N`.
fn loop_guest() -> String {
    format!(
        r#"mkdir -p /mnt
mount -t ext4 /dev/vda /mnt || {{ echo MOUNT-FAILED; exit 1; }}
i=0
while [ $i -lt {LOOP_LINES} ]; do
    i=$((i + 1))
    echo "line $i" >>/mnt/loop.txt
    echo "LOOP $i"
    sleep 0.2
done
umount /mnt && echo UNMOUNTED
echo "UPTIME=$(cut -d' ' -f1 /proc/uptime)"
"#
    )
}

fn add_loop_test(suite: &mut Suite, root: PathBuf) {
    let script = api_script(
        r#"
start_kiln
boot_source
expect 204 PUT /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$DISK_0\", \"is_root_device\": false, \"is_read_only\": false}"
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
wait_file "$WORK/console" 'LOOP 8' || exit 1
snapshot_and_kill
# A new process: kiln restore, the console on its stdout; it ends when the guest powers off.
"$KILN" restore --state "$WORK/vm.state" --memory-file "$WORK/vm.mem" >"$WORK/console" 2>"$WORK/kiln.log"
echo "RESTORED_STATUS=$?"
echo "RESTORED_IN=$(grep -o 'restored in [0-9.]* ms' "$WORK/kiln.log")"
echo "=== BEFORE"
cat "$WORK/console.before"
echo "=== AFTER"
cat "$WORK/console"
echo "=== END"
cat "$WORK/kiln.before.log" "$WORK/kiln.log" >&2
"#,
    );
    let image = root.clone();
    suite.guest(
        GuestTest::new(
            "loop_on_ext4_goes_on_after_kill_and_kiln_restore",
            loop_guest(),
        )
        .disk(&root, DiskOptions::new().id("rootfs"))
        .host_only_script(script)
        .timeout(Duration::from_secs(240)),
        move |outcome| {
            let before = section(&outcome.stdout, "=== BEFORE\n", "=== AFTER\n");
            let after = section(&outcome.stdout, "=== AFTER\n", "=== END\n");
            // The boundary can cut a line: the two consoles together are one stream.
            let numbers = loop_numbers(&format!("{before}{after}"));
            let expected: Vec<u32> = (1..=LOOP_LINES).collect();
            outcome
                .check()
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("RESTORED_STATUS=0")
                .that(
                    loop_numbers(before).len() >= 8,
                    "the first Kiln should have printed LOOP 1 to 8 before the snapshot",
                )
                .that(
                    !before.contains(PROBE_FAILED) && !before.contains("failed with error"),
                    "the guest found its disk twice at boot (a virtio-mmio probe failed)",
                )
                .that(
                    !loop_numbers(after).is_empty() && after.contains("UNMOUNTED"),
                    "the restored guest should go on counting and unmount its disk",
                )
                .that(
                    !after.contains("Linux version"),
                    "the restored guest booted again instead of going on",
                )
                .that(
                    !matches!(watchdog_skew_ns(after), Some(skew) if skew.abs() >= MAX_CLOCK_SKEW_NS),
                    format!(
                        "the restored guest's kvm-clock and TSC disagree by {:?} ns across the \
                         restore (bound {MAX_CLOCK_SKEW_NS})",
                        watchdog_skew_ns(after)
                    ),
                )
                .that(
                    numbers == expected,
                    format!(
                        "the two consoles together should count 1 to {LOOP_LINES} once each, \
                         got {numbers:?}"
                    ),
                )
                .finish()?;
            let file = debugfs_cat(&image, "/loop.txt")
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|err| failure(outcome, err))?;
            let wanted: String = (1..=LOOP_LINES).map(|i| format!("line {i}\n")).collect();
            if file != wanted {
                return Err(failure(
                    outcome,
                    format!("loop.txt on the image should hold line 1 to {LOOP_LINES}:\n{file}"),
                ));
            }
            e2fsck_clean(&image).map_err(|err| failure(outcome, err))
        },
    );
}

fn add_vsock_test(suite: &mut Suite) {
    let script = api_script(
        r#"
VSOCK="$WORK/v.sock"
start_kiln
boot_source
expect 204 PUT /vsock "{\"guest_cid\": 3, \"uds_path\": \"$VSOCK\"}"
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
wait_file "$WORK/console" 'LISTENING 5000' || exit 1
# A connection that stays open across the snapshot: its echo proves it is up.
(echo before-snapshot; sleep 300) | kiln-vsock uds-connect "$VSOCK" 5000 >"$WORK/old.out" 2>"$WORK/old.err" &
OLD_CLIENT=$!
wait_file "$WORK/old.out" before-snapshot || exit 1
snapshot_and_kill
# The Unix side of the old connection ends with the Kiln that served it.
tries=0
while kill -0 "$OLD_CLIENT" 2>/dev/null && [ $tries -lt 50 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
kill -0 "$OLD_CLIENT" 2>/dev/null && echo "OLD_CLIENT_STILL_RUNNING"
echo "OLD_ECHO=$(cat "$WORK/old.out")"
echo "OLD_ANSWER=$(head -n 1 "$WORK/old.err")"
# Like Firecracker, the restored device listens on the snapshot's socket path again.
rm -f "$VSOCK"
start_kiln
expect 204 PUT /snapshot/load "$LOAD_BODY"
expect 200 GET /
expect 200 GET /vm/config
echo after-restore | kiln-vsock uds-connect "$VSOCK" 5000 >"$WORK/new.out" 2>"$WORK/new.err"
NEW_STATUS=$?
echo "NEW_STATUS=$NEW_STATUS"
echo "NEW_ECHO=$(cat "$WORK/new.out")"
echo "NEW_ANSWER=$(cat "$WORK/new.err")"
# A refused or closed new connection leaves the guest waiting for it: fail now, not at the
# test's time limit.
if [ "$NEW_STATUS" != 0 ] || ! grep -q '^OK ' "$WORK/new.err"; then
    echo "NEW-CONNECTION-FAILED: stopping the guest"
    kill -KILL "$KILN_PID" 2>/dev/null
fi
wait "$KILN_PID"
echo "KILN_STATUS=$?"
echo "=== BEFORE"
cat "$WORK/console.before"
echo "=== AFTER"
cat "$WORK/console"
echo "=== END"
cat "$WORK/kiln.before.log" "$WORK/kiln.log" >&2
"#,
    );
    suite.guest(
        GuestTest::new(
            "vsock_listener_accepts_after_snapshot_load_and_old_connection_is_reset",
            "kiln-vsock listen 5000 2 &\nwait $!\necho GUEST-DONE",
        )
        .host_only_script(script)
        .timeout(Duration::from_secs(180)),
        |outcome| {
            let before = section(&outcome.stdout, "=== BEFORE\n", "=== AFTER\n");
            let after = section(&outcome.stdout, "=== AFTER\n", "=== END\n");
            let done: Vec<&str> = after
                .lines()
                .filter_map(|line| line.trim_end_matches('\r').strip_prefix("CONN-DONE "))
                .collect();
            let answer = outcome.console_value("NEW_ANSWER=").unwrap_or_default();
            outcome
                .check()
                .console_lacks("API-FAILURE")
                .console_lacks("NEW-CONNECTION-FAILED")
                .console_contains("\"state\":\"Running\"")
                .console_contains("KILN_STATUS=0")
                .console_lacks("OLD_CLIENT_STILL_RUNNING")
                .that(
                    outcome.console_value("OLD_ECHO=") == Some("before-snapshot"),
                    "the connection open at snapshot time should have echoed before it",
                )
                .that(
                    !before.contains("CONN-DONE"),
                    "no connection should have ended before the snapshot",
                )
                .that(
                    !before.contains(PROBE_FAILED) && !before.contains("failed with error"),
                    "the guest found its vsock device twice at boot (a virtio-mmio probe failed)",
                )
                .that(
                    outcome.console_value("NEW_STATUS=") == Some("0")
                        && outcome.console_value("NEW_ECHO=") == Some("after-restore"),
                    "a new connection to the restored guest's listener should echo",
                )
                .that(
                    answer.starts_with("OK "),
                    format!("the new connection should get 'OK <port>', got {answer:?}"),
                )
                .that(
                    // The guest may still hold the old connection's socket on its port.
                    outcome
                        .console_value("OLD_ANSWER=")
                        .is_some_and(|old| old.starts_with("OK ") && old != answer),
                    format!(
                        "the new connection should get another host port than the old one: \
                         old {:?}, new {answer:?}",
                        outcome.console_value("OLD_ANSWER=")
                    ),
                )
                .that(
                    // Kernel messages can land on the same console line.
                    done.len() == 2
                        && done
                            .iter()
                            .any(|d| d.starts_with("bytes=? end=Connection reset by peer"))
                        && done.iter().any(|d| d.starts_with("bytes=14 end=eof")),
                    format!(
                        "in the guest the old connection should be reset and the new one \
                         end at EOF after 14 bytes: {done:?}"
                    ),
                )
                .that(after.contains("GUEST-DONE"), "the guest should finish")
                .finish()
        },
    );
}

fn add_refusals_test(suite: &mut Suite, data: PathBuf) {
    let script = api_script(
        r#"
start_kiln
boot_source
expect 204 PUT /drives/data "{\"drive_id\": \"data\", \"path_on_host\": \"$DISK_0\", \"is_root_device\": false, \"is_read_only\": false}"
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
wait_file "$WORK/console" GUEST-READY || exit 1
# Running: refused as Firecracker refuses it, and nothing written.
expect 400 PUT /snapshot/create "{\"snapshot_path\": \"$WORK/vm.state\", \"mem_file_path\": \"$WORK/vm.mem\"}"
echo "RUNNING_REFUSAL=$(cat "$WORK/answer")"
[ -e "$WORK/vm.state" ] || [ -e "$WORK/vm.mem" ] && echo "FILES_AFTER_REFUSAL"
snapshot_and_kill
sums=$(sha256sum "$WORK/vm.state" "$WORK/vm.mem")
# The disk is written after the snapshot: its data no longer matches the guest's page cache.
printf 'written after the snapshot' | dd of="$DISK_0" bs=512 seek=8 conv=notrunc,fsync 2>/dev/null
"$KILN" restore --state "$WORK/vm.state" --memory-file "$WORK/vm.mem" >"$WORK/restore.console" 2>"$WORK/restore.log"
echo "RESTORE_STATUS=$?"
echo "RESTORE_ERROR=$(grep -i error "$WORK/restore.log" | tail -n 1)"
echo "RESTORE_CONSOLE_BYTES=$(wc -c <"$WORK/restore.console")"
start_kiln
expect 400 PUT /snapshot/load "$LOAD_BODY"
echo "LOAD_REFUSAL=$(cat "$WORK/answer")"
expect 200 GET /
[ "$sums" = "$(sha256sum "$WORK/vm.state" "$WORK/vm.mem")" ] && echo "SNAPSHOT_UNCHANGED"
echo "LOAD_CONSOLE_BYTES=$(wc -c <"$WORK/console")"
kill "$KILN_PID"
wait "$KILN_PID"
echo "KILN_STATUS=$?"
cat "$WORK/console.before"
cat "$WORK/kiln.before.log" "$WORK/restore.log" "$WORK/kiln.log" >&2
"#,
    );
    suite.guest(
        GuestTest::new(
            "refused_while_running_and_with_a_disk_written_after_the_snapshot",
            "echo \"DATA=$(head -c 9 /dev/vda)\"\necho GUEST-READY\nsleep 600",
        )
        .disk(&data, DiskOptions::new().id("data"))
        .host_only_script(script)
        .timeout(Duration::from_secs(180)),
        |outcome| {
            let modified = "it was modified after the snapshot was taken";
            outcome
                .check()
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("DATA=kiln-snap")
                .console_lacks("FILES_AFTER_REFUSAL")
                .that(
                    outcome.console_value("RUNNING_REFUSAL=")
                        == Some(
                            r#"{"fault_message":"Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running"}"#,
                        ),
                    "a snapshot of a running VM should get Firecracker's error",
                )
                .that(
                    outcome.console_value("RESTORE_STATUS=") == Some("1"),
                    "kiln restore should fail with status 1",
                )
                .that(
                    outcome
                        .console_value("RESTORE_ERROR=")
                        .is_some_and(|line| line.contains("disk 1") && line.contains(modified)),
                    "kiln restore should name the modified disk",
                )
                .that(
                    outcome.console_value("RESTORE_CONSOLE_BYTES=") == Some("0")
                        && outcome.console_value("LOAD_CONSOLE_BYTES=") == Some("0"),
                    "no guest should have run after a refused restore",
                )
                .that(
                    outcome.console_value("LOAD_REFUSAL=").is_some_and(|body| {
                        body.contains("Load snapshot error: ") && body.contains(modified)
                    }),
                    "PUT /snapshot/load should be refused naming the modified disk",
                )
                .console_contains("\"state\":\"Not started\"")
                .console_contains("SNAPSHOT_UNCHANGED")
                .console_contains("KILN_STATUS=143")
                .finish()
        },
    );
}

/// The guest of the clone test: a DHCP lease from passt, then a TCP server on port 80 that
/// answers every connection with the line it read.
const USER_NET_GUEST: &str = r#"
udhcpc -i eth0 -n -q -t 20 -T 1 >/tmp/dhcp.log 2>&1
echo "DHCP-STATUS=$?"
while :; do
    nc -l -p 80 -e sh -c 'read line; echo "guest-echo:$line"; echo "SERVED $line" >/dev/console'
done &
sleep 0.5
echo SERVING
sleep 600
"#;

fn add_user_net_clone_test(suite: &mut Suite) {
    let script = api_script(
        r#"
# passt takes the host interface with the default route as its template.
ip link set lo up
ip addr add 10.0.2.15/24 dev dummy0 && ip link set dummy0 up &&
    ip route add default via 10.0.2.2 dev dummy0 || echo "HOST-FAILURE: no dummy0 for passt"
rm -f "$SOCK"
"$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --memory 256M --console "file=$WORK/console" \
    --net user,hostfwd=tcp:127.0.0.1:6080-:80 --api-sock "$SOCK" 2>"$WORK/kiln.log" &
KILN_PID=$!
wait_file "$WORK/console" SERVING || { kill -KILL "$KILN_PID"; exit 1; }
echo "ORIGIN-REPLY=$(echo from-origin | nc -w 10 127.0.0.1 6080)"
expect 200 GET /
snapshot_and_kill
# ask PORT LINE: the reply through a clone's forwarded port (its passt may still be starting).
ask() {
    tries=0
    while [ $tries -lt 50 ]; do
        reply=$(echo "$2" | nc -w 5 127.0.0.1 "$1")
        [ -n "$reply" ] && break
        tries=$((tries + 1))
        sleep 0.2
    done
    echo "$reply"
}
for clone in a b; do
    port=608$( [ $clone = a ] && echo 1 || echo 2 )
    "$KILN" restore --state "$WORK/vm.state" --memory-file "$WORK/vm.mem" \
        --console "file=$WORK/console.$clone" --net "1=user,hostfwd=tcp:127.0.0.1:$port-:80" \
        2>"$WORK/kiln.$clone.log" &
    eval "PID_$clone=\$!"
done
echo "CLONE-A-REPLY=$(ask 6081 to-clone-a)"
echo "CLONE-B-REPLY=$(ask 6082 to-clone-b)"
echo "SNAPSHOT-PORT-AFTER=$(echo stray | nc -w 2 127.0.0.1 6080)"
kill "$PID_a" "$PID_b"
wait "$PID_a"
echo "CLONE-A-STATUS=$?"
wait "$PID_b"
echo "CLONE-B-STATUS=$?"
echo "=== ORIGIN"
cat "$WORK/console.before"
for clone in a b; do
    echo "=== CLONE $clone"
    cat "$WORK/console.$clone"
done
echo "=== END"
cat "$WORK/kiln.before.log" "$WORK/kiln.a.log" "$WORK/kiln.b.log" >&2
"#,
    );
    suite.guest(
        GuestTest::new(
            "clones_of_a_user_net_guest_each_answer_on_their_own_forwarded_port",
            USER_NET_GUEST,
        )
        .host_only_script(script)
        .timeout(Duration::from_secs(180)),
        |outcome| {
            let clone_a = section(&outcome.stdout, "=== CLONE a\n", "=== CLONE b\n");
            let clone_b = section(&outcome.stdout, "=== CLONE b\n", "=== END\n");
            outcome
                .check()
                .console_lacks("API-FAILURE")
                .console_lacks("HOST-FAILURE")
                .console_contains("DHCP-STATUS=0")
                .that(
                    outcome.console_value("ORIGIN-REPLY=") == Some("guest-echo:from-origin"),
                    "the origin's guest answers through its forwarded port",
                )
                .that(
                    outcome.console_value("CLONE-A-REPLY=") == Some("guest-echo:to-clone-a")
                        && outcome.console_value("CLONE-B-REPLY=") == Some("guest-echo:to-clone-b"),
                    "each clone's guest answers through the clone's own forwarded port",
                )
                .that(
                    clone_a.contains("SERVED to-clone-a")
                        && !clone_a.contains("SERVED to-clone-b")
                        && clone_b.contains("SERVED to-clone-b")
                        && !clone_b.contains("SERVED to-clone-a"),
                    "each line reaches only its own clone",
                )
                .that(
                    outcome
                        .console_value("SNAPSHOT-PORT-AFTER=")
                        .unwrap_or_default()
                        .is_empty(),
                    "no clone forwards the snapshot's port",
                )
                .console_contains("CLONE-A-STATUS=143")
                .console_contains("CLONE-B-STATUS=143")
                .finish()
        },
    );
}

fn main() -> ExitCode {
    let mut suite = Suite::new("snapshot_linux", env!("CARGO_BIN_EXE_kiln"));
    let scratch = std::env::temp_dir().join(format!("kiln-snapshot-linux-{}", std::process::id()));
    fs::create_dir_all(&scratch).expect("scratch directory");

    let root = scratch.join("loop-root.ext4");
    match images::rootfs_image() {
        Ok(rootfs) => {
            fs::copy(&rootfs, &root).expect("copy the rootfs image");
            add_loop_test(&mut suite, root);
        }
        Err(err) => {
            let reason = err.to_string();
            suite.host(
                "loop_on_ext4_goes_on_after_kill_and_kiln_restore",
                move || Err(format!("no ext4 rootfs image: {reason}")),
            );
        }
    }
    add_vsock_test(&mut suite);
    let data = scratch.join("snap-data.img");
    fs::write(&data, b"kiln-snap").expect("write the data image");
    File::options()
        .write(true)
        .open(&data)
        .and_then(|file| file.set_len(1 << 20))
        .expect("size the data image");
    add_refusals_test(&mut suite, data);
    add_user_net_clone_test(&mut suite);

    let code = suite.main();
    if std::env::var_os("KILN_TEST_KEEP").is_none() {
        let _ = fs::remove_dir_all(&scratch);
    }
    code
}
