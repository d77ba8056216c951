//! `kiln restore`: a snapshot (state file + memory file) in a new process, with the overrides
//! a clone needs (its own disks, vsock socket, NIC backends).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use kiln_vmm::snapshot::{DiskOverride, NetReplacement, RestoreConfig};
use kiln_vmm::{ConsoleConfig, Vm};

use crate::{parse_format_arg, parse_net_arg, run_to_end, RunEnd};

/// `kiln restore`'s options.
#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot's state file.
    #[arg(long)]
    pub(crate) state: PathBuf,
    /// The snapshot's memory file.
    #[arg(long = "memory-file")]
    pub(crate) memory_file: PathBuf,
    /// Serial console: stdio, none, or file=PATH [default: stdio].
    #[arg(long, default_value = "stdio")]
    pub(crate) console: ConsoleConfig,
    /// Use IMAGE for the snapshot's disk N (from 1) instead of its own path, e.g. a clone's
    /// copy, or its overlay from `kiln image create` with format=qcow2 [default format: the
    /// snapshot disk's].
    #[arg(long = "disk", value_name = "N=IMAGE[,format=raw|qcow2]", value_parser = parse_disk_override)]
    pub(crate) disks: Vec<DiskOverride>,
    /// The Unix socket the snapshot's vsock device listens on instead of its own (each clone
    /// of a vsock guest needs its own).
    #[arg(long = "vsock-uds", value_name = "PATH")]
    pub(crate) vsock_uds: Option<PathBuf>,
    /// Put the snapshot's NIC N (from 1) on another backend, as `kiln run --net` writes it;
    /// the guest keeps the NIC's MAC. E.g. each clone of a `--net user` guest with its own
    /// forwarded port: `--net 1=user,hostfwd=tcp::8081-:80`.
    #[arg(long = "net", value_name = "N=tap=NAME|N=tap-fd=N|N=user[,hostfwd=...]", value_parser = parse_net_replacement)]
    pub(crate) nets: Vec<NetReplacement>,
}

/// Splits `N=REST` where N counts from 1; returns N - 1 and REST. `what` names N in messages.
fn split_numbered<'a>(text: &'a str, what: &str, shape: &str) -> Result<(usize, &'a str), String> {
    let (number, rest) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not {shape}"))?;
    let number: usize = number
        .parse()
        .ok()
        .filter(|number| *number >= 1)
        .ok_or_else(|| format!("'{number}' is not a {what} number (1, 2, ...)"))?;
    Ok((number - 1, rest))
}

fn parse_net_replacement(text: &str) -> Result<NetReplacement, String> {
    let (index, spec) =
        split_numbered(text, "NIC", "N=BACKEND (e.g. 1=user,hostfwd=tcp::8081-:80)")?;
    Ok(NetReplacement {
        index,
        backend: parse_net_arg(spec)?,
    })
}

fn parse_disk_override(text: &str) -> Result<DiskOverride, String> {
    let (index, rest) = split_numbered(text, "disk", "N=IMAGE")?;
    let (path, format) = match rest.rsplit_once(",format=") {
        Some((path, format)) => (path, Some(parse_format_arg(format)?)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(format!("'{text}' names no image"));
    }
    Ok(DiskOverride {
        index,
        path: PathBuf::from(path),
        format,
    })
}

/// Restores the snapshot and runs the guest to its end.
pub fn restore(args: RestoreArgs, start: Instant) -> Result<RunEnd, kiln_vmm::Error> {
    let mut restore = RestoreConfig::new(args.state, args.memory_file);
    restore.console = args.console;
    restore.disk_overrides = args.disks;
    restore.vsock_uds = args.vsock_uds;
    restore.net_replacements = args.nets;
    let vm = Vm::restore(&restore, start)?;
    log::info!(
        "restored in {:.1} ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    run_to_end(vm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;
    use kiln_vmm::image::DiskFormat;

    /// `kiln restore --state s --memory-file m EXTRA...`, parsed.
    fn parse_restore(extra: &[&str]) -> Result<RestoreArgs, clap::Error> {
        let base = ["kiln", "restore", "--state", "s", "--memory-file", "m"];
        let cli = <crate::Cli as clap::Parser>::try_parse_from(base.iter().chain(extra))?;
        match cli.command {
            Command::Restore(args) => Ok(args),
            _ => panic!("not a restore command"),
        }
    }

    #[test]
    fn restore_takes_nic_backends_numbered_from_one() {
        let args = parse_restore(&[
            "--net",
            "1=user,hostfwd=tcp::8081-:80",
            "--net",
            "2=tap=clone0",
        ])
        .expect("valid arguments");
        assert_eq!(args.nets.len(), 2);
        assert_eq!(args.nets[0].index, 0);
        assert!(args.nets[0].backend.user);
        assert_eq!(args.nets[0].backend.hostfwd.len(), 1);
        assert_eq!(args.nets[1].index, 1);
        assert_eq!(args.nets[1].backend.tap.as_deref(), Some("clone0"));
        for bad in [
            "user",
            "0=user",
            "x=user",
            "1=",
            "1=user,hostfwd=udp::1-:2",
            "1=tap",
        ] {
            assert!(
                parse_restore(&["--net", bad]).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn restore_takes_disk_overrides_numbered_from_one() {
        let args = parse_restore(&["--disk", "2=/copy.img", "--vsock-uds", "/run/clone.sock"])
            .expect("valid arguments");
        assert_eq!(args.disks, vec![DiskOverride::new(1, "/copy.img")]);
        assert!(args.nets.is_empty());
        assert_eq!(args.vsock_uds, Some(PathBuf::from("/run/clone.sock")));
        assert_eq!(args.console, ConsoleConfig::Stdio);
        assert_eq!(
            parse_disk_override("1=/a,b.qcow2,format=qcow2"),
            Ok(DiskOverride {
                index: 0,
                path: PathBuf::from("/a,b.qcow2"),
                format: Some(DiskFormat::Qcow2),
            })
        );
        for bad in [
            "0=/x",
            "x=/y",
            "1=",
            "/no-number",
            "1=/x,format=vmdk",
            "1=,format=raw",
        ] {
            assert!(
                parse_restore(&["--disk", bad]).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
