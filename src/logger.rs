//! Kiln's log lines on stderr: `kiln: LEVEL: message`, kept apart from the guest console.

use std::io::Write;

struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_lowercase();
            // A closed stderr must not stop the VM; the line is lost, nothing else.
            let _ = writeln!(std::io::stderr(), "kiln: {level}: {}", record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger with the given level.
pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}
