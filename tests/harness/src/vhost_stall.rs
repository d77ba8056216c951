//! What the harness does when the virtual KVM host stalls or crashes (see
//! [`crate::vhost::run`]): more boots for the tests that did not report, the state of its CPUs
//! from vhost-run's log, why its kernel went down, and copies of writable images so that the
//! interrupted test can run again on what it started with.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest_test::GuestTest;
use crate::outcome::GuestOutcome;
use crate::HarnessError;

/// Boots of the virtual host one batch may take when it keeps stalling.
const MAX_BOOTS: usize = 3;

/// Runs the tests through `run_once` (one virtual-host boot each call); `pristine` holds copies
/// of their writable images from before the first boot.
///
/// When the virtual host itself stalls (QEMU TCG has been seen to wedge with both CPUs halted and
/// no interrupt arriving, after boot or while booting; vhost-run stops it and shows the CPUs'
/// state) or crashes (its kernel has been seen to panic on a soft lockup inside KVM), the tests
/// that had not started yet run in another boot (up to [`MAX_BOOTS`] in all), and so does the
/// one that was running if its writable disks can be put back as they were (a second run on
/// images the first one half wrote would prove nothing). Every test run that way says so in its
/// outcome, and the suite prints it.
pub(crate) fn run_with_retries(
    tests: &[GuestTest],
    workdir: &Path,
    pristine: &PristineImages,
    run_once: impl Fn(&[GuestTest], &Path) -> Result<Attempt, HarnessError>,
) -> Result<Vec<GuestOutcome>, HarnessError> {
    let first = run_once(tests, workdir)?;
    let mut outcomes = first.outcomes;
    // Indices into `tests` of the batch the last boot ran, and what became of that boot.
    let mut batch: Vec<usize> = (0..tests.len()).collect();
    let mut last = (first.stall, first.booted, first.unreported);
    let mut notes: Vec<String> = Vec::new();
    for boot in 2..=MAX_BOOTS {
        let (Some(stall), booted, unreported) = last else {
            break;
        };
        // Back to indices into `tests`.
        let unreported: Vec<usize> = unreported.iter().map(|&index| batch[index]).collect();
        let Some(&first_unreported) = unreported.first() else {
            break;
        };
        let when = if booted {
            format!("during test {}", tests[first_unreported].name())
        } else {
            "while booting".to_string()
        };
        let note = match &stall {
            Interruption::Stalled { cpus } if cpus.is_empty() => {
                format!("the virtual KVM host stalled {when} (no heartbeat)")
            }
            Interruption::Stalled { cpus } => {
                format!("the virtual KVM host stalled {when} (no heartbeat; its CPUs then: {cpus})")
            }
            Interruption::Crashed { why } => {
                format!("the virtual KVM host crashed {when} ({why})")
            }
        };
        let running = booted.then_some(first_unreported);
        // The test that was running may have half written its images: it runs again only on the
        // images as they were before the first boot.
        let running_writes = running.is_some_and(|running| {
            tests[running]
                .disks()
                .iter()
                .any(|disk| !disk.options().is_readonly())
                && !pristine.restore(&tests[running])
        });
        if let (true, Some(running)) = (running_writes, running) {
            outcomes[running].problem = Some(format!(
                "{note}; not run again: its writable disks may hold the first run's writes and \
                 there is no copy of them from before"
            ));
        }
        let rerun: Vec<usize> = unreported
            .into_iter()
            .filter(|&index| Some(index) != running || !running_writes)
            .collect();
        if rerun.is_empty() {
            break;
        }
        println!(
            "kiln-test-harness: {note}; running the {} test(s) that did not report in boot {boot} \
             of at most {MAX_BOOTS}",
            rerun.len()
        );
        notes.push(note);
        let again: Vec<GuestTest> = rerun.iter().map(|&index| tests[index].clone()).collect();
        let boot_dir = workdir.join(format!("boot-{boot}"));
        fs::create_dir_all(&boot_dir)
            .map_err(|e| HarnessError::Setup(format!("{}: {e}", boot_dir.display())))?;
        let attempt = run_once(&again, &boot_dir)?;
        for (outcome, &index) in attempt.outcomes.into_iter().zip(&rerun) {
            let mut outcome = outcome;
            outcome
                .notes
                .push(format!("run in boot {boot}: {}", notes.join("; then ")));
            outcomes[index] = outcome;
        }
        batch = rerun;
        last = (attempt.stall, attempt.booted, attempt.unreported);
    }
    Ok(outcomes)
}

/// How a virtual host failed before it finished the batch.
pub(crate) enum Interruption {
    /// Its heartbeat stopped and vhost-run stopped it; the state of its CPUs then (empty when
    /// QEMU did not say).
    Stalled { cpus: String },
    /// It ended by itself without finishing (its kernel panicked, e.g. on a soft lockup inside
    /// KVM, seen under QEMU TCG); what its console says.
    Crashed { why: String },
}

/// One boot's outcomes, and whether the virtual host failed on its own.
pub(crate) struct Attempt {
    pub(crate) outcomes: Vec<GuestOutcome>,
    /// When it stalled or crashed: how.
    pub(crate) stall: Option<Interruption>,
    /// Whether it reported that it was up (otherwise no test started).
    pub(crate) booted: bool,
    /// Tests that were to run but reported nothing, in order.
    pub(crate) unreported: Vec<usize>,
}

/// Why a virtual host's kernel went down, from its console: the first BUG line and the panic
/// line, without their timestamps.
pub(crate) fn crash_reason(console: &Path) -> String {
    let text = fs::read_to_string(console).unwrap_or_default();
    let message = |line: &str| {
        let line = line.trim();
        match line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("] "))
        {
            Some((_, message)) => message.to_string(),
            None => line.to_string(),
        }
    };
    let bug = text.lines().find(|line| line.contains("BUG: "));
    let panic = text.lines().find(|line| line.contains("Kernel panic"));
    match (bug, panic) {
        (Some(bug), Some(panic)) => format!("{}; {}", message(bug), message(panic)),
        (Some(line), None) | (None, Some(line)) => message(line),
        (None, None) => "it powered off before the tests were done".to_string(),
    }
}

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

    #[test]
    fn a_crash_is_named_by_its_bug_and_panic_lines() {
        let dir = std::env::temp_dir().join(format!("kiln-crash-reason-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let console = dir.join("console.log");
        fs::write(
            &console,
            "[    2.6] kvm: Nested Virtualization enabled\n\
             [   84.787962] watchdog: BUG: soft lockup - CPU#1 stuck for 78s! [kiln-vcpu0:176]\n\
             [   84.788964] RIP: 0010:__apic_accept_irq+0x72/0x290 [kvm]\n\
             [   84.788964] Kernel panic - not syncing: softlockup: hung tasks\n",
        )
        .unwrap();
        assert_eq!(
            crash_reason(&console),
            "watchdog: BUG: soft lockup - CPU#1 stuck for 78s! [kiln-vcpu0:176]; \
             Kernel panic - not syncing: softlockup: hung tasks"
        );
        fs::write(&console, "[    3.0] reboot: Power down\n").unwrap();
        assert_eq!(
            crash_reason(&console),
            "it powered off before the tests were done"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
