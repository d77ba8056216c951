//! Running one VMM process and measuring it: wall time from spawn to exit, CPU time and peak
//! RSS from `wait4`, and the host counters used for leak checks.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::BenchError;

/// One finished VMM run.
#[derive(Clone, Debug)]
pub struct Sample {
    /// From just before `spawn` to the moment the exit was noticed.
    pub wall: Duration,
    /// User plus system CPU time of the process and its threads.
    pub cpu: Duration,
    /// Peak resident set size in KiB (`ru_maxrss`).
    pub max_rss_kib: u64,
    /// Exit code, or `128 + signal` when killed by a signal.
    pub code: i32,
    /// The guest console (the VMM's stdout).
    pub stdout: String,
    /// The VMM's stderr (for error messages).
    pub stderr: String,
}

impl Sample {
    /// A short account for error messages.
    pub fn describe(&self) -> String {
        format!(
            "exit code {} after {:.3} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.wall.as_secs_f64(),
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(2000);
    let start = (start..=text.len())
        .find(|index| text.is_char_boundary(*index))
        .unwrap_or(text.len());
    &text[start..]
}

/// Per-run scratch files for captured output.
pub struct Scratch {
    dir: PathBuf,
    counter: u64,
}

impl Scratch {
    /// Creates a scratch directory unique to this instance.
    pub fn new() -> Result<Self, BenchError> {
        static INSTANCES: AtomicU64 = AtomicU64::new(0);
        let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kiln-bench-{}-{instance}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|err| BenchError::new(format!("cannot create {}: {err}", dir.display())))?;
        Ok(Scratch { dir, counter: 0 })
    }

    /// A fresh file path in the scratch directory.
    pub fn file(&mut self, stem: &str) -> PathBuf {
        self.counter += 1;
        self.dir.join(format!("{stem}-{}.log", self.counter))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover scratch directory in /tmp is harmless.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A spawned VMM whose stdout/stderr go to files.
pub struct Running {
    /// The child (never waited through std: `wait4` reaps it to get its rusage).
    pub child: Child,
    /// When `spawn` was called.
    pub started: Instant,
    /// Where its stdout goes.
    pub stdout_path: PathBuf,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
}

impl Running {
    /// Spawns `command` with stdin closed and output into two scratch files.
    pub fn spawn(command: &mut Command, scratch: &mut Scratch) -> Result<Self, BenchError> {
        let stdout_path = scratch.file("stdout");
        let stderr_path = scratch.file("stderr");
        let create = |path: &Path| {
            File::create(path)
                .map_err(|err| BenchError::new(format!("cannot create {}: {err}", path.display())))
        };
        let stdout = create(&stdout_path)?;
        let stderr = create(&stderr_path)?;
        let started = Instant::now();
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|err| BenchError::new(format!("cannot start {command:?}: {err}")))?;
        Ok(Running {
            child,
            started,
            stdout_path,
            stderr_path,
        })
    }

    /// The process id.
    pub fn pid(&self) -> libc::pid_t {
        // A pid always fits pid_t; the cast only changes signedness.
        self.child.id() as libc::pid_t
    }

    /// What the guest printed so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Sends `signal` (ignoring a process that already exited).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill() on a pid we spawned and have not reaped yet; no memory is involved.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits until the process exits (SIGKILL `timeout` after it started) and measures it.
    pub fn wait(self, timeout: Duration) -> Result<Sample, BenchError> {
        let deadline = self.started + timeout;
        self.wait_until(deadline)
    }

    /// True once the process has exited (it stays a zombie until reaped).
    pub fn has_exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map(|stat| {
                // The state follows the parenthesised command name, which may contain spaces.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .map_or(true, |state| state == "Z" || state == "X")
            })
            .unwrap_or(true)
    }

    /// SIGKILLs the process and reaps it (for cleaning up after a failure).
    pub fn kill_and_reap(self) {
        self.signal(libc::SIGKILL);
        // The error only says it was already reaped; nothing is left to clean up then.
        let _ = reap(self.pid(), false);
    }

    /// Waits until the process exits (SIGKILL at `deadline`) and measures it.
    pub fn wait_until(self, deadline: Instant) -> Result<Sample, BenchError> {
        let timeout = deadline.saturating_duration_since(self.started);
        let pid = self.pid();
        let mut killed = false;
        let (status, usage, ended) = loop {
            let now = Instant::now();
            if !killed && now >= deadline {
                self.signal(libc::SIGKILL);
                killed = true;
            }
            wait_for_exit(pid, deadline.saturating_duration_since(now));
            if let Some((status, usage)) = reap(pid, !killed)? {
                break (status, usage, Instant::now());
            }
        };
        let sample = Sample {
            wall: ended - self.started,
            cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            code: exit_code(status),
            stdout: read_lossy(&self.stdout_path),
            stderr: read_lossy(&self.stderr_path),
        };
        if killed {
            return Err(BenchError::new(format!(
                "{:?} did not finish within {} s: {}",
                self.child,
                timeout.as_secs(),
                sample.describe()
            )));
        }
        Ok(sample)
    }
}

/// Runs `command` to completion and measures it.
pub fn run_once(
    command: &mut Command,
    scratch: &mut Scratch,
    timeout: Duration,
) -> Result<Sample, BenchError> {
    Running::spawn(command, scratch)?.wait(timeout)
}

/// Blocks until `pid` may have exited or `limit` passed (pidfd + poll, else a short sleep).
fn wait_for_exit(pid: libc::pid_t, limit: Duration) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory involved.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        std::thread::sleep(limit.min(Duration::from_micros(200)));
        return;
    }
    let pidfd = pidfd as libc::c_int;
    let mut entry = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = limit.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: `entry` is a valid pollfd for the duration of the call; we own `pidfd` and close
    // it right after.
    unsafe {
        libc::poll(&mut entry, 1, millis);
        libc::close(pidfd);
    }
}

/// Reaps `pid` if it exited: `(wait status, rusage)`; blocks when `nohang` is false.
fn reap(pid: libc::pid_t, nohang: bool) -> Result<Option<(libc::c_int, libc::rusage)>, BenchError> {
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if nohang { libc::WNOHANG } else { 0 };
    // SAFETY: wait4 writes only into the two locals passed by pointer.
    let result = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    match result {
        0 => Ok(None),
        r if r == pid => Ok(Some((status, usage))),
        _ => Err(BenchError::new(format!(
            "wait4({pid}) failed: {}",
            std::io::Error::last_os_error()
        ))),
    }
}

fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

fn timeval(value: libc::timeval) -> Duration {
    let secs = u64::try_from(value.tv_sec).unwrap_or(0);
    let micros = u32::try_from(value.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Current resident set of `pid` in KiB (`VmRSS`), if it is still running.
pub fn current_rss_kib(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_kib(&status, "VmRSS:")
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: libc::pid_t) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// `MemAvailable` of the host in KiB.
pub fn mem_available_kib() -> Option<u64> {
    status_field_kib(
        &std::fs::read_to_string("/proc/meminfo").ok()?,
        "MemAvailable:",
    )
}

/// File handles allocated host-wide (first field of /proc/sys/fs/file-nr).
pub fn host_file_handles() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/file-nr")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Makes this process the reaper of orphaned descendants, so that anything a VMM leaves
/// running after its own exit becomes our child and shows up in [`children`].
pub fn become_subreaper() -> Result<(), BenchError> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no memory is passed.
    let result = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if result != 0 {
        return Err(BenchError::new(format!(
            "prctl(PR_SET_CHILD_SUBREAPER) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Pids of this process's children, live or zombie.
pub fn children() -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id().to_string();
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("PPid:"))
                    .is_some_and(|ppid| ppid.trim() == me)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_a_short_process() {
        let mut scratch = Scratch::new().expect("scratch dir");
        let mut command = Command::new("sh");
        command.args(["-c", "echo hi; exit 7"]);
        let sample = run_once(&mut command, &mut scratch, Duration::from_secs(10)).expect("run");
        assert_eq!(sample.code, 7);
        assert_eq!(sample.stdout, "hi\n");
        assert!(sample.max_rss_kib > 0);
        assert!(sample.wall < Duration::from_secs(10));
    }

    #[test]
    fn kills_at_the_deadline() {
        let mut scratch = Scratch::new().expect("scratch dir");
        let mut command = Command::new("sleep");
        command.arg("30");
        let err = run_once(&mut command, &mut scratch, Duration::from_millis(200))
            .expect_err("must time out");
        assert!(err.to_string().contains("did not finish"), "{err}");
    }

    #[test]
    fn parses_proc_fields() {
        let text = "Name:\tx\nVmRSS:\t   1234 kB\n";
        assert_eq!(status_field_kib(text, "VmRSS:"), Some(1234));
        assert_eq!(status_field_kib(text, "VmHWM:"), None);
        assert!(current_rss_kib(std::process::id() as libc::pid_t).is_some());
        assert!(open_fds(std::process::id() as libc::pid_t).is_some_and(|fds| fds >= 3));
    }

    #[test]
    fn an_orphaned_grandchild_is_found() {
        become_subreaper().expect("prctl");
        // The shell exits at once and leaves its `sleep` child behind: it must become ours.
        let status = Command::new("sh")
            .args(["-c", "sleep 5.0417 & exit 0"])
            .status()
            .expect("sh");
        assert!(status.success());
        std::thread::sleep(Duration::from_millis(200));
        let found: Vec<_> = children()
            .into_iter()
            .filter(|pid| {
                // By its unique argument: other tests in this binary start `sleep`s too.
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.ends_with(b"sleep\x005.0417\x00"))
            })
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        for pid in found {
            // SAFETY: kill/waitpid on our own (adopted) child; no memory involved besides the
            // null status pointer, which waitpid accepts.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
