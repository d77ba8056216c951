//! Rate limiting for log lines a guest can trigger at will.
//!
//! A broken or hostile guest can make a device log on every exit, as fast as a vCPU runs;
//! logging each line would let it fill the host's disk (and, for debug lines, spend the vCPU
//! thread's time formatting them). Every such line goes through a [`LogLimiter`] (or, where the
//! logging side is shared between threads, a [`SharedLogLimiter`]): the first [`BURST`] lines
//! of every [`WINDOW`] are logged, the rest are counted, and the first line logged in a later
//! window is preceded by how many were suppressed.
//!
//! Log through the macros ([`warn_limited!`](crate::warn_limited) and its siblings for the other
//! levels): they check the level first, so a disabled level costs neither a clock read nor
//! formatting, and it does not use up the budget.
//!
//! ```
//! use kiln_devices::log_limit::LogLimiter;
//! use kiln_devices::warn_limited;
//!
//! let mut warnings = LogLimiter::new();
//! for port in 0..1000u16 {
//!     // At most `BURST` of these are logged in any `WINDOW`.
//!     warn_limited!(warnings, "vcpu", "unhandled port {port:#x}");
//! }
//! ```

use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::Level;

#[doc(hidden)]
pub use log as __log;

pub use crate::{debug_limited, error_limited, info_limited, log_limited, warn_limited};

/// Lines logged per window.
pub const BURST: u32 = 10;
/// Length of a window.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Decides whether one more guest-triggered log line may be logged.
#[derive(Debug)]
pub struct LogLimiter {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    /// The most severe level among the suppressed lines: the summary is logged at it.
    suppressed_level: Level,
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
            suppressed_level: Level::Trace,
        }
    }

    /// True if the caller may log a line at `level` now. When a new window opens after lines
    /// were suppressed, logs how many were, labelled with `what`.
    pub fn allow(&mut self, level: Level, what: &str) -> bool {
        self.allow_at(Instant::now(), level, what)
    }

    fn allow_at(&mut self, now: Instant, level: Level, what: &str) -> bool {
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if expired {
            if self.suppressed > 0 {
                log::log!(
                    self.suppressed_level,
                    "{what}: {} more log lines suppressed (at most {BURST} per {}s)",
                    self.suppressed,
                    WINDOW.as_secs()
                );
            }
            self.window_start = Some(now);
            self.logged = 0;
            self.suppressed = 0;
            self.suppressed_level = Level::Trace;
        }
        if self.logged < BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            self.suppressed_level = self.suppressed_level.min(level);
            false
        }
    }
}

/// A [`LogLimiter`] for logging sides shared between threads (`&self`).
///
/// Only locked when a line is about to be logged, so it costs nothing on paths that do not log.
#[derive(Debug, Default)]
pub struct SharedLogLimiter(Mutex<LogLimiter>);

impl SharedLogLimiter {
    /// A limiter with a fresh budget.
    pub const fn new() -> Self {
        Self(Mutex::new(LogLimiter::new()))
    }

    /// True if the caller may log a line at `level` now (see [`LogLimiter::allow`]).
    pub fn allow(&self, level: Level, what: &str) -> bool {
        // The limiter's state is valid whatever a panicking holder left behind.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .allow(level, what)
    }
}

/// Logs through a [`LogLimiter`] or [`SharedLogLimiter`]:
/// `log_limited!(limiter, "device", log::Level::Debug, "fmt", args..)`.
///
/// `"device"` labels the summary of suppressed lines.
#[macro_export]
macro_rules! log_limited {
    ($limiter:expr, $what:expr, $level:expr, $($arg:tt)+) => {{
        let level: $crate::log_limit::__log::Level = $level;
        if $crate::log_limit::__log::log_enabled!(level) && $limiter.allow(level, $what) {
            $crate::log_limit::__log::log!(level, $($arg)+);
        }
    }};
}

/// [`log_limited!`](crate::log_limited) at error level: `error_limited!(limiter, "device", "fmt", args..)`.
#[macro_export]
macro_rules! error_limited {
    ($limiter:expr, $what:expr, $($arg:tt)+) => {
        $crate::log_limited!($limiter, $what, $crate::log_limit::__log::Level::Error, $($arg)+)
    };
}

/// [`log_limited!`](crate::log_limited) at warn level: `warn_limited!(limiter, "device", "fmt", args..)`.
#[macro_export]
macro_rules! warn_limited {
    ($limiter:expr, $what:expr, $($arg:tt)+) => {
        $crate::log_limited!($limiter, $what, $crate::log_limit::__log::Level::Warn, $($arg)+)
    };
}

/// [`log_limited!`](crate::log_limited) at info level: `info_limited!(limiter, "device", "fmt", args..)`.
#[macro_export]
macro_rules! info_limited {
    ($limiter:expr, $what:expr, $($arg:tt)+) => {
        $crate::log_limited!($limiter, $what, $crate::log_limit::__log::Level::Info, $($arg)+)
    };
}

/// [`log_limited!`](crate::log_limited) at debug level: `debug_limited!(limiter, "device", "fmt", args..)`.
#[macro_export]
macro_rules! debug_limited {
    ($limiter:expr, $what:expr, $($arg:tt)+) => {
        $crate::log_limited!($limiter, $what, $crate::log_limit::__log::Level::Debug, $($arg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_logger::capture_logs;

    #[test]
    fn bursts_are_limited_per_window() {
        let mut limiter = LogLimiter::new();
        let start = Instant::now();
        let allowed = (0..25)
            .filter(|_| limiter.allow_at(start, Level::Warn, "t"))
            .count();
        assert_eq!(allowed, BURST as usize);
        assert_eq!(limiter.suppressed, 15);
        // Still inside the window: nothing more.
        assert!(!limiter.allow_at(start + WINDOW / 2, Level::Warn, "t"));
        // A new window gets a new budget and forgets the suppressed count.
        let (allowed, lines) = capture_logs(|| limiter.allow_at(start + WINDOW, Level::Warn, "t"));
        assert!(allowed);
        assert_eq!(limiter.suppressed, 0);
        assert_eq!(
            lines,
            [(
                Level::Warn,
                "t: 16 more log lines suppressed (at most 10 per 5s)".to_string()
            )]
        );
    }

    #[test]
    fn the_summary_takes_the_most_severe_suppressed_level() {
        let mut limiter = LogLimiter::new();
        let start = Instant::now();
        for _ in 0..BURST {
            assert!(limiter.allow_at(start, Level::Debug, "t"));
        }
        assert!(!limiter.allow_at(start, Level::Debug, "t"));
        assert!(!limiter.allow_at(start, Level::Error, "t"));
        assert!(!limiter.allow_at(start, Level::Info, "t"));
        let (_, lines) = capture_logs(|| limiter.allow_at(start + WINDOW, Level::Debug, "t"));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0].0, Level::Error);
    }

    #[test]
    fn macros_log_at_most_a_burst_per_window() {
        let mut limiter = LogLimiter::new();
        let shared = SharedLogLimiter::new();
        let ((), lines) = capture_logs(|| {
            for event in 0..1000 {
                debug_limited!(limiter, "t", "debug {event}");
                error_limited!(shared, "t", "error {event}");
            }
        });
        let count = |level| lines.iter().filter(|(l, _)| *l == level).count();
        assert_eq!(count(Level::Debug), BURST as usize);
        assert_eq!(count(Level::Error), BURST as usize);
        assert_eq!(lines[0], (Level::Debug, "debug 0".to_string()));
    }
}
