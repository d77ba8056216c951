//! What a guest test produced, and the checking API that turns it into pass or fail.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How many trailing lines of console and Kiln log a failure report shows.
const REPORT_TAIL_LINES: usize = 40;

/// The result of one guest test run.
#[derive(Debug, Clone, Default)]
pub struct GuestOutcome {
    /// The test's name.
    pub name: String,
    /// Kiln's stdout: the guest's serial console.
    pub stdout: String,
    /// Kiln's stderr: Kiln's own log.
    pub stderr: String,
    /// Kiln's exit status. Death by signal N is reported as 128+N, like a shell does. `None` when
    /// there is no status: the harness killed Kiln at the time limit or never got a result.
    pub exit_code: Option<i32>,
    /// True when Kiln was killed because the test's time limit passed.
    pub timed_out: bool,
    /// The test's time limit.
    pub time_limit: Duration,
    /// Wall time of the Kiln run.
    pub elapsed: Duration,
    /// Set when the harness could not run the test or get its result back (the reason).
    pub problem: Option<String>,
    /// Where to look for more: the virtual KVM host's console log, the test's files.
    pub logs: Vec<PathBuf>,
    /// The host script's output (stdout and stderr), if the test has one.
    pub host_output: String,
    /// The host script's exit status (128+N after signal N); `None` without a host script, or
    /// when it was killed after Kiln exited.
    pub host_exit_code: Option<i32>,
    /// What the harness wants the reader to know about how this outcome came about (e.g. the
    /// test ran in a second virtual-host boot because the first one stalled).
    pub notes: Vec<String>,
}

impl GuestOutcome {
    /// Starts checking this outcome. Timeouts and harness problems always fail the check.
    pub fn check(&self) -> Check<'_> {
        Check {
            outcome: self,
            failures: Vec::new(),
            timeout_expected: false,
        }
    }

    /// The rest of the first console line that starts with `prefix` (trimmed), e.g.
    /// `console_value("NPROC=")` for a guest that printed `NPROC=4`.
    pub fn console_value(&self, prefix: &str) -> Option<&str> {
        self.stdout
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    }

    /// The rest of the first host script output line that starts with `prefix` (trimmed).
    pub fn host_value(&self, prefix: &str) -> Option<&str> {
        self.host_output
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    }

    /// One line saying how the run ended.
    pub fn ending(&self) -> String {
        if let Some(problem) = &self.problem {
            return format!("no result: {problem}");
        }
        if self.timed_out {
            return format!("timed out after {}s", self.time_limit.as_secs());
        }
        match self.exit_code {
            Some(code) => format!("kiln exited with status {code}"),
            None => "kiln ended without an exit status".to_string(),
        }
    }
}

/// Collects failed expectations about one [`GuestOutcome`].
#[derive(Debug)]
pub struct Check<'a> {
    outcome: &'a GuestOutcome,
    failures: Vec<String>,
    timeout_expected: bool,
}

impl Check<'_> {
    /// Expects Kiln to have exited with `code`.
    pub fn exit_code(&mut self, code: i32) -> &mut Self {
        if self.outcome.exit_code != Some(code) && !self.run_failed() {
            let got = match self.outcome.exit_code {
                Some(got) => got.to_string(),
                None => "none".to_string(),
            };
            self.failures
                .push(format!("expected kiln exit status {code}, got {got}"));
        }
        self
    }

    /// Expects the run to have been stopped at its time limit (for tests of the timeout itself);
    /// the timeout then no longer fails the check.
    pub fn timed_out(&mut self) -> &mut Self {
        self.timeout_expected = true;
        if !self.outcome.timed_out {
            self.failures.push(format!(
                "expected the run to time out, but it ended: {}",
                self.outcome.ending()
            ));
        }
        self
    }

    /// Expects the guest console to contain `needle`.
    pub fn console_contains(&mut self, needle: &str) -> &mut Self {
        if !self.outcome.stdout.contains(needle) {
            self.failures
                .push(format!("the guest console does not contain {needle:?}"));
        }
        self
    }

    /// Expects the guest console not to contain `needle`.
    pub fn console_lacks(&mut self, needle: &str) -> &mut Self {
        if self.outcome.stdout.contains(needle) {
            self.failures
                .push(format!("the guest console contains {needle:?}"));
        }
        self
    }

    /// Expects Kiln's log (stderr) to contain `needle`.
    pub fn log_contains(&mut self, needle: &str) -> &mut Self {
        if !self.outcome.stderr.contains(needle) {
            self.failures
                .push(format!("kiln's log (stderr) does not contain {needle:?}"));
        }
        self
    }

    /// Expects the host script to have exited with `code`.
    pub fn host_exit_code(&mut self, code: i32) -> &mut Self {
        if self.outcome.host_exit_code != Some(code) && !self.run_failed() {
            let got = match self.outcome.host_exit_code {
                Some(got) => got.to_string(),
                None => "none (killed or not run)".to_string(),
            };
            self.failures.push(format!(
                "expected host script exit status {code}, got {got}"
            ));
        }
        self
    }

    /// Expects the host script's output to contain `needle`.
    pub fn host_contains(&mut self, needle: &str) -> &mut Self {
        if !self.outcome.host_output.contains(needle) {
            self.failures.push(format!(
                "the host script's output does not contain {needle:?}"
            ));
        }
        self
    }

    /// Expects `condition`; `what` describes the expectation for the failure report.
    pub fn that(&mut self, condition: bool, what: impl Into<String>) -> &mut Self {
        if !condition {
            self.failures.push(what.into());
        }
        self
    }

    /// Passes when every expectation held and the run itself completed (no timeout, no harness
    /// problem); otherwise returns a report naming every failure.
    pub fn finish(&self) -> Result<(), CheckFailure> {
        let mut failures = Vec::new();
        if self.run_failed() {
            failures.push(self.outcome.ending());
        }
        // Without a result, expectations about it would only repeat that there is none.
        if self.outcome.problem.is_none() {
            failures.extend(self.failures.iter().cloned());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CheckFailure {
                outcome: Box::new(self.outcome.clone()),
                failures,
            })
        }
    }

    fn run_failed(&self) -> bool {
        (self.outcome.timed_out && !self.timeout_expected) || self.outcome.problem.is_some()
    }
}

/// A failed check: what was expected and what the test produced.
#[derive(Debug, Clone)]
pub struct CheckFailure {
    outcome: Box<GuestOutcome>,
    failures: Vec<String>,
}

impl CheckFailure {
    /// A failure that is not about one particular expectation of a [`Check`].
    pub fn new(outcome: &GuestOutcome, failure: impl Into<String>) -> Self {
        Self {
            outcome: Box::new(outcome.clone()),
            failures: vec![failure.into()],
        }
    }

    /// The failed expectations, one line each.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = &self.outcome;
        writeln!(f, "guest test {} failed:", outcome.name)?;
        for failure in &self.failures {
            writeln!(f, "  - {failure}")?;
        }
        let ending = outcome.ending();
        if self.failures.contains(&ending) {
            writeln!(f, "  (ran {:.1} s)", outcome.elapsed.as_secs_f64())?;
        } else {
            writeln!(
                f,
                "  ({ending}; ran {:.1} s)",
                outcome.elapsed.as_secs_f64()
            )?;
        }
        for log in &outcome.logs {
            writeln!(f, "  see {}", log.display())?;
        }
        write_tail(f, "guest console (kiln stdout)", &outcome.stdout)?;
        write_tail(f, "kiln log (stderr)", &outcome.stderr)?;
        if !outcome.host_output.is_empty() || outcome.host_exit_code.is_some() {
            write_tail(f, "host script output", &outcome.host_output)?;
        }
        Ok(())
    }
}

impl std::error::Error for CheckFailure {}

fn write_tail(f: &mut fmt::Formatter<'_>, title: &str, text: &str) -> fmt::Result {
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(REPORT_TAIL_LINES);
    if skipped > 0 {
        writeln!(
            f,
            "  --- {title}, last {REPORT_TAIL_LINES} of {} lines ---",
            lines.len()
        )?;
    } else {
        writeln!(f, "  --- {title} ---")?;
    }
    for line in &lines[skipped..] {
        writeln!(f, "  | {}", line.trim_end_matches('\r'))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(stdout: &str, exit_code: Option<i32>) -> GuestOutcome {
        GuestOutcome {
            name: "t".to_string(),
            stdout: stdout.to_string(),
            exit_code,
            time_limit: Duration::from_secs(30),
            ..GuestOutcome::default()
        }
    }

    #[test]
    fn passing_check() {
        let o = outcome("boot\nMARKER\n", Some(0));
        assert!(o
            .check()
            .exit_code(0)
            .console_contains("MARKER")
            .finish()
            .is_ok());
    }

    #[test]
    fn each_failed_expectation_is_reported() {
        let o = outcome("boot\n", Some(3));
        let failure = o
            .check()
            .exit_code(0)
            .console_contains("MARKER")
            .finish()
            .unwrap_err();
        assert_eq!(failure.failures().len(), 2);
        let text = failure.to_string();
        assert!(
            text.contains("expected kiln exit status 0, got 3"),
            "{text}"
        );
        assert!(text.contains("\"MARKER\""), "{text}");
    }

    #[test]
    fn timeout_always_fails() {
        let mut o = outcome("MARKER\n", None);
        o.timed_out = true;
        let failure = o.check().console_contains("MARKER").finish().unwrap_err();
        assert!(failure.to_string().contains("timed out after 30s"));
    }

    #[test]
    fn expected_timeout_passes_only_when_it_happened() {
        let mut o = outcome("", None);
        assert!(o.check().timed_out().finish().is_err());
        o.timed_out = true;
        assert!(o.check().timed_out().finish().is_ok());
    }

    #[test]
    fn console_value_finds_the_first_match() {
        let o = outcome("x\r\nNPROC=4\r\nNPROC=5\n", Some(0));
        assert_eq!(o.console_value("NPROC="), Some("4"));
        assert_eq!(o.console_value("MISSING="), None);
    }
}
