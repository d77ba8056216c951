//! `kiln run [options] -- CMD ARGS...`: run one command in a fresh microVM and exit with its
//! status.
//!
//! Kiln assembles an initramfs (`kiln-init` as `/init`, the command's spec, busybox, `--copy`
//! files), gives the guest a vsock device whose host ports are Kiln's own listeners (control,
//! stdout, stderr, stdin), and maps how things ended to an exit status (see [`Ending`]).

mod console;
mod cpio;
mod initramfs;
mod streams;

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use kiln_init::{CommandSpec, Report, RootDisk, GUEST_CID};
use kiln_vmm::config::{disk_name, VsockConfig};
use kiln_vmm::terminal::RawTerminal;
use kiln_vmm::{ConsoleConfig, Vm, VmConfig, VmOutcome};

pub use initramfs::CopySpec;

use crate::signals::StopSignals;

/// Exit status when the guest kernel panicked before the command's status came back.
pub const EXIT_GUEST_PANIC: u8 = 122;
/// Exit status when the guest ended (powered off, rebooted) without reporting a status.
pub const EXIT_NO_REPORT: u8 = 123;
/// Exit status when `--timeout` expired (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;
/// Exit status for Kiln's own errors and usage errors in command mode (as timeout(1), docker).
pub const EXIT_KILN_ERROR: u8 = 125;

/// The command-mode options of `kiln run`.
#[derive(Args, Debug, Default)]
pub struct CommandArgs {
    /// With a command: copy a host file or directory into the guest at an absolute path
    /// (repeatable).
    #[arg(long = "copy", value_name = "HOST:GUEST")]
    pub copies: Vec<CopySpec>,
    /// With a command: set an environment variable for it (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_arg)]
    pub env: Vec<OsString>,
    /// With a command: its working directory in the guest [default: /].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// With a command: stop the guest after this long and exit 124 (seconds, or with an s, m
    /// or h suffix).
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout_arg)]
    pub timeout: Option<Duration>,
    /// With a command: show the guest kernel's log on stderr.
    #[arg(long)]
    pub verbose: bool,
    /// With a command: run it on a pseudo-terminal even when Kiln's stdin or stdout is not a
    /// terminal (with both on a terminal it gets one anyway).
    #[arg(long)]
    pub tty: bool,
    /// The command to run in the guest, after `--`: `kiln run -- uname -a`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl CommandArgs {
    /// A command was given.
    pub fn is_command(&self) -> bool {
        !self.command.is_empty()
    }

    /// The first command-mode option given without a command, if any.
    pub fn stray_option(&self) -> Option<&'static str> {
        if !self.copies.is_empty() {
            Some("--copy")
        } else if !self.env.is_empty() {
            Some("--env")
        } else if self.workdir.is_some() {
            Some("--workdir")
        } else if self.timeout.is_some() {
            Some("--timeout")
        } else if self.verbose {
            Some("--verbose")
        } else if self.tty {
            Some("--tty")
        } else {
            None
        }
    }
}

fn parse_env_arg(text: &str) -> Result<OsString, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() && !key.contains('\0') => Ok(OsString::from(text)),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

fn parse_timeout_arg(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration (seconds, or a number with s, m or h)");
    let (digits, unit) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => (&text[..at], unit),
        _ => (text, 's'),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let seconds = match unit {
        's' => Some(number),
        'm' => number.checked_mul(60),
        'h' => number.checked_mul(3600),
        _ => None,
    }
    .ok_or_else(bad)?;
    if seconds == 0 {
        return Err(format!("'{text}': the timeout must be at least 1 second"));
    }
    Ok(Duration::from_secs(seconds))
}

/// What went wrong before the command could run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The options do not make sense together.
    #[error("{0}")]
    Usage(String),
    /// No `--kernel` and no cached default kernel.
    #[error("no --kernel given and no guest kernel built in {0}: build it with `resources/build-kernel` (in Kiln's source tree), or pass --kernel")]
    NoKernel(PathBuf),
    /// A `--copy` source cannot be read.
    #[error("--copy {0}: {1}")]
    Copy(PathBuf, String),
    /// The initramfs could not be assembled.
    #[error("cannot assemble the initramfs: {0}")]
    Initramfs(String),
    /// A host-side file or socket could not be set up.
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    /// The VM could not be built or run.
    #[error(transparent)]
    Vm(#[from] kiln_vmm::Error),
}

/// How a command run ended, in the order the cases are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The init reported the command's end.
    Reported(Report),
    /// Kiln got a stop signal first.
    Signal(i32),
    /// `--timeout` expired.
    TimedOut(Duration),
    /// The guest kernel panicked.
    Panic,
    /// The guest ended some other way without a report.
    NoReport(VmOutcome),
}

/// The exit status for an ending.
pub fn exit_status(ending: &Ending) -> u8 {
    match ending {
        Ending::Reported(Report::Exited(code)) => *code,
        Ending::Reported(Report::Signaled(signal)) => 128u8.saturating_add(*signal),
        Ending::Reported(Report::SetupFailed(_)) => EXIT_KILN_ERROR,
        Ending::Signal(signal) => 128u8.saturating_add(*signal as u8),
        Ending::TimedOut(_) => EXIT_TIMEOUT,
        Ending::Panic => EXIT_GUEST_PANIC,
        Ending::NoReport(_) => EXIT_NO_REPORT,
    }
}

/// Runs the command; every failure is logged and becomes its documented status. A guest that
/// ended without a status also shows the last lines of its console.
pub fn main(config: VmConfig, args: CommandArgs, start: Instant) -> ExitCode {
    let runtime_dir = match RuntimeDir::create() {
        Ok(dir) => dir,
        Err(err) => {
            log::error!("{err}");
            return ExitCode::from(EXIT_KILN_ERROR);
        }
    };
    let result = run(config, args, &runtime_dir.0, start);
    drop(runtime_dir);
    match result {
        Ok((ending, console_tail)) => {
            match &ending {
                Ending::Reported(Report::SetupFailed(why)) => {
                    log::error!("the guest could not start the command: {why}")
                }
                Ending::TimedOut(limit) => {
                    log::error!(
                        "timed out after {} s; the guest was stopped",
                        limit.as_secs()
                    )
                }
                Ending::Panic => log::error!("the guest kernel panicked"),
                Ending::NoReport(outcome) => log::error!(
                    "the guest ended ({outcome:?}) without reporting the command's status"
                ),
                Ending::Reported(_) | Ending::Signal(_) => {}
            }
            if !console_tail.is_empty() {
                log::error!(
                    "the last lines of the guest's console (--verbose shows all of it):\n{}",
                    console_tail.trim_end()
                );
            }
            ExitCode::from(exit_status(&ending))
        }
        Err(err) => {
            log::error!("{err}");
            ExitCode::from(EXIT_KILN_ERROR)
        }
    }
}

fn run(
    mut config: VmConfig,
    args: CommandArgs,
    runtime_dir: &Path,
    start: Instant,
) -> Result<(Ending, String), RunError> {
    if config.initrd.is_some() {
        return Err(RunError::Usage(
            "--initrd cannot be used with a command: Kiln assembles the initramfs itself".into(),
        ));
    }
    if config.vsock.is_some() {
        return Err(RunError::Usage(
            "--vsock cannot be used with a command: Kiln uses the vsock device for its streams"
                .into(),
        ));
    }
    if config.console == ConsoleConfig::Stdio {
        return Err(RunError::Usage(
            "--console stdio cannot be used with a command (stdout is the command's); use \
             --verbose to see the kernel log on stderr, or --console file=PATH"
                .into(),
        ));
    }
    if config.kernel.as_os_str().is_empty() {
        config.kernel = default_kernel()?;
    }
    let terminal = if args.tty || (is_terminal(0) && is_terminal(1)) {
        Some(terminal_size())
    } else {
        None
    };
    let forward_stdin = terminal.is_some() || stdin_is_forwardable();
    let mut spec = command_spec(&config, &args, forward_stdin)?;
    if terminal.is_some() {
        let term = std::env::var_os("TERM").unwrap_or_else(|| "xterm".into());
        let mut entry = OsString::from("TERM=");
        entry.push(term);
        spec.env.insert(0, entry);
        spec.tty = terminal;
    }
    let initramfs = initramfs::build(&spec, &args.copies)?;
    log::debug!(
        "initramfs: {} bytes, busybox: {:?}, ready {:.1} ms after start",
        initramfs.length,
        initramfs.busybox,
        start.elapsed().as_secs_f64() * 1000.0
    );
    let without_busybox = spec.root.is_none() && initramfs.busybox.is_none();
    config.initrd = Some(initramfs.path());
    let uds = runtime_dir.join("v.sock");
    config.vsock = Some(VsockConfig {
        cid: u64::from(GUEST_CID),
        uds: uds.clone(),
    });
    let mut console_tail = None;
    if args.verbose {
        config.console = ConsoleConfig::File(console::relay_to_stderr()?);
    } else {
        if config.console == ConsoleConfig::None {
            let (tail, path) = console::ConsoleTail::start()?;
            config.console = ConsoleConfig::File(path);
            console_tail = Some(tail);
        }
        // The kernel's console is a UART: every byte costs a VM exit.
        let user = config.cmdline.take().unwrap_or_default();
        config.cmdline = Some(format!("quiet {user}").trim().to_string());
    }
    let listeners = streams::Listeners::bind(&uds, forward_stdin)
        .map_err(|err| RunError::Io("binding the stream sockets", err))?;

    let mut vm = Vm::new(config, start)?;
    drop(initramfs);
    log::debug!(
        "VM built {:.1} ms after start",
        start.elapsed().as_secs_f64() * 1000.0
    );
    vm.skip_teardown();
    let report: streams::ReportSlot = Arc::new(Mutex::new(None));
    listeners
        .serve(vm.handle(), report.clone())
        .map_err(|err| RunError::Io("starting the stream threads", err))?;
    let timed_out = Arc::new(AtomicBool::new(false));
    if let Some(limit) = args.timeout {
        let (handle, flag) = (vm.handle(), timed_out.clone());
        std::thread::Builder::new()
            .name("kiln-timeout".into())
            .spawn(move || {
                std::thread::sleep(limit.saturating_sub(start.elapsed()));
                flag.store(true, Ordering::SeqCst);
                handle.stop();
            })
            .map_err(|err| RunError::Io("starting the timeout thread", err))?;
    }
    let signals = StopSignals::install(vm.handle().stop_fd())
        .map_err(|err| RunError::Io("installing signal handlers", err))?;
    // An interactive session: every key, Ctrl-C included, goes to the command's terminal.
    let raw_terminal = if terminal.is_some() && is_terminal(0) {
        RawTerminal::enable(0).unwrap_or_else(|err| {
            log::warn!("cannot switch the terminal to raw mode: {err}");
            None
        })
    } else {
        None
    };
    let outcome = vm.run()?;
    drop(raw_terminal);
    log::debug!(
        "VM ended {:.1} ms after start",
        start.elapsed().as_secs_f64() * 1000.0
    );
    let reported = report
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .take();
    if without_busybox && reported == Some(Report::Exited(127)) {
        log::warn!(
            "this host has no static busybox, so the guest has only kiln-init and the --copy \
             files: install busybox-static, or --copy the program in"
        );
    }
    let ending = match (reported, signals.received()) {
        (Some(report), _) => Ending::Reported(report),
        (None, Some(signal)) => Ending::Signal(signal),
        (None, None) if timed_out.load(Ordering::SeqCst) => {
            Ending::TimedOut(args.timeout.unwrap_or_default())
        }
        (None, None) if outcome == VmOutcome::Panic => Ending::Panic,
        (None, None) => Ending::NoReport(outcome),
    };
    let console_tail = match ending {
        Ending::TimedOut(_) | Ending::Panic | Ending::NoReport(_) => console_tail
            .map(|tail| tail.last_lines())
            .unwrap_or_default(),
        _ => String::new(),
    };
    Ok((ending, console_tail))
}

/// The spec the init gets: the command, its environment and directory, the root disk.
fn command_spec(
    config: &VmConfig,
    args: &CommandArgs,
    forward_stdin: bool,
) -> Result<CommandSpec, RunError> {
    let root = match config.disks.iter().position(|disk| disk.root) {
        Some(index) if config.disks[index].partuuid.is_some() => {
            return Err(RunError::Usage(
                "a root disk with partuuid= cannot be used with a command; give the whole disk"
                    .into(),
            ))
        }
        Some(index) => Some(RootDisk {
            device: format!("/dev/{}", disk_name(index)),
            readonly: config.disks[index].readonly,
        }),
        None => None,
    };
    if args.command[0].is_empty() {
        return Err(RunError::Usage("the command is an empty string".into()));
    }
    for (what, value) in args
        .command
        .iter()
        .map(|arg| ("argument", arg.as_bytes()))
        .chain(args.env.iter().map(|entry| ("--env", entry.as_bytes())))
    {
        if value.contains(&0) {
            return Err(RunError::Usage(format!(
                "a command {what} contains a NUL byte"
            )));
        }
    }
    Ok(CommandSpec {
        argv: args.command.clone(),
        env: args.env.clone(),
        workdir: args.workdir.clone().map(PathBuf::into_os_string),
        root,
        stdin: forward_stdin,
        tty: None,
        // A `user` NIC has passt's DHCP server behind it; a TAP's network is the user's own.
        dhcp: config
            .nets
            .iter()
            .enumerate()
            .filter(|(_, net)| net.user)
            .map(|(index, _)| format!("eth{index}"))
            .collect(),
    })
}

fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty(3) on a descriptor number; no memory is passed.
    unsafe { libc::isatty(fd) == 1 }
}

/// The size of Kiln's terminal (rows, columns), or 24×80.
fn terminal_size() -> (u16, u16) {
    for fd in [1, 0, 2] {
        // SAFETY: winsize is plain data; TIOCGWINSZ fills the live buffer or fails.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_row > 0 {
            return (size.ws_row, size.ws_col);
        }
    }
    (24, 80)
}

/// Kiln's stdin goes to the command when it is a pipe, a file or a socket; a terminal (or
/// nothing) leaves the command's stdin at `/dev/null`.
fn stdin_is_forwardable() -> bool {
    if is_terminal(0) {
        return false;
    }
    // SAFETY: fstat(2) into a zeroed stat buffer owned by this frame.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(0, &mut stat) } != 0 {
        return false;
    }
    matches!(
        stat.st_mode & libc::S_IFMT,
        libc::S_IFIFO | libc::S_IFREG | libc::S_IFSOCK
    )
}

/// Kiln's resource cache, as resources/lib.sh computes it.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KILN_CACHE_DIR").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        return Some(PathBuf::from(dir).join("kiln"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/kiln"))
}

/// The newest `kernel-<key>/vmlinux` that resources/build-kernel left in the cache.
fn default_kernel() -> Result<PathBuf, RunError> {
    let dir = cache_dir().ok_or_else(|| RunError::NoKernel(PathBuf::from("~/.cache/kiln")))?;
    newest_kernel_in(&dir).ok_or(RunError::NoKernel(dir))
}

fn newest_kernel_in(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().as_bytes().starts_with(b"kernel-"))
        .map(|entry| entry.path().join("vmlinux"))
        .filter_map(|vmlinux| {
            let modified = std::fs::metadata(&vmlinux).ok()?.modified().ok()?;
            Some((modified, vmlinux))
        })
        .max()
        .map(|(_, vmlinux)| vmlinux)
}

/// A private directory for the vsock sockets, removed when dropped.
struct RuntimeDir(PathBuf);

impl RuntimeDir {
    fn create() -> Result<Self, RunError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|dir| dir.is_dir() && dir.as_os_str().len() < 60)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("kiln-run-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|err| RunError::Io("creating the runtime directory", err))?;
        Ok(Self(dir))
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_take_units() {
        assert_eq!(parse_timeout_arg("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout_arg("7s"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_timeout_arg("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout_arg("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "", "x", "5d", "-1", "1.5"] {
            assert!(parse_timeout_arg(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_entries_need_a_key() {
        assert_eq!(parse_env_arg("A=b=c"), Ok(OsString::from("A=b=c")));
        assert_eq!(parse_env_arg("EMPTY="), Ok(OsString::from("EMPTY=")));
        assert!(parse_env_arg("=x").is_err());
        assert!(parse_env_arg("NOVALUE").is_err());
    }

    #[test]
    fn endings_map_to_distinct_documented_statuses() {
        let status = |ending: Ending| exit_status(&ending);
        assert_eq!(status(Ending::Reported(Report::Exited(0))), 0);
        assert_eq!(status(Ending::Reported(Report::Exited(7))), 7);
        assert_eq!(status(Ending::Reported(Report::Signaled(9))), 137);
        assert_eq!(
            status(Ending::Reported(Report::SetupFailed("x".into()))),
            125
        );
        assert_eq!(status(Ending::Signal(2)), 130);
        assert_eq!(status(Ending::TimedOut(Duration::from_secs(5))), 124);
        assert_eq!(status(Ending::Panic), 122);
        assert_eq!(status(Ending::NoReport(VmOutcome::PowerOff)), 123);
    }

    #[test]
    fn the_newest_cached_kernel_is_the_default() {
        let dir = std::env::temp_dir().join(format!("kiln-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(newest_kernel_in(&dir), None);
        for key in ["kernel-old", "kernel-new", "initramfs-x"] {
            std::fs::create_dir_all(dir.join(key)).unwrap();
            std::fs::write(dir.join(key).join("vmlinux"), key).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::create_dir_all(dir.join("kernel-empty")).unwrap();
        assert_eq!(newest_kernel_in(&dir), Some(dir.join("kernel-new/vmlinux")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_disks_become_the_specs_root() {
        let mut config = VmConfig::new("/k");
        config.disks = vec![
            kiln_vmm::config::DiskConfig::new("/a.img"),
            "path=/b.img,root,readonly".parse().unwrap(),
        ];
        let args = CommandArgs {
            command: vec!["true".into()],
            workdir: Some("/w".into()),
            ..CommandArgs::default()
        };
        let spec = command_spec(&config, &args, false).unwrap();
        assert_eq!(
            spec.root,
            Some(RootDisk {
                device: "/dev/vdb".into(),
                readonly: true
            })
        );
        assert_eq!(spec.workdir, Some(OsString::from("/w")));
        let empty = CommandArgs {
            command: vec!["".into()],
            ..CommandArgs::default()
        };
        assert!(command_spec(&config, &empty, false).is_err());
    }
}
