//! Kiln's Firecracker API with a Linux guest: host-only scripts
//! (`GuestTest::host_only_script`, run on the KVM host, the virtual one in vhost mode, instead
//! of `kiln run`) start `kiln --api-sock`, configure and boot the guest with `curl`, and the
//! guest reports what it got. Also Firecracker's `--config-file` layout booting the same
//! guest, a live drive swap, metrics, pause/resume that leaves the guest's clock alone, and
//! `SendCtrlAltDel` rebooting the guest (which ends Kiln), and a NIC on a TAP plus the entropy
//! device attached over the API.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use kiln_test_harness::host_scripts::API_SCRIPT_PRELUDE;
use kiln_test_harness::{CheckFailure, DiskOptions, GuestOutcome, GuestTest, Suite};

/// What this file's host-only scripts add to the harness's API functions.
const LOCAL_FUNCTIONS: &str = r#"
BOOT_ARGS="console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1"
"#;

/// A host-only script: the harness's API shell functions, this file's, then `body`.
fn api_script(body: &str) -> String {
    format!("{API_SCRIPT_PRELUDE}\n{LOCAL_FUNCTIONS}\n{body}")
}

/// The guest reports its disks, waits for the host to swap the second one, and reports again.
const DISKS_GUEST: &str = r#"
echo "NPROC=$(nproc)"
echo "VDA=$(head -c 16 /dev/vda)"
echo "VDB=$(head -c 16 /dev/vdb)"
echo "SERIAL_A=$(cat /sys/block/vda/serial)"
echo "SERIAL_B=$(cat /sys/block/vdb/serial)"
before=$(cat /sys/block/vdb/size)
echo "SWAP-NOW size=$before"
i=0
while [ "$(cat /sys/block/vdb/size)" = "$before" ] && [ $i -lt 900 ]; do
    sleep 0.1
    i=$((i + 1))
done
sync
echo 3 > /proc/sys/vm/drop_caches
echo "VDB_SIZE_AFTER=$(cat /sys/block/vdb/size)"
echo "VDB_AFTER=$(head -c 16 /dev/vdb)"
"#;

fn image(dir: &Path, name: &str, bytes: u64, head: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, head).expect("write test image");
    File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(bytes))
        .expect("size test image");
    path
}

fn failure(outcome: &GuestOutcome, what: impl Into<String>) -> CheckFailure {
    CheckFailure::new(outcome, what)
}

fn main() -> ExitCode {
    let mut suite = Suite::new("api_linux", env!("CARGO_BIN_EXE_kiln"));
    let scratch = std::env::temp_dir().join(format!("kiln-api-linux-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let root = image(&scratch, "api-root.img", 1 << 20, b"kiln-api-vda-ok!");
    let data = image(&scratch, "api-data.img", 1 << 20, b"kiln-api-vdb-one");
    let swapped = image(&scratch, "api-data2.img", 2 << 20, b"kiln-api-vdb-two");
    // The config-file test's own copies: an image only one test uses can be put back, so a test
    // the virtual host's faults broke can run again (docs/testing.md).
    let config_root = image(&scratch, "api-root-b.img", 1 << 20, b"kiln-api-vda-ok!");
    let config_data = image(&scratch, "api-data-b.img", 1 << 20, b"kiln-api-vdb-one");

    let drives_script = api_script(
        r#"
start_kiln
expect 200 GET /
expect 204 PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"$BOOT_ARGS\"}"
expect 204 PUT /machine-config '{"vcpu_count": 2, "mem_size_mib": 256}'
expect 204 PUT /metrics "{\"metrics_path\": \"$WORK/metrics\"}"
# Added second but marked root: Firecracker puts it first, so it is /dev/vda.
expect 204 PUT /drives/data "{\"drive_id\": \"data\", \"path_on_host\": \"$DISK_1\", \"is_root_device\": false, \"is_read_only\": false}"
expect 204 PUT /drives/rootfs "{\"drive_id\": \"rootfs\", \"path_on_host\": \"$DISK_0\", \"is_root_device\": true, \"is_read_only\": true}"
expect 400 PUT /drives/other "{\"drive_id\": \"other\", \"path_on_host\": \"$DISK_2\", \"is_root_device\": true}"
expect 200 GET /vm/config
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
expect 200 GET /
expect 400 PUT /actions '{"action_type": "InstanceStart"}'
wait_console SWAP-NOW
# The guest has read both disks and waits for the swap: their reads are in this line.
expect 204 PUT /actions '{"action_type": "FlushMetrics"}'
echo "METRICS=$(tail -n 1 "$WORK/metrics")"
expect 204 PATCH /drives/data "{\"drive_id\": \"data\", \"path_on_host\": \"$DISK_2\"}"
finish
"#,
    );
    suite.guest(
        GuestTest::new(
            "api_boots_linux_with_drives_and_swaps_one_live",
            DISKS_GUEST,
        )
        .disk(&root, DiskOptions::new().id("api-root"))
        .disk(&data, DiskOptions::new().id("api-data"))
        .disk(&swapped, DiskOptions::new().id("api-data2"))
        .host_only_script(drives_script)
        .timeout(Duration::from_secs(180)),
        |outcome| {
            let metrics: serde_json::Value = outcome
                .console_value("METRICS=")
                .and_then(|line| serde_json::from_str(line).ok())
                .unwrap_or_default();
            let mut check = outcome.check();
            check
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("\"state\":\"Running\"")
                .console_contains("A root block device already exists!")
                .console_contains("not supported after starting the microVM")
                .that(
                    outcome.console_value("NPROC=") == Some("2"),
                    "the guest should have the 2 vCPUs of PUT /machine-config",
                )
                .that(
                    outcome.console_value("VDA=") == Some("kiln-api-vda-ok!"),
                    "the root drive should be /dev/vda",
                )
                .that(
                    outcome.console_value("SERIAL_A=") == Some("rootfs"),
                    "vda's serial should be its drive_id",
                )
                .that(
                    outcome.console_value("VDB=") == Some("kiln-api-vdb-one"),
                    "the other drive should be /dev/vdb",
                )
                .that(
                    outcome.console_value("VDB_SIZE_AFTER=") == Some("4096"),
                    "the guest should see the new image's 4096 sectors after PATCH /drives",
                )
                .that(
                    outcome.console_value("VDB_AFTER=") == Some("kiln-api-vdb-two"),
                    "after PATCH /drives the guest should read the new image",
                )
                .that(
                    metrics["vcpu"]["exit_mmio_write"].as_u64().unwrap_or(0) > 0,
                    format!("FlushMetrics should count the guest's MMIO writes: {metrics}"),
                );
            check.finish()?;
            // The first line: every read the guest did before the swap is in it.
            for key in ["block", "block_rootfs", "block_data"] {
                if metrics[key]["read_count"].as_u64().unwrap_or(0) == 0 {
                    return Err(failure(
                        outcome,
                        format!("no reads counted in {key}: {metrics}"),
                    ));
                }
            }
            Ok(())
        },
    );

    let config_script = api_script(
        r#"
cat >"$WORK/vm_config.json" <<EOF
{
  "boot-source": {
    "kernel_image_path": "$KERNEL",
    "initrd_path": "$INITRD",
    "boot_args": "$BOOT_ARGS"
  },
  "drives": [
    {"drive_id": "data", "path_on_host": "$DISK_1", "is_root_device": false, "is_read_only": false},
    {"drive_id": "rootfs", "path_on_host": "$DISK_0", "is_root_device": true, "is_read_only": true,
     "cache_type": "Unsafe", "io_engine": "Sync", "rate_limiter": null, "partuuid": null}
  ],
  "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false},
  "network-interfaces": [],
  "vsock": null,
  "logger": null,
  "metrics": null,
  "balloon": null,
  "mmds-config": null,
  "entropy": null
}
EOF
"$KILN" --no-api --config-file "$WORK/vm_config.json" >"$WORK/console" 2>"$WORK/kiln.log"
status=$?
echo "KILN_STATUS=$status"
cat "$WORK/console"
cat "$WORK/kiln.log" >&2
exit $status
"#,
    );
    suite.guest(
        GuestTest::new(
            "firecracker_config_file_boots_the_same_guest",
            "echo \"NPROC=$(nproc)\"\necho \"VDA=$(head -c 16 /dev/vda)\"\n\
             echo \"VDB=$(head -c 16 /dev/vdb)\"\necho \"CMDLINE=$(cat /proc/cmdline)\"",
        )
        .disk(&config_root, DiskOptions::new().id("api-root"))
        .disk(&config_data, DiskOptions::new().id("api-data"))
        .host_only_script(config_script)
        .timeout(Duration::from_secs(120)),
        |outcome| {
            let cmdline = outcome.console_value("CMDLINE=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .that(outcome.console_value("NPROC=") == Some("2"), "2 vCPUs")
                .that(
                    outcome.console_value("VDA=") == Some("kiln-api-vda-ok!"),
                    "the root drive should be /dev/vda",
                )
                .that(
                    outcome.console_value("VDB=") == Some("kiln-api-vdb-one"),
                    "the data drive should be /dev/vdb",
                )
                .that(
                    cmdline.contains("root=/dev/vda ro") && cmdline.contains("8250.nr_uarts=1"),
                    format!("the command line should be boot_args plus the root drive: {cmdline}"),
                )
                .finish()
        },
    );

    let pause_script = api_script(
        r#"
start_kiln
expect 204 PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"$BOOT_ARGS\"}"
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
wait_console 'TICK 4 '
expect 204 PATCH /vm '{"state": "Paused"}'
expect 200 GET /
before=$(grep -c '^TICK' "$WORK/console")
sleep 8
after=$(grep -c '^TICK' "$WORK/console")
echo "TICKS_WHILE_PAUSED=$((after - before))"
expect 204 PATCH /vm '{"state": "Resumed"}'
finish
"#,
    );
    suite.guest(
        GuestTest::new(
            "pause_stops_the_guest_and_resume_keeps_its_clock",
            "i=0\nwhile [ $i -lt 24 ]; do\n  echo \"TICK $i $(cut -d' ' -f1 /proc/uptime)\"\n  \
             i=$((i + 1))\n  sleep 0.5\ndone\necho TICKS-DONE",
        )
        .host_only_script(pause_script)
        .timeout(Duration::from_secs(150)),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("\"state\":\"Paused\"")
                .console_contains("TICKS-DONE")
                .that(
                    outcome.console_value("TICKS_WHILE_PAUSED=") == Some("0"),
                    "the guest printed while paused",
                )
                .finish()?;
            // Consecutive uptimes: half a second apart plus emulation overhead, never the 8 s
            // the VM spent paused.
            let uptimes: Vec<f64> = outcome
                .stdout
                .lines()
                .filter_map(|line| line.strip_prefix("TICK "))
                .filter_map(|rest| rest.split_whitespace().nth(1)?.parse().ok())
                .collect();
            let largest_gap = uptimes
                .windows(2)
                .map(|pair| pair[1] - pair[0])
                .fold(0.0f64, f64::max);
            if uptimes.len() < 24 || largest_gap >= 4.0 {
                return Err(failure(
                    outcome,
                    format!(
                        "the guest's uptime should not jump by the paused time: {} ticks, \
                         largest gap {largest_gap:.2} s",
                        uptimes.len()
                    ),
                ));
            }
            Ok(())
        },
    );

    let cad_script = api_script(
        r#"
start_kiln
expect 204 PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"$BOOT_ARGS\"}"
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
wait_console CAD-READY
expect 204 PUT /actions '{"action_type": "SendCtrlAltDel"}'
finish
"#,
    );
    suite.guest(
        GuestTest::new(
            "send_ctrl_alt_del_reboots_the_guest_and_kiln_exits",
            "echo \"ATKBD=$(ls /sys/bus/serio/drivers/atkbd 2>/dev/null | grep -c serio)\"\n\
             echo CAD-READY\nsleep 120\necho CAD-IGNORED",
        )
        .host_only_script(cad_script)
        .timeout(Duration::from_secs(150)),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("CAD-READY")
                .console_lacks("CAD-IGNORED")
                .console_contains("reboot: Restarting system")
                .log_contains("the microVM ended: Reset")
                .that(
                    outcome.console_value("ATKBD=") == Some("1"),
                    "the guest's AT keyboard driver should have bound to the i8042 keyboard",
                )
                .finish()
        },
    );

    let net_script = api_script(
        r#"
start_kiln
expect 204 PUT /boot-source "{\"kernel_image_path\": \"$KERNEL\", \"initrd_path\": \"$INITRD\", \"boot_args\": \"$BOOT_ARGS\"}"
expect 204 PUT /network-interfaces/eth0 '{"iface_id": "eth0", "host_dev_name": "kfc0", "guest_mac": "06:00:0a:07:00:02"}'
expect 400 PUT /network-interfaces/eth1 '{"iface_id": "eth1", "host_dev_name": "kfc0"}'
expect 204 PUT /entropy '{}'
expect 204 PUT /actions '{"action_type": "InstanceStart"}'
# Kiln (root here) created the TAP when it built the VM: give the host its end of the link.
tries=0
until ip link show kfc0 >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ $tries -gt 600 ]; then
        echo "API-FAILURE: no TAP kfc0 after InstanceStart"
        kill "$KILN_PID"
        finish
    fi
    sleep 0.1
done
ip addr add 10.7.0.1/24 dev kfc0 && ip link set kfc0 up
finish
"#,
    );
    suite.guest(
        GuestTest::new(
            "network_interface_and_entropy_over_the_api",
            "echo \"MAC=$(cat /sys/class/net/eth0/address)\"\n\
             echo \"RNG=$(cat /sys/class/misc/hw_random/rng_current)\"\n\
             ip link set eth0 up && ip addr add 10.7.0.2/24 dev eth0\n\
             i=0\n\
             until ping -c 1 -W 1 10.7.0.1 >/dev/null 2>&1 || [ $i -ge 60 ]; do i=$((i + 1)); done\n\
             ping -c 3 -W 2 10.7.0.1 >/dev/null && echo PING-OK",
        )
        .host_only_script(net_script)
        .timeout(Duration::from_secs(150)),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_lacks("API-FAILURE")
                .console_contains("The host device name kfc0 is already in use.")
                .console_contains("PING-OK")
                .that(
                    outcome.console_value("MAC=") == Some("06:00:0a:07:00:02"),
                    "the guest's eth0 should have the guest_mac of PUT /network-interfaces",
                )
                .that(
                    outcome.console_value("RNG=") == Some("virtio_rng.0"),
                    "PUT /entropy should give the guest a virtio-rng",
                )
                .finish()
        },
    );

    let code = suite.main();
    let _ = std::fs::remove_dir_all(&scratch);
    code
}
