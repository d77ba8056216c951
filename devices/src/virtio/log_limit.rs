//! Rate limiting for warnings a guest can trigger at will.
//!
//! A broken or hostile driver can submit bad requests as fast as the vCPU runs; logging each one
//! would let it fill the host's disk. Each device keeps a [`LogLimiter`]: the first
//! [`BURST`] warnings of every [`WINDOW`] are logged, the rest are counted and summarised.

use std::time::{Duration, Instant};

/// Warnings logged per window.
pub const BURST: u32 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Decides whether one more guest-triggered warning may be logged.
#[derive(Debug)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// A limiter with a fresh budget.
    pub const fn new() -> Self {
        Self {
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// True if the caller may log now. When a new window opens after warnings were suppressed,
    /// says how many were.
    pub fn allow(&mut self, what: &str) -> bool {
        self.allow_at(Instant::now(), what)
    }

    fn allow_at(&mut self, now: Instant, what: &str) -> bool {
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if expired {
            if self.suppressed > 0 {
                log::warn!(
                    "{what}: {} more warnings suppressed in the last {}s",
                    self.suppressed,
                    WINDOW.as_secs()
                );
            }
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Warnings logged in the current window.
    #[cfg(test)]
    pub fn logged(&self) -> u32 {
        self.logged
    }

    /// Warnings not logged in the current window.
    #[cfg(test)]
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

/// Logs a warning through a [`LogLimiter`]: `warn_limited!(limiter, "device", "fmt", args..)`.
macro_rules! warn_limited {
    ($limiter:expr, $what:expr, $($arg:tt)+) => {
        if $limiter.allow($what) {
            log::warn!($($arg)+);
        }
    };
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_limited_per_window() {
        let mut limiter = LogLimiter::new();
        let start = Instant::now();
        let allowed = (0..25).filter(|_| limiter.allow_at(start, "t")).count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(limiter.suppressed(), 15);
        // Still inside the window: nothing more.
        assert!(!limiter.allow_at(start + WINDOW / 2, "t"));
        // A new window gets a new budget and forgets the suppressed count.
        assert!(limiter.allow_at(start + WINDOW, "t"));
        assert_eq!(limiter.suppressed(), 0);
    }
}
