//! Runs a child process with a deadline and collects its output.
//!
//! Std-only so that test crates which cannot depend on `kiln-test-guests` can include it.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How a child run ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit status, or `None` when the deadline passed and the child was killed.
    pub status: Option<ExitStatus>,
    /// Everything the child wrote on stdout.
    pub stdout: String,
    /// Everything the child wrote on stderr.
    pub stderr: String,
    /// Wall time from spawn to exit (or to the kill).
    pub elapsed: Duration,
}

impl Finished {
    /// True when the child exited on its own with status 0.
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|status| status.success())
    }

    /// The exit code, if the child exited on its own (not by a signal or the deadline).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|status| status.code())
    }

    /// A one-paragraph account of the run for assertion messages.
    pub fn describe(&self) -> String {
        let ending = match self.status {
            Some(status) => format!("exited with {status}"),
            None => "was killed at its deadline".to_string(),
        };
        format!(
            "{ending} after {:.3} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.elapsed.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// Spawns `command` (stdin closed, stdout/stderr captured) and waits at most `timeout`.
pub fn run_with_timeout(command: &mut Command, timeout: Duration) -> io::Result<Finished> {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_until(&mut child, start + timeout)?;
    let elapsed = start.elapsed();
    Ok(Finished {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
        elapsed,
    })
}

/// Waits for `child` until `deadline`, killing it then; `None` means it was killed.
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // The child may exit between the check and the kill; either way reap it.
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(2));
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            // A read error just ends the capture; what was read so far is kept.
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    })
}

fn collect(reader: Option<JoinHandle<Vec<u8>>>) -> String {
    let bytes = reader
        .and_then(|handle| handle.join().ok())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}
