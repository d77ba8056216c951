//! End-to-end boots of the test kernel: vCPU count and memory size as asked, the command line
//! reaches the guest, poweroff/reboot/panic map to kiln's exit statuses, the boot timer is
//! reported, and the bzImage build boots too.

use std::process::ExitCode;

use kiln_test_harness::{CheckFailure, GuestImages, GuestOutcome, GuestTest, KernelVariant, Suite};

/// Guest script lines that report what the tests compare.
const REPORT: &str = "echo \"NPROC=$(nproc)\"\n\
                      echo \"MEMTOTAL_KB=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)\"\n";

/// Kiln's exit status when the guest kernel panicked.
const EXIT_GUEST_PANIC: i32 = 3;

fn main() -> ExitCode {
    let mut suite = Suite::new("boot", env!("CARGO_BIN_EXE_kiln"));

    for (name, cpus, memory_mib) in [("one_vcpu_512m", 1, 512), ("four_vcpus_256m", 4, 256)] {
        suite.guest(
            GuestTest::new(name, REPORT)
                .cpus(cpus)
                .memory_mib(memory_mib),
            move |outcome| {
                let mut check = outcome.check();
                check.exit_code(0).that(
                    outcome.console_value("NPROC=") == Some(cpus.to_string().as_str()),
                    format!(
                        "nproc should be {cpus}, the guest said {:?}",
                        outcome.console_value("NPROC=")
                    ),
                );
                check_memory_size(outcome, memory_mib, cpus)?;
                check.finish()
            },
        );
    }

    suite.guest(
        GuestTest::new(
            "cmdline_reaches_guest",
            "echo \"CMDLINE=$(cat /proc/cmdline)\"",
        )
        .cmdline("kiln.test_token=7f3a kiln.second_token"),
        |outcome| {
            let cmdline = outcome.console_value("CMDLINE=").unwrap_or_default();
            let words: Vec<&str> = cmdline.split_whitespace().collect();
            outcome
                .check()
                .exit_code(0)
                .that(
                    words.contains(&"kiln.test_token=7f3a") && words.contains(&"kiln.second_token"),
                    format!("/proc/cmdline lacks the --cmdline arguments: {cmdline:?}"),
                )
                .that(
                    words.iter().any(|word| word.starts_with("console=")),
                    format!("/proc/cmdline lacks kiln's default console=: {cmdline:?}"),
                )
                .finish()
        },
    );

    // After each of these the script sleeps: only the action itself can end the VM in time.
    suite.guest(
        GuestTest::new(
            "poweroff_exits_0",
            "echo kiln-test-poweroff\npoweroff -f\nsleep 1000",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("kiln-test-poweroff")
                .console_contains("reboot: Power down")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "reboot_exits_0",
            "echo kiln-test-reboot\nreboot -f\nsleep 1000",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("kiln-test-reboot")
                .console_contains("reboot: Restarting system")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "panic_exits_3",
            "echo kiln-test-panic\necho c > /proc/sysrq-trigger\nsleep 1000",
        ),
        |outcome| {
            outcome
                .check()
                .exit_code(EXIT_GUEST_PANIC)
                .console_contains("Kernel panic - not syncing: sysrq triggered crash")
                .finish()
        },
    );

    suite.guest(
        GuestTest::default_guest("default_guest_and_boot_timer"),
        |outcome| {
            let mut check = outcome.check();
            check
                .exit_code(0)
                .console_contains("Kiln guest is up")
                .log_contains("Guest-boot-time = ");
            if let Some(line) = outcome
                .stderr
                .lines()
                .find(|line| line.contains("Guest-boot-time = "))
            {
                check.that(
                    boot_time_is_consistent(line),
                    format!(
                        "malformed boot-timer line (want `Guest-boot-time = N us M ms`): {line}"
                    ),
                );
            }
            check.finish()
        },
    );

    suite.guest(
        GuestTest::new("bzimage_boots", "echo kiln-test-bzimage-$((40 + 2))")
            .kernel(KernelVariant::BzImage),
        |outcome| {
            outcome
                .check()
                .exit_code(0)
                .console_contains("kiln-test-bzimage-42")
                .finish()
        },
    );

    suite.main()
}

/// `... Guest-boot-time = N us M ms ...` with N > 0 and M = N / 1000.
fn boot_time_is_consistent(line: &str) -> bool {
    let Some(rest) = line.split("Guest-boot-time = ").nth(1) else {
        return false;
    };
    let words: Vec<&str> = rest.split_whitespace().collect();
    match words.as_slice() {
        [micros, "us", millis, "ms", ..] => match (micros.parse::<u64>(), millis.parse::<u64>()) {
            (Ok(micros), Ok(millis)) => micros > 0 && millis == micros / 1000,
            _ => false,
        },
        _ => false,
    }
}

/// MemTotal must be what was asked for, less what the kernel keeps for itself. The bound is
/// derived, not measured: x86 Linux always reserves the first MiB; beyond it, the kernel image
/// (its ELF segments' size in memory), the `struct page` array (64 bytes per 4 KiB page, 1/64),
/// early hash tables and page tables (at most 1/128 more), per-CPU areas and stacks (at most
/// 2 MiB per vCPU) and a fixed 4 MiB for the remaining small early allocations.
fn check_memory_size(
    outcome: &GuestOutcome,
    asked_mib: u64,
    cpus: u32,
) -> Result<(), CheckFailure> {
    let kernel_kib = GuestImages::get()
        .and_then(|images| images.kernel_memory_size())
        .map_err(|error| CheckFailure::new(outcome, error.to_string()))?
        / 1024;
    let asked_kib = asked_mib * 1024;
    let low_mib_kib = 1024;
    let reserved_max_kib =
        low_mib_kib + kernel_kib + asked_kib / 64 + asked_kib / 128 + u64::from(cpus) * 2048 + 4096;
    let lower = asked_kib.saturating_sub(reserved_max_kib);
    let upper = asked_kib - low_mib_kib;
    let reported = outcome.console_value("MEMTOTAL_KB=").map(str::parse::<u64>);
    match reported {
        Some(Ok(total)) if (lower..=upper).contains(&total) => Ok(()),
        Some(Ok(total)) => Err(CheckFailure::new(
            outcome,
            format!(
                "MemTotal {total} kB is outside [{lower}, {upper}] kB for --memory {asked_mib}M \
                 (kernel image {kernel_kib} KiB, {cpus} vCPUs)"
            ),
        )),
        _ => Err(CheckFailure::new(
            outcome,
            "the guest did not report MemTotal",
        )),
    }
}
