//! Waiting for a child process with a deadline.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

/// How often a waiting loop looks at the child.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How a waited-for child ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit status, or `None` when the deadline passed and it was killed.
    pub status: Option<ExitStatus>,
    /// Wall time from the start of the wait.
    pub elapsed: Duration,
}

/// Waits for `child` at most `limit`. At the limit it sends `SIGTERM` when `grace` is given (and
/// `SIGKILL` after `grace` if the child is still there), or `SIGKILL` at once otherwise, and
/// reaps it.
pub fn wait_with_limit(
    child: &mut Child,
    limit: Duration,
    grace: Option<Duration>,
) -> io::Result<Ended> {
    let start = Instant::now();
    if let Some(status) = wait_until(child, start + limit)? {
        return Ok(Ended {
            status: Some(status),
            elapsed: start.elapsed(),
        });
    }
    if let Some(grace) = grace {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) with the pid of our own, not yet reaped child: it cannot reach
            // another process, and errors are reported through the return value only.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if wait_until(child, Instant::now() + grace)?.is_some() {
            return Ok(Ended {
                status: None,
                elapsed: start.elapsed(),
            });
        }
    }
    child.kill()?;
    child.wait()?;
    Ok(Ended {
        status: None,
        elapsed: start.elapsed(),
    })
}

fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// A shell-style exit code: the exit status, or 128+N after death by signal N.
pub fn shell_exit_code(status: ExitStatus) -> Option<i32> {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn returns_the_status_of_a_quick_child() {
        let mut child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let ended = wait_with_limit(&mut child, Duration::from_secs(10), None).unwrap();
        assert_eq!(ended.status.and_then(shell_exit_code), Some(7));
    }

    #[test]
    fn kills_a_child_at_the_limit() {
        let mut child = Command::new("sleep").arg("100").spawn().unwrap();
        let ended = wait_with_limit(&mut child, Duration::from_millis(200), None).unwrap();
        assert!(ended.status.is_none());
        assert!(ended.elapsed < Duration::from_secs(5));
    }

    #[test]
    fn terminates_gracefully_first() {
        let mut child = Command::new("sleep").arg("100").spawn().unwrap();
        let grace = Some(Duration::from_secs(5));
        let ended = wait_with_limit(&mut child, Duration::from_millis(100), grace).unwrap();
        assert!(ended.status.is_none());
        // sleep dies of SIGTERM at once; the grace period is not used up.
        assert!(ended.elapsed < Duration::from_secs(4));
    }

    #[test]
    fn signal_deaths_map_to_128_plus_n() {
        let mut child = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(shell_exit_code(status), Some(137));
    }
}
