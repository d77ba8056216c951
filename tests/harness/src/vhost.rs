//! Virtual-host mode: one boot of the virtual KVM host (`resources/vhost-run`) runs every test of
//! a suite, one after another, and sends the results back over its second serial port.
//!
//! The payload is a directory tree added to the virtual host's initramfs:
//!
//! ```text
//! kiln/run                       generated: sources runner.sh, one run_test line per test
//! kiln/runner.sh                 vhost_runner.sh
//! kiln/bin/kiln                  the kiln binary (vhost-run adds its shared libraries)
//! kiln/guest/<kernel variants>   the guest kernel builds the tests use
//! kiln/guest/initramfs.cpio.gz   the base guest initramfs
//! kiln/tests/NN/{name,test.cpio} each test's name and initramfs addition
//! kiln/tests/NN/disks            its disks: `vdX BYTES` lines, checked before kiln starts
//! kiln/tests/NN/host.sh          its host script, run beside kiln (`vsock.sock` is its socket)
//! kiln/bin/kiln-vsock            the static vsock helper host scripts use
//! kiln/tests/NN/host-only.sh     its host-only script, run instead of kiln (`work/` is its own)
//! kiln/bin/curl                  for host-only scripts (vhost-run adds its shared libraries)
//! ```
//!
//! Disk images ([`GuestTest::disk`]) are attached to the virtual host as raw virtio drives
//! (`vhost-run --drive`, see [`vhost_drives`](crate::vhost_drives)); each test's `kiln` gets the
//! devices (`--disk path=/dev/vdX,...`). QEMU writes the guest's data through to the image files,
//! which the checks read after the virtual host powered off.

use std::fs::{self, File};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::guest_test::{GuestTest, HostPaths, KernelVariant, HOST_SCRIPT_GRACE};
use crate::images::{self, GuestImages};
use crate::outcome::GuestOutcome;
use crate::process::{shell_exit_code, wait_with_limit};
use crate::results::{self, VhostReport};
use crate::vhost_drives::DrivePlan;
use crate::vhost_stall::{self, cpu_states, crash_reason, Attempt, Interruption, PristineImages};
use crate::HarnessError;

/// The runner's shell functions.
const RUNNER: &str = include_str!("vhost_runner.sh");

/// Time the virtual host may take to boot, load KVM and power off, on top of the tests.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(240);
/// Per-test time on top of its limit: unpacking its initramfs, sending its results.
const PER_TEST_ALLOWANCE: Duration = Duration::from_secs(20);
/// How much longer than vhost-run's own timeout the harness waits before killing it.
const OUTER_MARGIN: Duration = Duration::from_secs(60);

/// vhost-run's exit status when the virtual host stalled (its heartbeat stopped).
const STALLED_STATUS: i32 = 125;

/// Runs the tests in one virtual-host boot; `workdir` receives the payload and the logs. A boot
/// that stalls or crashes is retried for the tests that did not report (see
/// [`vhost_stall::run_with_retries`]).
///
/// `pristine`: copies of the batch's writable images taken before it (the suite's, which it
/// also uses for reruns); without them, this takes its own for the boot.
pub fn run(
    tests: &[GuestTest],
    kiln: &Path,
    images: &GuestImages,
    workdir: &Path,
    pristine: Option<&PristineImages>,
) -> Result<Vec<GuestOutcome>, HarnessError> {
    let run_once = |batch: &[GuestTest], dir: &Path| run_once(batch, kiln, images, dir);
    match pristine {
        Some(pristine) => vhost_stall::run_with_retries(tests, workdir, pristine, run_once),
        None => {
            let own = PristineImages::save(tests, &workdir.join("pristine"));
            let outcomes = vhost_stall::run_with_retries(tests, workdir, &own, run_once);
            own.discard();
            outcomes
        }
    }
}

pub(crate) fn run_once(
    tests: &[GuestTest],
    kiln: &Path,
    images: &GuestImages,
    workdir: &Path,
) -> Result<Attempt, HarnessError> {
    let plan = DrivePlan::new(tests);
    let console = workdir.join("vhost-console.log");
    let run_log = workdir.join("vhost-run.log");
    let logs = vec![console.clone(), run_log.clone(), workdir.to_path_buf()];
    if plan.tests.iter().all(Result::is_err) {
        // Nothing to run: no need to boot the virtual host to say so.
        let report = VhostReport::default();
        return Ok(Attempt {
            outcomes: outcomes(tests, &plan, &report, "", &logs),
            stall: None,
            booted: false,
            unreported: Vec::new(),
        });
    }
    // Build it before the timed run, so that a first download does not count against it.
    images::vhost_image()?;
    let payload = workdir.join("payload");
    write_payload(&payload, tests, &plan, kiln, images)?;

    let results_path = workdir.join("vhost-results.log");
    let limit = tests.iter().fold(BOOT_ALLOWANCE, |total, test| {
        let host = if test.host_program().is_some() {
            HOST_SCRIPT_GRACE
        } else {
            Duration::ZERO
        };
        total + test.time_limit() + PER_TEST_ALLOWANCE + host
    });
    let run_log_file = File::create(&run_log).map_err(|e| setup(&run_log, e))?;
    let script = images::resources_dir().join("vhost-run");
    let mut command = Command::new(&script);
    for drive in &plan.drives {
        command.arg("--drive").arg(drive.argument());
    }
    let mut child = command
        .arg("--payload")
        .arg(&payload)
        .arg("--console")
        .arg(&console)
        .arg("--results")
        .arg(&results_path)
        .arg("--timeout")
        .arg(limit.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(run_log_file)
        .spawn()
        .map_err(|e| setup(&script, e))?;
    let ended = wait_with_limit(
        &mut child,
        limit + OUTER_MARGIN,
        Some(Duration::from_secs(15)),
    )
    .map_err(|e| setup(&script, e))?;

    let ending = match ended.status {
        Some(status) if status.success() => "the virtual host powered off".to_string(),
        Some(status) => match shell_exit_code(status) {
            Some(124) => format!("the virtual host was killed after {}s", limit.as_secs()),
            Some(STALLED_STATUS) => "vhost-run stopped the stalled virtual host".to_string(),
            Some(code) => format!("vhost-run exited with status {code}"),
            None => format!("vhost-run ended with {status}"),
        },
        None => "the harness killed vhost-run at its outer time limit".to_string(),
    };
    let text = fs::read(&results_path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let report = results::parse(&text);
    let exit_code = ended.status.and_then(shell_exit_code);
    let stalled = exit_code == Some(STALLED_STATUS);
    // Powered off (QEMU exits 0 when its guest resets: -no-reboot) without the runner's last
    // line: the virtual host's kernel went down under the tests.
    let crashed = exit_code == Some(0) && report.done.is_none();
    let cpus = cpu_states(&run_log);
    let ending = match last_lines(&run_log, 10) {
        // vhost-run's own messages say why it could not start (e.g. QEMU not installable).
        Some(messages) if report.up.is_none() => format!("{ending}; vhost-run said:\n{messages}"),
        _ if !cpus.is_empty() => format!("{ending}; its CPUs then: {cpus}"),
        // A virtual host that ended early: its console's last lines say what it was doing.
        _ => match last_lines(&console, 8) {
            Some(lines) if report.done.is_none() => {
                format!("{ending}; the end of its console:\n{lines}")
            }
            _ => ending,
        },
    };
    let unreported = (0..tests.len())
        .filter(|index| {
            matches!(plan.tests.get(*index), Some(Ok(_)))
                && !report.tests.contains_key(index)
                && !report.problems.contains_key(index)
                && !report.broken.contains_key(index)
        })
        .collect();
    Ok(Attempt {
        outcomes: outcomes(tests, &plan, &report, &ending, &logs),
        stall: if stalled {
            Some(Interruption::Stalled { cpus })
        } else if crashed {
            Some(Interruption::Crashed {
                why: crash_reason(&console),
            })
        } else {
            None
        },
        booted: report.up.is_some(),
        unreported,
    })
}

/// The last `count` non-empty lines of a text file, if it has any.
fn last_lines(path: &Path, count: usize) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let tail = lines[lines.len().saturating_sub(count)..].join("\n");
    (!tail.is_empty()).then_some(tail)
}

fn setup(path: &Path, error: std::io::Error) -> HarnessError {
    HarnessError::Setup(format!("{}: {error}", path.display()))
}

/// Turns the parsed report into one outcome per test; whatever did not run or did not come back
/// is a problem that says why, as precisely as the plan and the report allow.
fn outcomes(
    tests: &[GuestTest],
    plan: &DrivePlan,
    report: &VhostReport,
    ending: &str,
    logs: &[PathBuf],
) -> Vec<GuestOutcome> {
    let missing_reason = match &report.up {
        None => format!("the virtual host never reported that it was up ({ending})"),
        Some(up) if !up.kvm => format!("/dev/kvm is missing inside the virtual host ({})", up.line),
        Some(_) => format!("the virtual host ended before this test reported ({ending})"),
    };
    tests
        .iter()
        .enumerate()
        .map(|(index, test)| {
            let mut outcome = GuestOutcome {
                name: test.name().to_string(),
                time_limit: test.time_limit(),
                logs: logs.to_vec(),
                ..GuestOutcome::default()
            };
            if let Some(Err(problem)) = plan.tests.get(index) {
                outcome.problem = Some(problem.clone());
            } else if let Some(problem) = report.problems.get(&index) {
                outcome.problem = Some(format!("the virtual host did not run it: {problem}"));
            } else if let Some(result) = report.tests.get(&index) {
                outcome.stdout = String::from_utf8_lossy(&result.stdout).into_owned();
                outcome.stderr = String::from_utf8_lossy(&result.stderr).into_owned();
                outcome.timed_out = result.timed_out;
                outcome.exit_code = (!result.timed_out).then_some(result.exit);
                outcome.elapsed = result.elapsed;
                if let Some(host) = &result.host {
                    outcome.host_output = String::from_utf8_lossy(&host.output).into_owned();
                    outcome.host_exit_code = host.exit;
                }
            } else if let Some(broken) = report.broken.get(&index) {
                outcome.problem = Some(format!("garbled result from the virtual host: {broken}"));
            } else {
                outcome.problem = Some(missing_reason.clone());
            }
            outcome
        })
        .collect()
}

fn write_payload(
    payload: &Path,
    tests: &[GuestTest],
    plan: &DrivePlan,
    kiln: &Path,
    images: &GuestImages,
) -> Result<(), HarnessError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error: std::io::Error| setup(&path, error)
    };
    let kiln_dir = payload.join("kiln");
    for dir in ["bin", "guest", "tests"] {
        fs::create_dir_all(kiln_dir.join(dir)).map_err(io(&kiln_dir))?;
    }
    let kiln = kiln
        .canonicalize()
        .map_err(|error| HarnessError::Setup(format!("kiln binary {}: {error}", kiln.display())))?;
    // vhost-run archives the payload with `cpio -L`: symlinks are copied as their targets.
    symlink(&kiln, kiln_dir.join("bin/kiln")).map_err(io(&kiln))?;
    if tests
        .iter()
        .any(|test| test.host_program().is_some() || test.host_only_script_text().is_some())
    {
        let helper = images.vsock_helper();
        symlink(&helper, kiln_dir.join("bin/kiln-vsock")).map_err(io(&helper))?;
    }
    symlink(images.initramfs(), kiln_dir.join("guest/initramfs.cpio.gz"))
        .map_err(io(&images.initramfs()))?;
    if tests
        .iter()
        .any(|test| test.host_only_script_text().is_some())
    {
        // Host-only scripts talk to Kiln's API with curl; vhost-run copies its libraries along.
        let curl = find_on_path("curl").ok_or_else(|| {
            HarnessError::Setup(
                "a host-only-script test needs curl on this machine (apt-get install curl); it is \
                 copied into the virtual KVM host"
                    .to_string(),
            )
        })?;
        symlink(&curl, kiln_dir.join("bin/curl")).map_err(io(&curl))?;
    }
    for variant in [KernelVariant::Vmlinux, KernelVariant::BzImage] {
        if tests.iter().any(|test| test.kernel_variant() == variant) {
            let kernel = images.kernel(variant);
            symlink(&kernel, kiln_dir.join("guest").join(variant.file_name()))
                .map_err(io(&kernel))?;
        }
    }

    let mut run = format!(
        "#!/bin/sh\n# Generated by kiln-test-harness.\nHOST_GRACE_SECS={}\n. /kiln/runner.sh\n",
        HOST_SCRIPT_GRACE.as_secs()
    );
    for (index, test) in tests.iter().enumerate() {
        // A test that cannot run gets its outcome from the plan; it is not in the payload.
        let Some(Ok(drives)) = plan.tests.get(index) else {
            continue;
        };
        let dir = kiln_dir.join(format!("tests/{index:02}"));
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        fs::write(dir.join("name"), format!("{}\n", test.name())).map_err(io(&dir))?;
        fs::write(dir.join("test.cpio"), test.initramfs_addition()).map_err(io(&dir))?;
        if !drives.is_empty() {
            fs::write(dir.join("disks"), plan.runner_list(drives)).map_err(io(&dir))?;
        }
        if let Some(host) = test.host_program() {
            fs::write(dir.join("host.sh"), host).map_err(io(&dir))?;
        }
        let guest_dir = format!("/kiln/tests/{index:02}");
        let kernel = format!("/kiln/guest/{}", test.kernel_variant().file_name());
        let mut command = vec![
            index.to_string(),
            test.time_limit().as_secs().max(1).to_string(),
            guest_dir.clone(),
        ];
        let initrd = format!("{guest_dir}/initrd");
        match test.host_only_script_text() {
            Some(script) => {
                let host_only_script = format!("{guest_dir}/host-only.sh");
                fs::write(dir.join("host-only.sh"), script).map_err(io(&dir))?;
                let work = format!("{guest_dir}/work");
                fs::create_dir_all(dir.join("work")).map_err(io(&dir))?;
                let paths = HostPaths {
                    kiln: "/kiln/bin/kiln",
                    kernel: &kernel,
                    initrd: &initrd,
                    work: &work,
                    disks: drives
                        .iter()
                        .map(|&drive| DrivePlan::device(drive))
                        .collect(),
                };
                command.extend([
                    "env".to_string(),
                    "PATH=/kiln/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string(),
                ]);
                command.extend(
                    test.host_environment(&paths)
                        .into_iter()
                        .map(|(name, value)| format!("{name}={value}")),
                );
                // A session (and process group) of its own: the runner kills all of it.
                command.extend(["setsid".to_string(), "sh".to_string(), host_only_script]);
            }
            None => {
                command.push("/kiln/bin/kiln".to_string());
                command.extend(
                    test.kiln_arguments_with_disks(&kernel, &initrd, |disk, spec| {
                        let drive = drives.get(disk).copied().unwrap_or_default();
                        spec.vhost_spec(&DrivePlan::device(drive))
                    }),
                );
                command.extend(test.vsock_arguments(&format!("{guest_dir}/vsock.sock")));
            }
        }
        for (drive, path) in plan.links.get(index).into_iter().flatten() {
            run.push_str(&format!(
                "link_drive {} {}\n",
                DrivePlan::device(*drive),
                shell_quote(&path.to_string_lossy())
            ));
        }
        let quoted: Vec<String> = command.iter().map(|word| shell_quote(word)).collect();
        run.push_str(&format!("run_test {}\n", quoted.join(" ")));
    }
    write_executable(&kiln_dir.join("runner.sh"), RUNNER)?;
    write_executable(&kiln_dir.join("run"), &run)
}

/// `name` in one of the directories of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| candidate.is_file())
}

fn write_executable(path: &Path, text: &str) -> Result<(), HarnessError> {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, text).map_err(|e| setup(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).map_err(|e| setup(path, e))
}

/// Quotes a word for a POSIX shell: single quotes, with `'` written as `'\''`.
pub fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=,:+".contains(&b));
    if safe {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::parse;

    #[test]
    fn quoting_survives_a_real_shell() {
        let words = ["plain", "two words", "it's", "$HOME `x` \"q\"", "", "a\nb"];
        let line: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
        let script = format!("for w in {}; do printf '<%s>' \"$w\"; done", line.join(" "));
        let output = Command::new("sh").args(["-c", &script]).output().unwrap();
        let expected: String = words.iter().map(|w| format!("<{w}>")).collect();
        assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    }

    #[test]
    fn missing_results_name_the_reason() {
        let tests = [GuestTest::new("a", "true"), GuestTest::new("b", "true")];
        let report = parse(
            "KILN-VHOST-UP kvm=1 svm_cpus=2\nKILN-TEST 0 STATUS exit=0 timed_out=0 elapsed_ms=5\n\
             KILN-TEST 0 STDOUT\naGk=\nKILN-TEST 0 STDERR\nKILN-TEST 0 END\n",
        );
        let outcomes = outcomes(
            &tests,
            &DrivePlan::new(&tests),
            &report,
            "vhost-run exited with status 1",
            &[],
        );
        assert_eq!(outcomes[0].stdout, "hi");
        assert_eq!(outcomes[0].exit_code, Some(0));
        let problem = outcomes[1].problem.as_deref().unwrap();
        assert!(
            problem.contains("ended before this test reported"),
            "{problem}"
        );
        assert!(problem.contains("status 1"), "{problem}");
    }

    #[test]
    fn missing_kvm_is_the_reason_for_every_test() {
        let tests = [GuestTest::new("a", "true")];
        let report = parse("KILN-VHOST-UP kvm=0 svm_cpus=0\nKILN-VHOST-DONE status=no-kvm\n");
        let outcomes = outcomes(
            &tests,
            &DrivePlan::new(&tests),
            &report,
            "the virtual host powered off",
            &[],
        );
        assert!(outcomes[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("/dev/kvm is missing"));
    }

    #[test]
    fn tests_that_did_not_run_say_why() {
        let tests = [
            GuestTest::new("bad", "true").disk("/nonexistent/kiln.img", Default::default()),
            GuestTest::new("skipped_inside", "true"),
            GuestTest::new("ran", "true"),
        ];
        let plan = DrivePlan::new(&tests);
        let report = parse(
            "KILN-VHOST-UP kvm=1\nKILN-TEST 1 PROBLEM /dev/vda is missing\n\
             KILN-TEST 2 STATUS exit=0 timed_out=0 elapsed_ms=5\n\
             KILN-TEST 2 STDOUT\nKILN-TEST 2 STDERR\nKILN-TEST 2 END\n",
        );
        let outcomes = outcomes(&tests, &plan, &report, "", &[]);
        let problem = |index: usize| outcomes[index].problem.clone().unwrap_or_default();
        assert!(
            problem(0).contains("/nonexistent/kiln.img"),
            "{}",
            problem(0)
        );
        assert_eq!(
            problem(1),
            "the virtual host did not run it: /dev/vda is missing"
        );
        assert_eq!(outcomes[2].problem, None);
        assert_eq!(outcomes[2].exit_code, Some(0));
    }

    #[test]
    fn timed_out_tests_have_no_exit_code() {
        let tests = [GuestTest::new("a", "sleep 1000")];
        let report = parse(
            "KILN-VHOST-UP kvm=1\nKILN-TEST 0 STATUS exit=137 timed_out=1 elapsed_ms=5\n\
             KILN-TEST 0 STDOUT\nKILN-TEST 0 STDERR\nKILN-TEST 0 END\n",
        );
        let outcomes = outcomes(&tests, &DrivePlan::new(&tests), &report, "", &[]);
        assert!(outcomes[0].timed_out);
        assert_eq!(outcomes[0].exit_code, None);
    }
}
