//! A logger for unit tests: captures what the current thread logs.
//!
//! `log` allows one logger per process and the test runner runs tests on parallel threads, so
//! each test captures only the lines of its own thread.

use std::cell::RefCell;
use std::sync::Once;

use log::{Level, LevelFilter, Log, Metadata, Record};

thread_local! {
    static CAPTURED: RefCell<Option<Vec<(Level, String)>>> = const { RefCell::new(None) };
}

struct ThreadCapture;

impl Log for ThreadCapture {
    fn enabled(&self, _metadata: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let line = record.args().to_string();
        CAPTURED.with(|captured| {
            if let Some(lines) = captured.borrow_mut().as_mut() {
                lines.push((record.level(), line));
            }
        });
    }

    fn flush(&self) {}
}

/// Runs `f` with every level enabled; returns its result and the lines this thread logged.
pub(crate) fn capture_logs<R>(f: impl FnOnce() -> R) -> (R, Vec<(Level, String)>) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&ThreadCapture).expect("no other logger in unit tests");
        log::set_max_level(LevelFilter::Trace);
    });
    CAPTURED.with(|captured| *captured.borrow_mut() = Some(Vec::new()));
    let result = f();
    let lines = CAPTURED.with(|captured| captured.borrow_mut().take().unwrap_or_default());
    (result, lines)
}
