//! The framed results the virtual KVM host writes to its second serial port, and their parser.
//!
//! Every framing line starts with `KILN-`; payload lines are base64 (which has no `-`), so a
//! payload can never be taken for framing whatever the guest printed:
//!
//! ```text
//! KILN-VHOST-UP kvm=1 svm_cpus=2
//! KILN-TEST 0 STATUS exit=0 timed_out=0 elapsed_ms=2345
//! KILN-TEST 0 STDOUT
//! <base64 of kiln's stdout, any number of lines>
//! KILN-TEST 0 STDERR
//! <base64 of kiln's stderr>
//! KILN-TEST 0 HOST exit=0          (only for tests with a host script; exit=killed when the
//! <base64 of its output>            runner had to kill it)
//! KILN-TEST 0 END
//! KILN-TEST 1 PROBLEM /dev/vdb is missing in the virtual host
//! KILN-VHOST-DONE status=0
//! ```
//!
//! A `PROBLEM` line stands for a test the runner did not start, and says why.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::base64;

/// What the virtual host said about itself when it came up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUp {
    /// `/dev/kvm` exists inside.
    pub kvm: bool,
    /// The `KILN-VHOST-UP` line as written, for reports.
    pub line: String,
}

/// One test's result as reported by the virtual host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// `kiln`'s exit status as the shell saw it (128+N for signal N).
    pub exit: i32,
    /// The runner killed `kiln` at the time limit.
    pub timed_out: bool,
    /// Run time measured inside the virtual host.
    pub elapsed: Duration,
    /// `kiln`'s stdout.
    pub stdout: Vec<u8>,
    /// `kiln`'s stderr.
    pub stderr: Vec<u8>,
    /// The host script's result, for tests that have one.
    pub host: Option<HostReport>,
}

/// What a test's host script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    /// Its exit status; `None` when the runner killed it.
    pub exit: Option<i32>,
    /// Its stdout and stderr.
    pub output: Vec<u8>,
}

/// Everything parsed from the results channel.
#[derive(Debug, Default)]
pub struct VhostReport {
    /// The `KILN-VHOST-UP` line, if it arrived.
    pub up: Option<VhostUp>,
    /// Complete test reports by test index.
    pub tests: BTreeMap<usize, TestReport>,
    /// Problems with individual reports (garbled or cut short), by test index.
    pub broken: BTreeMap<usize, String>,
    /// Tests the runner did not start, and why, by test index.
    pub problems: BTreeMap<usize, String>,
    /// The `KILN-VHOST-DONE` line, if it arrived.
    pub done: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    Stdout,
    Stderr,
    Host,
}

#[derive(Debug)]
struct Partial {
    index: usize,
    status: Option<(i32, bool, Duration)>,
    section: Section,
    stdout: String,
    stderr: String,
    /// `Some(exit)` once a HOST line arrived (`exit` is None for "killed").
    host_exit: Option<Option<i32>>,
    host: String,
}

impl Partial {
    fn complete(self) -> Result<TestReport, String> {
        let (exit, timed_out, elapsed) = self.status.ok_or("no STATUS line")?;
        let stdout = base64::decode(&self.stdout).ok_or("stdout is not valid base64")?;
        let stderr = base64::decode(&self.stderr).ok_or("stderr is not valid base64")?;
        let host = match self.host_exit {
            Some(exit) => Some(HostReport {
                exit,
                output: base64::decode(&self.host).ok_or("host output is not valid base64")?,
            }),
            None => None,
        };
        Ok(TestReport {
            host,
            exit,
            timed_out,
            elapsed,
            stdout,
            stderr,
        })
    }
}

/// Parses the results channel. Never fails: whatever is missing or garbled shows up as a missing
/// test, an entry of `broken`, or a missing `up`/`done`.
pub fn parse(text: &str) -> VhostReport {
    let mut report = VhostReport::default();
    let mut current: Option<Partial> = None;
    for line in text.lines().map(|line| line.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix("KILN-VHOST-UP") {
            report.up = Some(VhostUp {
                kvm: rest.split_whitespace().any(|word| word == "kvm=1"),
                line: line.to_string(),
            });
        } else if line.starts_with("KILN-VHOST-DONE") {
            report.done = Some(line.to_string());
        } else if let Some(rest) = line.strip_prefix("KILN-TEST ") {
            let mut words = rest.split_whitespace();
            let index = words.next().and_then(|word| word.parse::<usize>().ok());
            let (Some(index), Some(tag)) = (index, words.next()) else {
                continue;
            };
            if tag == "PROBLEM" {
                let reason = words.collect::<Vec<_>>().join(" ");
                report.problems.insert(index, reason);
                continue;
            }
            if tag == "STATUS" {
                if let Some(previous) = current.take() {
                    report
                        .broken
                        .insert(previous.index, "report cut short".into());
                }
                current = Some(Partial {
                    index,
                    status: parse_status(words),
                    section: Section::None,
                    stdout: String::new(),
                    stderr: String::new(),
                    host_exit: None,
                    host: String::new(),
                });
                continue;
            }
            let Some(partial) = current.as_mut().filter(|partial| partial.index == index) else {
                report
                    .broken
                    .insert(index, format!("unexpected {tag} line"));
                continue;
            };
            match tag {
                "STDOUT" => partial.section = Section::Stdout,
                "STDERR" => partial.section = Section::Stderr,
                "HOST" => {
                    partial.section = Section::Host;
                    let exit = words.find_map(|word| word.strip_prefix("exit="));
                    partial.host_exit = Some(exit.and_then(|value| value.parse().ok()));
                }
                "END" => {
                    if let Some(partial) = current.take() {
                        match partial.complete() {
                            Ok(test) => {
                                report.tests.insert(index, test);
                            }
                            Err(problem) => {
                                report.broken.insert(index, problem.to_string());
                            }
                        }
                    }
                }
                _ => {}
            }
        } else if let Some(partial) = current.as_mut() {
            let target = match partial.section {
                Section::Stdout => &mut partial.stdout,
                Section::Stderr => &mut partial.stderr,
                Section::Host => &mut partial.host,
                Section::None => continue,
            };
            target.push_str(line);
            target.push('\n');
        }
    }
    if let Some(partial) = current {
        report
            .broken
            .insert(partial.index, "report cut short (no END line)".into());
    }
    report
}

fn parse_status<'a>(words: impl Iterator<Item = &'a str>) -> Option<(i32, bool, Duration)> {
    let mut exit = None;
    let mut timed_out = None;
    let mut elapsed = None;
    for word in words {
        match word.split_once('=') {
            Some(("exit", value)) => exit = value.parse().ok(),
            Some(("timed_out", value)) => timed_out = Some(value == "1"),
            Some(("elapsed_ms", value)) => elapsed = value.parse().ok().map(Duration::from_millis),
            _ => {}
        }
    }
    Some((exit?, timed_out?, elapsed?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "KILN-VHOST-UP kvm=1 svm_cpus=2\r\n\
        KILN-TEST 0 STATUS exit=3 timed_out=0 elapsed_ms=1500\n\
        KILN-TEST 0 STDOUT\n\
        S0lMTi1URVNUIDAgRU5ECmhp\n\
        Cg==\n\
        KILN-TEST 0 STDERR\n\
        KILN-TEST 0 END\n\
        KILN-TEST 1 STATUS exit=137 timed_out=1 elapsed_ms=30000\n\
        KILN-TEST 1 STDOUT\n\
        aGk=\n\
        KILN-TEST 1 STDERR\n\
        KILN-TEST 1 END\n\
        KILN-TEST 2 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
        KILN-TEST 2 STDOUT\n\
        aGk=\n";

    #[test]
    fn parses_complete_reports() {
        let report = parse(SAMPLE);
        assert!(report.up.as_ref().is_some_and(|up| up.kvm));
        let first = &report.tests[&0];
        assert_eq!(first.exit, 3);
        assert!(!first.timed_out);
        assert_eq!(first.elapsed, Duration::from_millis(1500));
        // The guest printed a line that looks like framing; base64 kept it payload.
        assert_eq!(first.stdout, b"KILN-TEST 0 END\nhi\n");
        assert!(first.stderr.is_empty());
        assert!(report.tests[&1].timed_out);
    }

    #[test]
    fn cut_short_report_is_broken_not_lost() {
        let report = parse(SAMPLE);
        assert!(!report.tests.contains_key(&2));
        assert!(report.broken[&2].contains("cut short"));
        assert!(report.done.is_none());
    }

    #[test]
    fn garbled_payload_is_reported() {
        let text = "KILN-TEST 0 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
                    KILN-TEST 0 STDOUT\n@@@\nKILN-TEST 0 STDERR\nKILN-TEST 0 END\n";
        let report = parse(text);
        assert!(report.broken[&0].contains("base64"));
    }

    #[test]
    fn problem_lines_say_why_a_test_did_not_run() {
        let text = "KILN-TEST 0 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
                    KILN-TEST 0 STDOUT\nKILN-TEST 0 STDERR\nKILN-TEST 0 END\n\
                    KILN-TEST 1 PROBLEM /dev/vdb is missing  in the virtual host\n";
        let report = parse(text);
        assert!(report.tests.contains_key(&0));
        assert_eq!(
            report.problems[&1],
            "/dev/vdb is missing in the virtual host"
        );
        assert!(report.broken.is_empty());
    }

    #[test]
    fn host_script_results_are_parsed() {
        let text = "KILN-TEST 0 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
                    KILN-TEST 0 STDOUT\nKILN-TEST 0 STDERR\n\
                    KILN-TEST 0 HOST exit=3\naGk=\nKILN-TEST 0 END\n\
                    KILN-TEST 1 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
                    KILN-TEST 1 STDOUT\nKILN-TEST 1 STDERR\n\
                    KILN-TEST 1 HOST exit=killed\nKILN-TEST 1 END\n\
                    KILN-TEST 2 STATUS exit=0 timed_out=0 elapsed_ms=1\n\
                    KILN-TEST 2 STDOUT\nKILN-TEST 2 STDERR\nKILN-TEST 2 END\n";
        let report = parse(text);
        let host = report.tests[&0].host.clone().unwrap();
        assert_eq!((host.exit, host.output), (Some(3), b"hi".to_vec()));
        assert_eq!(report.tests[&1].host.as_ref().unwrap().exit, None);
        assert!(report.tests[&2].host.is_none());
    }

    #[test]
    fn missing_kvm_is_visible() {
        let report = parse("KILN-VHOST-UP kvm=0 svm_cpus=0\nKILN-VHOST-DONE status=no-kvm\n");
        assert!(!report.up.unwrap().kvm);
        assert!(report.done.is_some());
    }
}
