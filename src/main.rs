//! `kiln`: the command line over the kiln-vmm library.
//!
//! It only turns arguments into a `VmConfig` and the VM's outcome into an exit status.

mod firecracker;
mod logger;
mod restore_command;
mod run_command;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use kiln_vmm::config::{
    parse_memory_mib, ConfigError, DiskConfig, HugePages, NetConfig, RngConfig, VsockConfig,
};
use kiln_vmm::image::{create_overlay, DiskFormat, OverlayOptions};
use kiln_vmm::{ConsoleConfig, Vm, VmConfig, VmOutcome};
use signals::StopSignals;

/// Exit status when the guest kernel panicked.
pub(crate) const EXIT_GUEST_PANIC: u8 = 3;
/// Exit status for Kiln's own errors (bad config, KVM problems, vCPU failures).
const EXIT_KILN_ERROR: u8 = 1;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a KVM microVM monitor")]
struct Cli {
    /// Log level for Kiln's own messages on stderr: error, warn, info, debug, trace
    /// [default: info; warn when running a command].
    #[arg(long, global = true, env = "KILN_LOG", value_parser = parse_log_level)]
    log_level: Option<log::LevelFilter>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest and run it until it powers off, reboots or panics; or, with
    /// `-- CMD ARGS...`, run that command in a fresh guest and exit with its status.
    ///
    /// Exit status: 0 when the guest powers off or reboots, 3 when its kernel panics,
    /// 1 for Kiln errors, 2 for usage errors, 128+N when stopped by signal N.
    /// With a command: the command's own status (126/127 when it cannot be run, 128+N when
    /// signal N killed it), 122 guest kernel panic, 123 guest ended without reporting,
    /// 124 --timeout expired, 125 Kiln or usage error, 128+N when Kiln was stopped by signal N.
    Run(Box<RunArgs>),
    /// Firecracker's command line and REST API: `kiln fc --api-sock PATH` (also `kiln
    /// --api-sock PATH`, or Kiln started as `firecracker`). See `kiln fc --help`.
    #[command(disable_help_flag = true)]
    Fc {
        /// Firecracker's flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Restore a snapshot (a state file and its memory file) and run the guest on from there.
    ///
    /// The snapshot's disks are reopened by path and must be unchanged since it was taken;
    /// `--disk N=PATH` uses another image for disk N (from 1), e.g. a copy for a clone.
    /// Exit status as for `run`.
    Restore(restore_command::RestoreArgs),
    /// Disk image tools.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Create a qcow2 image: a copy-on-write overlay over a base image (which is never
    /// written), or an empty image of --size.
    Create(CreateArgs),
}

#[derive(Args)]
struct CreateArgs {
    /// The base image, recorded as given: an absolute path, or one relative to the new
    /// image's directory (as `qemu-img create -b` records it).
    #[arg(long, short = 'b')]
    backing: Option<PathBuf>,
    /// The base image's format, raw or qcow2 [default: detected; a qcow2 base that has a
    /// backing file of its own needs it given].
    #[arg(long = "backing-format", short = 'F', value_parser = parse_format_arg)]
    backing_format: Option<DiskFormat>,
    /// Virtual size in bytes, or with a K, M, G or T suffix [default: the base image's].
    #[arg(long, value_parser = parse_size_arg)]
    size: Option<u64>,
    /// Cluster size: a power of two from 512 to 2M [default: 64K].
    #[arg(long = "cluster-size", value_parser = parse_cluster_size_arg)]
    cluster_bits: Option<u32>,
    /// The new image; an existing file is never overwritten.
    image: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Guest kernel: an ELF vmlinux or a bzImage [with a command, default: the newest one
    /// resources/build-kernel left in Kiln's cache].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs to load.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended to Kiln's defaults.
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs [default: 1].
    #[arg(long)]
    cpus: Option<u8>,
    /// Guest memory, e.g. 512M or 2G (a bare number is MiB) [default: 512M].
    #[arg(long, value_parser = parse_memory_arg)]
    memory: Option<u32>,
    /// Serial console: stdio, none, or file=PATH [default: stdio].
    #[arg(long)]
    console: Option<ConsoleConfig>,
    /// A disk image, attached as a virtio-blk disk (repeat for more: vda, vdb, ...).
    /// `format`: raw or qcow2 (detected when not given; a detected qcow2 image must not name
    /// a backing file); `readonly`: the guest cannot write; `root`: boot from it (adds
    /// root=/dev/vdX); `id=ID`: serial number (at most 20 bytes); `partuuid=UUID`: with
    /// `root`, boot from that partition (root=PARTUUID=UUID). Replaces the config file's disks.
    #[arg(long = "disk", value_name = "path=IMG[,format=raw|qcow2][,readonly][,root][,id=ID][,partuuid=UUID]", value_parser = parse_disk_arg)]
    disks: Vec<DiskConfig>,
    /// Page size behind guest RAM: none (4 KiB pages), transparent (transparent huge pages
    /// above the first 2 MiB) or 2M (hugetlbfs pages from the host's pool) [default: transparent].
    #[arg(long, value_parser = parse_huge_pages_arg)]
    huge_pages: Option<HugePages>,
    /// A vsock device: guest context ID N; host clients connect to the Unix socket PATH and
    /// write `CONNECT <port>\n` (Firecracker's convention); guest connections to host port P
    /// go to `PATH_P`.
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = parse_vsock_arg)]
    vsock: Option<VsockConfig>,
    /// The entropy device (virtio-rng, on by default): `on`, `off`, or `rate=BYTES/s` to
    /// limit how fast the guest drains the host's random pool (K and M suffixes allowed).
    #[arg(long, value_name = "on|off|rate=BYTES/s", num_args = 0..=1, default_missing_value = "on", value_parser = parse_rng_arg)]
    rng: Option<RngConfig>,
    /// A NIC (virtio-net; repeat for more: eth0, eth1, ...). `tap=NAME`: the TAP interface
    /// NAME (host-only or bridged networking; created if Kiln has CAP_NET_ADMIN);
    /// `tap-fd=N`: an open TAP descriptor Kiln inherited; `user`: NAT without privileges
    /// through passt, with `hostfwd=tcp:[ADDR]:HOSTPORT-:GUESTPORT` forwarding a host port to
    /// the guest (repeatable). `mac=MAC` sets the address [default: a stable one derived from
    /// the config]. Replaces the config file's NICs.
    #[arg(long = "net", value_name = "tap=NAME|tap-fd=N|user[,hostfwd=...][,mac=MAC]", value_parser = parse_net_arg)]
    nets: Vec<NetConfig>,
    /// JSON VM config; flags given on the command line override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also serve Firecracker's REST API on this Unix socket for the running VM: pause and
    /// resume (`PATCH /vm`), snapshots (`PUT /snapshot/create`), metrics. For what the API
    /// alone cannot configure, e.g. a `--net user` guest to snapshot and clone.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    #[command(flatten)]
    command_args: run_command::CommandArgs,
}

fn parse_log_level(text: &str) -> Result<log::LevelFilter, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not one of off, error, warn, info, debug, trace"))
}

fn parse_memory_arg(text: &str) -> Result<u32, String> {
    parse_memory_mib(text).map_err(|err| err.to_string())
}

fn parse_huge_pages_arg(text: &str) -> Result<HugePages, String> {
    text.parse().map_err(|err: ConfigError| err.to_string())
}

fn parse_format_arg(text: &str) -> Result<DiskFormat, String> {
    text.parse()
}

/// Bytes, or a number with a binary K, M, G or T suffix.
fn parse_size_arg(text: &str) -> Result<u64, String> {
    let bad = || format!("'{text}' is not a size (bytes, or a number with K, M, G or T)");
    let (digits, shift) = match text.char_indices().last() {
        Some((at, unit)) if unit.is_ascii_alphabetic() => {
            let shift = match unit.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&text[..at], shift)
        }
        _ => (text, 0),
    };
    let number: u64 = digits.parse().map_err(|_| bad())?;
    number.checked_mul(1 << shift).ok_or_else(bad)
}

/// log2 of a cluster size given as a size.
fn parse_cluster_size_arg(text: &str) -> Result<u32, String> {
    let size = parse_size_arg(text)?;
    if !size.is_power_of_two() || !(512..=2 << 20).contains(&size) {
        return Err(format!("'{text}' is not a power of two from 512 to 2M"));
    }
    Ok(size.trailing_zeros())
}

fn image_create(args: CreateArgs) -> ExitCode {
    let options = OverlayOptions {
        backing: args.backing.clone(),
        backing_format: args.backing_format,
        size: args.size,
        cluster_bits: args.cluster_bits,
    };
    match create_overlay(&args.image, &options) {
        Ok(size) => {
            match &args.backing {
                Some(backing) => println!(
                    "created {} ({size} bytes, over {})",
                    args.image.display(),
                    backing.display()
                ),
                None => println!("created {} ({size} bytes)", args.image.display()),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            log::error!("cannot create {}: {err}", args.image.display());
            ExitCode::from(EXIT_KILN_ERROR)
        }
    }
}

fn parse_disk_arg(text: &str) -> Result<DiskConfig, String> {
    text.parse().map_err(|err| match err {
        ConfigError::InvalidDiskSpec { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_vsock_arg(text: &str) -> Result<VsockConfig, String> {
    text.parse().map_err(|err| match err {
        ConfigError::InvalidVsockSpec { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_net_arg(text: &str) -> Result<NetConfig, String> {
    text.parse().map_err(|err| match err {
        ConfigError::InvalidNetSpec { reason, .. } => reason,
        other => other.to_string(),
    })
}

fn parse_rng_arg(text: &str) -> Result<RngConfig, String> {
    text.parse().map_err(|err| match err {
        ConfigError::InvalidRngSpec { reason, .. } => reason,
        other => other.to_string(),
    })
}

impl RunArgs {
    fn into_config(self) -> Result<VmConfig, kiln_vmm::Error> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_json_file(path)?,
            None => VmConfig::new(PathBuf::new()),
        };
        if let Some(kernel) = self.kernel {
            config.kernel = kernel;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd;
        }
        if self.cmdline.is_some() {
            config.cmdline = self.cmdline;
        }
        if let Some(cpus) = self.cpus {
            config.cpus = cpus;
        }
        if let Some(memory) = self.memory {
            config.memory_mib = memory;
        }
        if let Some(console) = self.console {
            config.console = console;
        }
        if !self.disks.is_empty() {
            config.disks = self.disks;
        }
        if let Some(huge_pages) = self.huge_pages {
            config.huge_pages = huge_pages;
        }
        if self.vsock.is_some() {
            config.vsock = self.vsock;
        }
        if let Some(rng) = self.rng {
            config.rng = rng;
        }
        if !self.nets.is_empty() {
            config.nets = self.nets;
        }
        Ok(config)
    }
}

/// How `kiln run` ended: the guest's own way, or a stop signal Kiln received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunEnd {
    Guest(VmOutcome),
    Signal(i32),
}

fn exit_status(end: RunEnd) -> ExitCode {
    match end {
        // The CLI never hands out a stop handle; a stop through one is still a clean end.
        RunEnd::Guest(VmOutcome::PowerOff | VmOutcome::Reset | VmOutcome::Stopped) => {
            ExitCode::SUCCESS
        }
        RunEnd::Guest(VmOutcome::Panic) => ExitCode::from(EXIT_GUEST_PANIC),
        RunEnd::Signal(signum) => ExitCode::from(128u8.saturating_add(signum as u8)),
    }
}

fn run(args: RunArgs, start: Instant) -> Result<RunEnd, kiln_vmm::Error> {
    let config = args.into_config()?;
    run_to_end(Vm::new(config, start)?)
}

/// Runs a built VM with SIGINT/SIGTERM/SIGHUP mapped to a stop; the process exits right after.
fn run_to_end(mut vm: Vm) -> Result<RunEnd, kiln_vmm::Error> {
    vm.skip_teardown();
    let signals = StopSignals::install(vm.handle().stop_fd())
        .map_err(|e| kiln_vmm::Error::Io("install signal handlers", e))?;
    let outcome = vm.run()?;
    let end = match signals.received() {
        Some(signum) => RunEnd::Signal(signum),
        None => RunEnd::Guest(outcome),
    };
    log::info!("guest ended: {}", describe(end));
    Ok(end)
}

fn describe(end: RunEnd) -> String {
    match end {
        RunEnd::Guest(VmOutcome::PowerOff) => "powered off".into(),
        RunEnd::Guest(VmOutcome::Reset) => "rebooted".into(),
        RunEnd::Guest(VmOutcome::Panic) => "kernel panic".into(),
        RunEnd::Guest(VmOutcome::Stopped) => "stopped on request".into(),
        RunEnd::Signal(signum) => format!("stopped by signal {signum}"),
    }
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(firecracker_args) = firecracker::firecracker_arguments(&args) {
        return firecracker::main(firecracker_args, start);
    }
    // `--` means a command: its usage errors get command mode's status, not one a command
    // could return as well.
    let command_mode = args.iter().skip(1).any(|arg| arg == "--");
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(err) if command_mode && err.use_stderr() => {
            let _ = err.print();
            return ExitCode::from(run_command::EXIT_KILN_ERROR);
        }
        Err(err) => err.exit(),
    };
    let default_level = if command_mode {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Info
    };
    logger::init(cli.log_level.unwrap_or(default_level));
    match cli.command {
        // Chosen before clap parses; kept here so that `kiln --help` lists it.
        Command::Fc { args } => firecracker::main(
            std::iter::once("kiln fc".into()).chain(args).collect(),
            start,
        ),
        Command::Run(args) if command_mode => run_command_mode(*args, start),
        Command::Run(args) => match args.command_args.stray_option() {
            Some(option) => {
                log::error!("{option} needs a command: kiln run [OPTIONS] -- CMD ARGS...");
                ExitCode::from(2)
            }
            None => match args.api_sock.clone() {
                Some(api_sock) => match args.into_config() {
                    Ok(config) => firecracker::run_configured(config, api_sock, start),
                    Err(err) => finish(Err(err)),
                },
                None => finish(run(*args, start)),
            },
        },
        Command::Restore(args) => finish(restore_command::restore(args, start)),
        Command::Image(ImageCommand::Create(args)) => image_create(args),
    }
}

/// `kiln run [OPTIONS] -- CMD ARGS...`.
fn run_command_mode(mut args: RunArgs, start: Instant) -> ExitCode {
    let command_args = std::mem::take(&mut args.command_args);
    if !command_args.is_command() {
        log::error!("no command after --: kiln run [OPTIONS] -- CMD ARGS...");
        return ExitCode::from(run_command::EXIT_KILN_ERROR);
    }
    if args.api_sock.is_some() {
        log::error!("--api-sock cannot be used with a command");
        return ExitCode::from(run_command::EXIT_KILN_ERROR);
    }
    if args.console.is_none() {
        args.console = Some(ConsoleConfig::None);
    }
    match args.into_config() {
        Ok(config) => run_command::main(config, command_args, start),
        Err(err) => {
            log::error!("{err}");
            ExitCode::from(run_command::EXIT_KILN_ERROR)
        }
    }
}

fn finish(result: Result<RunEnd, kiln_vmm::Error>) -> ExitCode {
    match result {
        Ok(end) => exit_status(end),
        Err(err) => {
            log::error!("{err}");
            ExitCode::from(EXIT_KILN_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(args).expect("valid arguments").command {
            Command::Run(run) => *run,
            Command::Fc { .. } | Command::Restore(_) | Command::Image(_) => {
                panic!("not a run command")
            }
        }
    }

    #[test]
    fn a_command_after_double_dash_takes_its_options() {
        let args = run_args(&[
            "run",
            "--memory",
            "256M",
            "--copy",
            "./src:/src",
            "--env",
            "A=1",
            "--workdir",
            "/src",
            "--timeout",
            "2m",
            "--",
            "sh",
            "-c",
            "make --keep-going",
        ]);
        let command = &args.command_args;
        assert!(command.is_command());
        assert_eq!(command.command, ["sh", "-c", "make --keep-going"]);
        assert_eq!(command.copies[0].guest, "/src");
        assert_eq!(command.env, ["A=1"]);
        assert_eq!(command.workdir, Some(PathBuf::from("/src")));
        assert_eq!(command.timeout, Some(std::time::Duration::from_secs(120)));
        assert_eq!(args.memory, Some(256));
        let boot = run_args(&["run", "--kernel", "/k"]);
        assert!(!boot.command_args.is_command());
        assert_eq!(boot.command_args.stray_option(), None);
        let stray = run_args(&["run", "--kernel", "/k", "--env", "A=1"]);
        assert_eq!(stray.command_args.stray_option(), Some("--env"));
        assert!(parse(&["run", "--env", "novalue", "--", "true"]).is_err());
    }

    #[test]
    fn flags_become_a_config() {
        let config = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "quiet",
            "--cpus",
            "4",
            "--memory",
            "1G",
            "--console",
            "none",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.kernel, PathBuf::from("/k"));
        assert_eq!(config.initrd, Some(PathBuf::from("/i")));
        assert_eq!(config.cmdline.as_deref(), Some("quiet"));
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory_mib, 1024);
        assert_eq!(config.console, ConsoleConfig::None);
    }

    #[test]
    fn defaults_apply() {
        let config = run_args(&["run", "--kernel", "/k"]).into_config().unwrap();
        assert_eq!(config, VmConfig::new("/k"));
    }

    #[test]
    fn flags_override_the_config_file() {
        let path = std::env::temp_dir().join(format!("kiln-cli-{}.json", std::process::id()));
        std::fs::write(
            &path,
            r#"{"kernel": "/from-file", "cpus": 2, "memory_mib": 256}"#,
        )
        .unwrap();
        let config = run_args(&["run", "--config", path.to_str().unwrap(), "--cpus", "3"])
            .into_config()
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.kernel, PathBuf::from("/from-file"));
        assert_eq!(config.cpus, 3);
        assert_eq!(config.memory_mib, 256);
    }

    #[test]
    fn disks_are_repeatable_and_replace_the_config_files() {
        let config = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--disk",
            "path=/root.img,root",
            "--disk",
            "path=/data.img,readonly,id=data",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.disks.len(), 2);
        assert_eq!(config.disks[0].path, PathBuf::from("/root.img"));
        assert!(config.disks[0].root && !config.disks[0].readonly);
        assert!(config.disks[1].readonly);
        assert_eq!(config.disks[1].id.as_deref(), Some("data"));

        let path = std::env::temp_dir().join(format!("kiln-cli-disks-{}.json", std::process::id()));
        std::fs::write(&path, r#"{"kernel": "/k", "disks": [{"path": "/a.img"}]}"#).unwrap();
        let from_file = run_args(&["run", "--config", path.to_str().unwrap()])
            .into_config()
            .unwrap();
        let overridden = run_args(&[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--disk",
            "/b.img",
        ])
        .into_config()
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(from_file.disks, vec![DiskConfig::new("/a.img")]);
        assert_eq!(overridden.disks, vec![DiskConfig::new("/b.img")]);
    }

    #[test]
    fn vsock_and_rng_flags_become_a_config() {
        let config = run_args(&[
            "run",
            "--kernel",
            "/k",
            "--vsock",
            "cid=7,uds=/run/v.sock",
            "--rng",
            "rate=4K/s",
        ])
        .into_config()
        .unwrap();
        let vsock = config.vsock.unwrap();
        assert_eq!((vsock.cid, vsock.uds), (7, PathBuf::from("/run/v.sock")));
        assert_eq!(config.rng.rate_bytes_per_sec, Some(4096));
        assert!(config.rng.enabled);

        let plain = run_args(&["run", "--kernel", "/k", "--rng"])
            .into_config()
            .unwrap();
        assert!(plain.rng.enabled && plain.rng.rate_bytes_per_sec.is_none());
        assert!(plain.vsock.is_none());
        let off = run_args(&["run", "--kernel", "/k", "--rng", "off"])
            .into_config()
            .unwrap();
        assert!(!off.rng.enabled);
    }

    #[test]
    fn bad_vsock_and_rng_flags_are_usage_errors_that_say_why() {
        for (args, reason) in [
            (
                &["run", "--kernel", "/k", "--vsock", "cid=3"][..],
                "no uds=PATH",
            ),
            (
                &["run", "--kernel", "/k", "--vsock", "uds=/x,cid=three"],
                "not a number",
            ),
            (
                &["run", "--kernel", "/k", "--rng", "rate=0/s"],
                "at least 1 byte",
            ),
            (
                &["run", "--kernel", "/k", "--rng", "maybe"],
                "on, off or rate",
            ),
        ] {
            let err = parse(args).err().expect("refused");
            assert_eq!(err.exit_code(), 2, "{args:?}");
            assert!(err.to_string().contains(reason), "{args:?}: {err}");
        }
    }

    #[test]
    fn bad_disk_flags_are_usage_errors_that_say_why() {
        let err = parse(&["run", "--kernel", "/k", "--disk", "path=/a.img,cache=none"])
            .err()
            .expect("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("unknown option 'cache=none'"),
            "{err}"
        );
    }

    #[test]
    fn huge_pages_flag_sets_the_backing() {
        let config = run_args(&["run", "--kernel", "/k", "--huge-pages", "none"])
            .into_config()
            .unwrap();
        assert_eq!(config.huge_pages, HugePages::None);
        let config = run_args(&["run", "--kernel", "/k", "--huge-pages", "2M"])
            .into_config()
            .unwrap();
        assert_eq!(config.huge_pages, HugePages::Hugetlbfs2M);
        let default = run_args(&["run", "--kernel", "/k"]).into_config().unwrap();
        assert_eq!(default.huge_pages, HugePages::Transparent);
        let err = parse(&["run", "--kernel", "/k", "--huge-pages", "1G"])
            .err()
            .expect("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("use None, Transparent or 2M"),
            "{err}"
        );
    }

    #[test]
    fn image_create_takes_a_base_format_and_size() {
        let Command::Image(ImageCommand::Create(args)) = parse(&[
            "image",
            "create",
            "--backing",
            "base.raw",
            "-F",
            "raw",
            "--size",
            "20G",
            "--cluster-size",
            "4k",
            "overlay.qcow2",
        ])
        .unwrap()
        .command
        else {
            panic!("not image create");
        };
        assert_eq!(args.backing, Some(PathBuf::from("base.raw")));
        assert_eq!(args.backing_format, Some(DiskFormat::Raw));
        assert_eq!(args.size, Some(20 << 30));
        assert_eq!(args.cluster_bits, Some(12));
        assert!(parse(&[
            "image",
            "create",
            "--cluster-size",
            "3000",
            "--size",
            "1M",
            "x"
        ])
        .is_err());
        assert!(parse(&[
            "image",
            "create",
            "--cluster-size",
            "4M",
            "--size",
            "1M",
            "x"
        ])
        .is_err());
        assert_eq!(args.image, PathBuf::from("overlay.qcow2"));
        assert_eq!(parse_size_arg("4096"), Ok(4096));
        assert_eq!(parse_size_arg("3k"), Ok(3072));
        assert!(parse_size_arg("1X").is_err());
        assert!(parse_size_arg("G").is_err());
        assert!(parse_size_arg("99999999999T").is_err());
        assert!(parse(&["image", "create", "-F", "vmdk", "x.qcow2"]).is_err());
        assert!(parse(&["image", "create"]).is_err());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["run", "--kernel", "/k", "--memory", "lots"][..],
            &["run", "--kernel", "/k", "--cpus", "-1"],
            &["run", "--kernel", "/k", "--cpus", "999"],
            &["run", "--kernel", "/k", "--console", "tty"],
            &["run", "--bogus"],
            &["fly"],
        ] {
            let err = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn outcomes_map_to_documented_statuses() {
        assert_eq!(
            exit_status(RunEnd::Guest(VmOutcome::PowerOff)),
            ExitCode::SUCCESS
        );
        assert_eq!(
            exit_status(RunEnd::Guest(VmOutcome::Reset)),
            ExitCode::SUCCESS
        );
        assert_eq!(
            exit_status(RunEnd::Guest(VmOutcome::Panic)),
            ExitCode::from(3)
        );
        assert_eq!(exit_status(RunEnd::Signal(15)), ExitCode::from(143));
    }
}
