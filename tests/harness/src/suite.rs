//! A suite: the guest tests of one test file, run as one batch (one virtual-host boot), plus
//! host-side checks, with a libtest-like `main`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Once;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cli::Selection;
use crate::guest_test::GuestTest;
use crate::images::GuestImages;
use crate::mode::{self, HostFacts, Mode, ModeChoice};
use crate::outcome::{CheckFailure, GuestOutcome};
use crate::vhost_stall::PristineImages;
use crate::{direct, vhost, HarnessError};

/// Set (to anything) to keep a suite's files and logs even when every test passed.
pub const KEEP_VARIABLE: &str = "KILN_TEST_KEEP";

/// Decides whether a guest test passed.
pub type GuestCheck = Box<dyn Fn(&GuestOutcome) -> Result<(), CheckFailure>>;
/// A check that runs on the host, without a guest.
pub type HostCheck = Box<dyn Fn() -> Result<(), String>>;

/// The guest tests (and host checks) of one test file.
pub struct Suite {
    name: String,
    kiln: PathBuf,
    guest_tests: Vec<(GuestTest, GuestCheck)>,
    host_tests: Vec<(String, HostCheck)>,
}

impl Suite {
    /// A suite that runs the given `kiln` binary (pass `env!("CARGO_BIN_EXE_kiln")`).
    pub fn new(name: impl Into<String>, kiln: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kiln: kiln.into(),
            guest_tests: Vec::new(),
            host_tests: Vec::new(),
        }
    }

    /// Adds a guest test and the check that decides whether it passed.
    pub fn guest<F>(&mut self, test: GuestTest, check: F) -> &mut Self
    where
        F: Fn(&GuestOutcome) -> Result<(), CheckFailure> + 'static,
    {
        self.guest_tests.push((test, Box::new(check)));
        self
    }

    /// Adds a check that runs on the host (no guest).
    pub fn host<F>(&mut self, name: impl Into<String>, check: F) -> &mut Self
    where
        F: Fn() -> Result<(), String> + 'static,
    {
        self.host_tests.push((name.into(), Box::new(check)));
        self
    }

    /// Runs all guest tests as one batch and returns their outcomes (checks are not applied).
    /// The batch's files and logs stay in the temporary directory the outcomes' `logs` name.
    pub fn run(&self) -> Result<Vec<GuestOutcome>, HarnessError> {
        let tests: Vec<GuestTest> = self.guest_tests.iter().map(|(t, _)| t.clone()).collect();
        let workdir = work_directory(&self.name)?;
        run_batch(&tests, &self.kiln, &workdir)
    }

    /// The `main` of a `harness = false` test binary: reads libtest-style arguments, runs the
    /// selected tests, prints one line per test, failure reports, and `N passed, N failed`.
    /// Fails (non-zero) when any test fails or the suite cannot run at all.
    pub fn main(self) -> ExitCode {
        let selection = Selection::parse(std::env::args().skip(1));
        for unknown in &selection.unknown {
            eprintln!("kiln-test-harness: ignoring unknown argument {unknown}");
        }
        let names = self
            .host_tests
            .iter()
            .map(|(name, _)| name.as_str())
            .chain(self.guest_tests.iter().map(|(test, _)| test.name()));
        if selection.list {
            for name in names {
                println!("{name}: test");
            }
            return ExitCode::SUCCESS;
        }
        let mut tally = Tally::default();
        for (name, check) in &self.host_tests {
            if selection.selects(name) {
                let start = Instant::now();
                let result = check();
                tally.record(name, start.elapsed().as_secs_f64(), result);
            }
        }
        let selected: Vec<&(GuestTest, GuestCheck)> = self
            .guest_tests
            .iter()
            .filter(|(test, _)| selection.selects(test.name()))
            .collect();
        let mut workdir = None;
        if !selected.is_empty() {
            let tests: Vec<GuestTest> = selected.iter().map(|(test, _)| test.clone()).collect();
            let in_vhost = mode::choose(&HostFacts::probe())
                .is_ok_and(|choice| choice.mode == Mode::VirtualHost);
            let mut pristine = None;
            let result = work_directory(&self.name).and_then(|dir| {
                workdir = Some(dir.clone());
                if in_vhost {
                    pristine = Some(PristineImages::save(&tests, &dir.join("pristine")));
                }
                run_batch_with(&tests, &self.kiln, &dir, pristine.as_ref())
            });
            match result {
                Ok(outcomes) => {
                    let outcomes = match (&workdir, &pristine) {
                        (Some(dir), Some(pristine)) => {
                            self.rerun_failures_in_vhost(&selected, outcomes, dir, pristine)
                        }
                        _ => outcomes,
                    };
                    for ((_, check), outcome) in selected.iter().zip(&outcomes) {
                        let result = check(outcome).map_err(|failure| failure.to_string());
                        tally.record(&outcome.name, outcome.elapsed.as_secs_f64(), result);
                        for note in &outcome.notes {
                            println!("    note: {note}");
                        }
                    }
                }
                Err(error) => {
                    for (test, _) in &selected {
                        let reason = format!("the suite could not run: {error}");
                        tally.record(test.name(), 0.0, Err(reason));
                    }
                }
            }
            if let Some(pristine) = pristine {
                pristine.discard();
            }
        }
        tally.report();
        if let Some(dir) = workdir {
            if tally.failed.is_empty() && std::env::var_os(KEEP_VARIABLE).is_none() {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                println!("test files and logs kept in {}", dir.display());
            }
        }
        println!("{} passed, {} failed", tally.passed, tally.failed.len());
        if tally.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

impl Suite {
    /// In the virtual KVM host, QEMU's emulated nested SVM corrupts the virtual host and its
    /// guests at random (docs/testing.md: the virtual host's kernel faulting through a bad GS
    /// base, Linux guests triple-faulting, hanging or crashing early in boot; about one test
    /// in a hundred, in bursts). A failed test runs once more in a new boot when its writable
    /// images can be put back as they were before the first run (copies taken before it,
    /// `pristine`); its outcome says so with the first run's failure. A second failure fails
    /// it. Only called in vhost mode: on real KVM a failure is a failure.
    fn rerun_failures_in_vhost(
        &self,
        selected: &[&(GuestTest, GuestCheck)],
        mut outcomes: Vec<GuestOutcome>,
        workdir: &std::path::Path,
        pristine: &PristineImages,
    ) -> Vec<GuestOutcome> {
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (index, ((test, check), outcome)) in selected.iter().zip(&outcomes).enumerate() {
            let Err(failure) = check(outcome) else {
                continue;
            };
            let read_only = test.disks().iter().all(|disk| disk.options().is_readonly());
            if read_only || pristine.restore(test) {
                let first = failure.to_string();
                let reason = first
                    .lines()
                    .map(str::trim)
                    .find(|line| line.starts_with("- "))
                    .unwrap_or("failed")
                    .trim_start_matches("- ")
                    .to_string();
                failed.push((index, reason));
            }
        }
        if failed.is_empty() {
            return outcomes;
        }
        let names: Vec<&str> = failed.iter().map(|(i, _)| selected[*i].0.name()).collect();
        println!(
            "kiln-test-harness: {} failed in the virtual KVM host, whose emulated nested SVM \
             corrupts guests at random; running it once more in a new boot",
            names.join(", ")
        );
        let tests: Vec<GuestTest> = failed.iter().map(|(i, _)| selected[*i].0.clone()).collect();
        let dir = workdir.join("failure-rerun");
        let rerun = std::fs::create_dir_all(&dir)
            .map_err(|e| HarnessError::Setup(format!("{}: {e}", dir.display())))
            .and_then(|()| run_batch_with(&tests, &self.kiln, &dir, Some(pristine)));
        match rerun {
            Ok(again) => {
                for ((index, reason), mut outcome) in failed.into_iter().zip(again) {
                    outcome.notes.push(format!(
                        "ran a second time in a new boot of the virtual host; the first run \
                         failed: {reason}"
                    ));
                    outcomes[index] = outcome;
                }
            }
            Err(error) => println!("kiln-test-harness: the second run could not start: {error}"),
        }
        outcomes
    }
}

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<(String, String)>,
}

impl Tally {
    fn record(&mut self, name: &str, seconds: f64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                println!("test {name} ... ok ({seconds:.1} s)");
                self.passed += 1;
            }
            Err(report) => {
                println!("test {name} ... FAILED ({seconds:.1} s)");
                self.failed.push((name.to_string(), report));
            }
        }
    }

    fn report(&self) {
        if self.failed.is_empty() {
            return;
        }
        println!("\nfailures:");
        for (name, report) in &self.failed {
            println!("\n---- {name} ----\n{}", report.trim_end());
        }
        println!();
    }
}

/// Chooses the mode (printing the choice once per process), builds the images and runs `tests`.
pub fn run_batch(
    tests: &[GuestTest],
    kiln: &std::path::Path,
    workdir: &std::path::Path,
) -> Result<Vec<GuestOutcome>, HarnessError> {
    run_batch_with(tests, kiln, workdir, None)
}

/// [`run_batch`], with the copies of the writable images the suite took (vhost mode).
fn run_batch_with(
    tests: &[GuestTest],
    kiln: &std::path::Path,
    workdir: &std::path::Path,
    pristine: Option<&PristineImages>,
) -> Result<Vec<GuestOutcome>, HarnessError> {
    let choice = mode::choose(&HostFacts::probe())?;
    announce(&choice);
    if !kiln.is_file() {
        return Err(HarnessError::Setup(format!(
            "the kiln binary {} does not exist",
            kiln.display()
        )));
    }
    let images = GuestImages::get()?;
    match choice.mode {
        Mode::Direct => direct::run(tests, kiln, &images, workdir),
        Mode::VirtualHost => vhost::run(tests, kiln, &images, workdir, pristine),
    }
}

fn announce(choice: &ModeChoice) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let how = match choice.mode {
            Mode::Direct => "kiln runs directly on this machine's /dev/kvm",
            Mode::VirtualHost => "kiln runs inside the virtual KVM host (QEMU TCG, nested SVM)",
        };
        println!(
            "kiln-test-harness: mode {}: {how}; because {}",
            choice.mode, choice.reason
        );
    });
}

/// A fresh directory for one suite run's files.
fn work_directory(suite: &str) -> Result<PathBuf, HarnessError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "kiln-test-{}-{}-{nanos:09}",
        crate::safe_name(suite),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)
        .map_err(|error| HarnessError::Setup(format!("{}: {error}", dir.display())))?;
    Ok(dir)
}
