//! `kiln fc ...` (or `kiln --api-sock ...`, or Kiln started as `firecracker`): Firecracker's
//! command line and its API socket, so that programs that exec `firecracker` can exec Kiln.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use clap::Parser;
use kiln_api::model::Metrics;
use kiln_api::router::Action;
use kiln_api::{ApiServer, ConfigFile, Controller, Resources, ServerLimits};
use kiln_vmm::{ConsoleConfig, RunningVm, VmConfig, VmHandle, VmOutcome};

use crate::logger::{self, ApiLogging, FirecrackerLog};
use crate::signals::StopSignals;

/// Firecracker's exit status for a bad configuration (config file, logger, metrics).
pub const EXIT_BAD_CONFIGURATION: u8 = 152;
/// Firecracker's exit status for command-line errors.
pub const EXIT_ARG_PARSING: u8 = 153;

/// Flags only Firecracker has: when Kiln's first argument is one of them, the whole command
/// line is Firecracker's.
const FIRECRACKER_FLAGS: &[&str] = &[
    "api-sock",
    "id",
    "config-file",
    "no-api",
    "log-path",
    "level",
    "module",
    "show-level",
    "show-log-origin",
    "metrics-path",
    "boot-timer",
    "http-api-max-payload-size",
    "mmds-size-limit",
    "seccomp-filter",
    "no-seccomp",
    "start-time-us",
    "start-time-cpu-us",
    "parent-cpu-time-us",
    "metadata",
    "enable-pci",
    "snapshot-version",
    "describe-snapshot",
];

/// The arguments for Firecracker mode, if the command line asks for it: Kiln started under the
/// name `firecracker`, `kiln fc ...`, or a first argument only Firecracker has.
pub fn firecracker_arguments(args: &[OsString]) -> Option<Vec<OsString>> {
    let program = args.first()?;
    let rest = &args[1..];
    let called_firecracker = std::path::Path::new(program)
        .file_name()
        .is_some_and(|name| name == "firecracker");
    let with_name = |rest: &[OsString]| {
        std::iter::once(OsString::from("kiln fc"))
            .chain(rest.iter().cloned())
            .collect()
    };
    if called_firecracker {
        return Some(with_name(rest));
    }
    let first = rest.first()?.to_str()?;
    if first == "fc" {
        return Some(with_name(&rest[1..]));
    }
    let flag = first.strip_prefix("--")?.split('=').next()?;
    FIRECRACKER_FLAGS.contains(&flag).then(|| with_name(rest))
}

/// Firecracker's command line.
#[derive(Parser, Debug)]
#[command(
    name = "kiln fc",
    disable_version_flag = true,
    about = "Kiln with Firecracker's command line and REST API (see docs/user-guide.md)"
)]
pub struct FcArgs {
    /// Unix socket of the REST API.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// MicroVM id (1-64 characters: letters, digits, '-'), shown in GET / and the logs.
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Configure and start the microVM from this file (Firecracker's JSON layout).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// No API socket (needs --config-file).
    #[arg(long, requires = "config_file")]
    pub no_api: bool,
    /// Log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off.
    #[arg(long)]
    pub level: Option<String>,
    /// Only log lines from this module path.
    #[arg(long)]
    pub module: Option<String>,
    /// Put the level in each log line.
    #[arg(long)]
    pub show_level: bool,
    /// Put the source file and line in each log line.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Write Firecracker-style metrics to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Accepted: Kiln's boot timer device is always there.
    #[arg(long)]
    pub boot_timer: bool,
    /// Print the Firecracker API version Kiln answers as, and Kiln's own.
    #[arg(long)]
    pub version: bool,
    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = kiln_api::server::DEFAULT_MAX_PAYLOAD)]
    pub http_api_max_payload_size: usize,
    /// Accepted and unused: Kiln has no MMDS.
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Accepted: Kiln installs no seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Refused: Kiln installs no seccomp filters.
    #[arg(long, value_name = "PATH")]
    pub seccomp_filter: Option<PathBuf>,
    /// Accepted and unused (process start time for Firecracker's metrics).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Accepted and unused.
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// Accepted and unused.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Refused: Kiln has no MMDS.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
    /// Refused: Kiln has no PCI.
    #[arg(long)]
    pub enable_pci: bool,
    /// Refused: Kiln has no snapshots.
    #[arg(long)]
    pub snapshot_version: bool,
    /// Refused: Kiln has no snapshots.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
}

impl FcArgs {
    /// Why Kiln cannot do what these flags ask, if it cannot.
    pub fn refusal(&self) -> Option<String> {
        let refuse =
            |flag: &str, why: &str| Some(format!("{flag} is not supported by Kiln: {why}"));
        if self.seccomp_filter.is_some() {
            return refuse(
                "--seccomp-filter",
                "it installs no seccomp filters (drop the flag, or pass --no-seccomp)",
            );
        }
        if self.metadata.is_some() {
            return refuse("--metadata", "it has no microVM metadata service (MMDS)");
        }
        if self.enable_pci {
            return refuse("--enable-pci", "its devices are virtio-mmio only");
        }
        if self.snapshot_version || self.describe_snapshot.is_some() {
            return refuse("snapshot flags", "it has no snapshots");
        }
        let id_ok = (1..=64).contains(&self.id.len())
            && self
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !id_ok {
            return Some(format!(
                "invalid --id '{}': use 1 to 64 letters, digits or '-'",
                self.id
            ));
        }
        None
    }
}

/// What the main thread waits for.
enum MainEvent {
    Started(RunningVm),
    Signal,
}

/// Runs Firecracker mode with `args` (program name first).
pub fn main(args: Vec<OsString>, process_start: Instant) -> ExitCode {
    let args = match FcArgs::try_parse_from(args) {
        Ok(args) => args,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_ARG_PARSING)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if args.version {
        println!(
            "Firecracker v{} (Kiln {})\n",
            kiln_api::FIRECRACKER_API_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return ExitCode::SUCCESS;
    }
    logger::init(log::LevelFilter::Info);
    if let Some(refusal) = args.refusal() {
        log::error!("{refusal}");
        return ExitCode::from(EXIT_ARG_PARSING);
    }
    match run(&args, process_start) {
        Ok(code) => code,
        Err((code, message)) => {
            log::error!("{message}");
            ExitCode::from(code)
        }
    }
}

fn run(args: &FcArgs, process_start: Instant) -> Result<ExitCode, (u8, String)> {
    let bad_config = |message: String| (EXIT_BAD_CONFIGURATION, message);
    let level = kiln_api::model::Logger {
        level: args.level.clone(),
        ..Default::default()
    }
    .level_filter()
    .map_err(bad_config)?;
    logger::configure_firecracker(&FirecrackerLog {
        instance_id: Some(&args.id),
        level,
        path: args.log_path.as_deref(),
        show_level: Some(args.show_level),
        show_origin: Some(args.show_log_origin),
        module: args.module.as_deref(),
    })
    .map_err(bad_config)?;
    log::info!(
        "Running Kiln {} with Firecracker's API {}",
        env!("CARGO_PKG_VERSION"),
        kiln_api::FIRECRACKER_API_VERSION
    );
    serve(args, process_start, None)
}

/// `kiln run --api-sock PATH`: the VM the CLI configured, started at once and served by the
/// Firecracker API on PATH (pause, resume, snapshots, metrics), with Kiln's own logging.
pub fn run_configured(config: VmConfig, api_sock: PathBuf, process_start: Instant) -> ExitCode {
    let args = FcArgs::parse_from([
        OsString::from("kiln fc"),
        "--api-sock".into(),
        api_sock.into(),
    ]);
    match serve(&args, process_start, Some(config)) {
        Ok(code) => code,
        Err((_, message)) => {
            log::error!("{message}");
            ExitCode::from(crate::EXIT_KILN_ERROR)
        }
    }
}

/// Serves the API (and `--config-file`, or the `preset` VM) until the microVM ends.
fn serve(
    args: &FcArgs,
    process_start: Instant,
    preset: Option<VmConfig>,
) -> Result<ExitCode, (u8, String)> {
    let bad_config = |message: String| (EXIT_BAD_CONFIGURATION, message);
    let (events, waiting) = channel();
    let started = Mutex::new(events.clone());
    let controller = Controller::new(
        args.id.clone(),
        Resources::new(ConsoleConfig::Stdio),
        Arc::new(ApiLogging),
        Box::new(move |running| {
            let _ = started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(MainEvent::Started(running));
        }),
    );
    let controller = Arc::new(Mutex::new(controller));
    let vm_handle: Arc<OnceLock<VmHandle>> = Arc::default();
    let signals = relay_signals(events, vm_handle.clone())
        .map_err(|err| (1, format!("cannot set up signal handling: {err}")))?;

    if let Some(path) = &args.metrics_path {
        lock(&controller)
            .execute(Action::PutMetrics(Metrics {
                metrics_path: path.to_string_lossy().into_owned(),
            }))
            .map_err(|err| bad_config(err.message))?;
    }
    let mut server = None;
    if !args.no_api {
        let listener = kiln_api::bind(&args.api_sock).map_err(|err| (1, err.to_string()))?;
        // Bound first (an unusable path starts nothing), then the VM, then the server: a client
        // that connects meanwhile waits in the backlog and sees the VM running.
        if let Some(config) = preset {
            if let Err(err) = lock(&controller).start_configured(config) {
                drop(listener);
                let _ = std::fs::remove_file(&args.api_sock);
                return Err(bad_config(err.message));
            }
        }
        let limits = ServerLimits {
            max_payload: args.http_api_max_payload_size,
            ..ServerLimits::default()
        };
        server = Some(
            ApiServer::start(listener, &args.api_sock, controller.clone(), limits)
                .map_err(|err| (1, format!("cannot start the API server thread: {err}")))?,
        );
        lock(&controller).set_startup_time(process_start.elapsed());
        log::info!("API socket ready at '{}'", args.api_sock.display());
    }
    if let Some(path) = &args.config_file {
        let text = std::fs::read_to_string(path).map_err(|err| {
            bad_config(format!(
                "cannot read --config-file '{}': {err}",
                path.display()
            ))
        })?;
        let config = ConfigFile::parse(&text).map_err(|err| {
            bad_config(format!("invalid --config-file '{}': {err}", path.display()))
        })?;
        config.apply(&mut lock(&controller)).map_err(|err| {
            bad_config(format!(
                "cannot start the microVM from --config-file '{}': {}",
                path.display(),
                err.message
            ))
        })?;
    }

    let running = match waiting.recv() {
        Ok(MainEvent::Started(running)) => running,
        Ok(MainEvent::Signal) | Err(_) => {
            let signum = signals.received().unwrap_or(libc::SIGTERM);
            log::info!("stopped by signal {signum} before the microVM started");
            drop(server);
            return Ok(ExitCode::from(128u8.saturating_add(signum as u8)));
        }
    };
    let handle = running.handle();
    let _ = vm_handle.set(handle.clone());
    // A signal that came in between the start and the line above.
    if waiting.try_recv().is_ok() {
        handle.stop();
    }
    let metrics_timer = periodic_metrics(&controller);
    let outcome = running.wait();
    drop(metrics_timer);
    if let Err(err) = lock(&controller).flush_metrics() {
        log::warn!("cannot write the final metrics: {err}");
    }
    drop(server);
    let code = match (signals.received(), outcome) {
        (Some(signum), _) => {
            log::info!("stopped by signal {signum}");
            ExitCode::from(128u8.saturating_add(signum as u8))
        }
        (None, Ok(outcome)) => {
            log::info!("the microVM ended: {outcome:?}");
            match outcome {
                VmOutcome::PowerOff | VmOutcome::Reset | VmOutcome::Stopped => ExitCode::SUCCESS,
                VmOutcome::Panic => ExitCode::from(crate::EXIT_GUEST_PANIC),
            }
        }
        (None, Err(err)) => return Err((1, err.to_string())),
    };
    Ok(code)
}

fn lock(controller: &Mutex<Controller>) -> std::sync::MutexGuard<'_, Controller> {
    controller.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGINT/SIGTERM/SIGHUP: before the start they end Kiln; afterwards they stop the VM (its
/// end then ends Kiln). A thread turns the async-signal-safe eventfd write into that.
fn relay_signals(
    events: Sender<MainEvent>,
    vm: Arc<OnceLock<VmHandle>>,
) -> std::io::Result<StopSignals> {
    // SAFETY: eventfd with valid flags; the new descriptor is owned by `file` right away.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    let signals = StopSignals::install(file.as_raw_fd())?;
    std::thread::Builder::new()
        .name("kiln-signals".into())
        .spawn(move || {
            let mut counter = [0u8; 8];
            while file.read_exact(&mut counter).is_ok() {
                let _ = events.send(MainEvent::Signal);
                // Checked after sending: the main thread drains the channel once it set this.
                if let Some(handle) = vm.get() {
                    handle.stop();
                }
            }
        })?;
    Ok(signals)
}

/// Writes metrics every 60 s until dropped.
fn periodic_metrics(controller: &Arc<Mutex<Controller>>) -> Option<Sender<()>> {
    if !lock(controller).has_metrics() {
        return None;
    }
    let (stop, stopped): (Sender<()>, Receiver<()>) = channel();
    let controller = controller.clone();
    let spawned = std::thread::Builder::new()
        .name("kiln-metrics".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(kiln_api::metrics::PERIOD)
            {
                if let Err(err) = lock(&controller).flush_metrics() {
                    log::warn!("cannot write metrics: {err}");
                }
            }
        });
    match spawned {
        Ok(_) => Some(stop),
        Err(err) => {
            log::warn!("no periodic metrics: cannot start their thread: {err}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn firecracker_mode_is_chosen_by_name_subcommand_or_first_flag() {
        let expect = |args: &[&str], rest: Option<&[&str]>| {
            let got = firecracker_arguments(&os(args));
            let want = rest.map(|rest| {
                let mut all = vec!["kiln fc"];
                all.extend_from_slice(rest);
                os(&all)
            });
            assert_eq!(got, want, "{args:?}");
        };
        expect(
            &["/usr/bin/firecracker", "--api-sock", "/s"],
            Some(&["--api-sock", "/s"]),
        );
        expect(&["firecracker"], Some(&[]));
        expect(&["kiln", "fc", "--id", "x"], Some(&["--id", "x"]));
        expect(&["kiln", "--api-sock", "/s"], Some(&["--api-sock", "/s"]));
        expect(&["kiln", "--api-sock=/s"], Some(&["--api-sock=/s"]));
        expect(
            &["kiln", "--no-api", "--config-file", "c"],
            Some(&["--no-api", "--config-file", "c"]),
        );
        expect(&["kiln", "run", "--kernel", "k"], None);
        expect(&["kiln", "--log-level", "debug", "run"], None);
        expect(&["kiln", "--version"], None);
        expect(&["kiln"], None);
    }

    #[test]
    fn firecrackers_flags_parse() {
        let args = FcArgs::try_parse_from([
            "kiln fc",
            "--api-sock",
            "/tmp/fc.sock",
            "--id",
            "vm-1",
            "--level",
            "Debug",
            "--log-path",
            "/tmp/fc.log",
            "--show-level",
            "--show-log-origin",
            "--boot-timer",
            "--metrics-path",
            "/tmp/m",
            "--http-api-max-payload-size",
            "1024",
            "--no-seccomp",
            "--start-time-us",
            "1",
        ])
        .unwrap();
        assert_eq!(args.api_sock, PathBuf::from("/tmp/fc.sock"));
        assert_eq!(args.id, "vm-1");
        assert!(args.show_level && args.show_log_origin && args.boot_timer);
        assert_eq!(args.http_api_max_payload_size, 1024);
        assert_eq!(args.refusal(), None);
        let defaults = FcArgs::try_parse_from(["kiln fc"]).unwrap();
        assert_eq!(defaults.api_sock, PathBuf::from("/run/firecracker.socket"));
        assert_eq!(defaults.id, "anonymous-instance");
    }

    #[test]
    fn flags_kiln_cannot_honour_are_refused_by_name() {
        let refusal = |args: &[&str]| {
            let mut all = vec!["kiln fc"];
            all.extend_from_slice(args);
            FcArgs::try_parse_from(all).unwrap().refusal()
        };
        assert!(refusal(&["--seccomp-filter", "/f"])
            .unwrap()
            .contains("--seccomp-filter"));
        assert!(refusal(&["--metadata", "/m.json"])
            .unwrap()
            .contains("MMDS"));
        assert!(refusal(&["--enable-pci"]).unwrap().contains("--enable-pci"));
        assert!(refusal(&["--snapshot-version"])
            .unwrap()
            .contains("snapshots"));
        assert!(refusal(&["--id", "has space"])
            .unwrap()
            .contains("invalid --id"));
        assert!(refusal(&["--id", &"x".repeat(65)]).is_some());
        let err = FcArgs::try_parse_from(["kiln fc", "--no-api"]).unwrap_err();
        assert!(err.to_string().contains("--config-file"), "{err}");
    }
}
