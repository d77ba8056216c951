//! Kiln's log lines, kept apart from the guest console (stdout).
//!
//! `kiln run` writes `kiln: LEVEL: message` on stderr. `kiln fc` writes Firecracker's layout,
//! `TIMESTAMP [ID:THREAD(:LEVEL)(:FILE:LINE)] message`, on stderr or to the `--log-path` /
//! `PUT /logger` file, with Firecracker's level, module filter and show flags.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// How lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `kiln: info: message`.
    Kiln,
    /// `2024-01-02T03:04:05.123456789 [id:thread:INFO] message`.
    Firecracker,
}

struct Settings {
    style: Style,
    instance_id: String,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
    file: Option<Mutex<File>>,
}

struct KilnLogger {
    settings: RwLock<Settings>,
}

static LOGGER: KilnLogger = KilnLogger {
    settings: RwLock::new(Settings {
        style: Style::Kiln,
        instance_id: String::new(),
        show_level: false,
        show_origin: false,
        module: None,
        file: None,
    }),
};

impl log::Log for KilnLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let settings = self.settings.read().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &settings.module {
            if !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let line = match settings.style {
            Style::Kiln => format!(
                "kiln: {}: {}\n",
                record.level().as_str().to_ascii_lowercase(),
                record.args()
            ),
            Style::Firecracker => firecracker_line(&settings, record),
        };
        // A closed stderr or a full pipe must not stop the VM; the line is lost, nothing else.
        match &settings.file {
            Some(file) => {
                let _ = file
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

fn firecracker_line(settings: &Settings, record: &log::Record) -> String {
    let thread = std::thread::current();
    let mut tag = format!(
        "{}:{}",
        settings.instance_id,
        thread.name().unwrap_or("unnamed")
    );
    if settings.show_level {
        tag.push(':');
        tag.push_str(record.level().as_str());
    }
    if settings.show_origin {
        tag.push_str(&format!(
            ":{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        ));
    }
    format!(
        "{} [{tag}] {}\n",
        timestamp(SystemTime::now()),
        record.args()
    )
}

/// `YYYY-MM-DDTHH:MM:SS.NNNNNNNNN` in UTC.
fn timestamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_nanos()
    )
}

/// Installs the logger in Kiln's style with the given level.
pub fn init(level: log::LevelFilter) {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// What `kiln fc` may change, as Firecracker's `--level`/`--log-path`/... and `PUT /logger`.
#[derive(Debug, Clone, Default)]
pub struct FirecrackerLog<'a> {
    /// Instance id in every line.
    pub instance_id: Option<&'a str>,
    /// Level filter.
    pub level: Option<log::LevelFilter>,
    /// File or named pipe instead of stderr.
    pub path: Option<&'a Path>,
    /// Put the level in each line.
    pub show_level: Option<bool>,
    /// Put the source file and line in each line.
    pub show_origin: Option<bool>,
    /// Only lines from this module path.
    pub module: Option<&'a str>,
}

/// Switches to Firecracker's layout and applies what `config` sets.
pub fn configure_firecracker(config: &FirecrackerLog) -> Result<(), String> {
    let file = match config.path {
        Some(path) => Some(open_log(path)?),
        None => None,
    };
    let mut settings = LOGGER.settings.write().unwrap_or_else(|p| p.into_inner());
    settings.style = Style::Firecracker;
    if let Some(id) = config.instance_id {
        settings.instance_id = id.to_string();
    }
    if let Some(show) = config.show_level {
        settings.show_level = show;
    }
    if let Some(show) = config.show_origin {
        settings.show_origin = show;
    }
    if let Some(module) = config.module {
        settings.module = Some(module.to_string());
    }
    if let Some(file) = file {
        settings.file = Some(Mutex::new(file));
    }
    if let Some(level) = config.level {
        log::set_max_level(level);
    }
    Ok(())
}

/// Opens a log file for appending (created if missing); a named pipe read-write and
/// non-blocking, so that Kiln neither waits for a reader nor stalls on a full pipe.
fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|err| format!("cannot open log file '{}': {err}", path.display()))
}

/// `PUT /logger` for the API controller.
#[derive(Debug, Default)]
pub struct ApiLogging;

impl kiln_api::Logging for ApiLogging {
    fn configure(&self, config: &kiln_api::model::Logger) -> Result<(), String> {
        let path = config.log_path.as_deref().map(Path::new);
        configure_firecracker(&FirecrackerLog {
            instance_id: None,
            level: config.level_filter()?,
            path,
            show_level: config.show_level,
            show_origin: config.show_log_origin,
            module: config.module.as_deref(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let at = UNIX_EPOCH + Duration::new(1_709_251_199, 5);
        assert_eq!(timestamp(at), "2024-02-29T23:59:59.000000005");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        let at = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(at), "2000-02-29T00:00:00.000000000");
    }
}
