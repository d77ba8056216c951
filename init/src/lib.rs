//! What `kiln run -- CMD` and its guest init (`kiln-init`) say to each other.
//!
//! The host writes a [`CommandSpec`] into the initramfs at [`SPEC_PATH`]; the init connects
//! one vsock stream per purpose to the host (CID [`HOST_CID`], ports [`PORT_CONTROL`]...),
//! runs the command with the stdout/stderr/stdin streams as its own descriptors, and sends one
//! [`Report`] line on the control stream when it has ended.
#![deny(missing_docs)]

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// Where the command's specification is in the initramfs.
pub const SPEC_PATH: &str = "/kiln/command";
/// Where `--copy` files wait in the initramfs when a root disk is mounted over it; the init
/// copies them into the new root (`/kiln/copy/etc/x` becomes `/etc/x`).
pub const COPY_STAGING: &str = "/kiln/copy";
/// The host's vsock context ID.
pub const HOST_CID: u32 = 2;
/// The guest's vsock context ID (the guest is alone with its host).
pub const GUEST_CID: u32 = 3;
/// Host port of the control stream: the init's [`Report`], then nothing (the host stops the VM).
pub const PORT_CONTROL: u32 = 1100;
/// Host port of the command's stdout.
pub const PORT_STDOUT: u32 = 1101;
/// Host port of the command's stderr.
pub const PORT_STDERR: u32 = 1102;
/// Host port of the command's stdin (only when the spec says it is forwarded).
pub const PORT_STDIN: u32 = 1103;
/// The longest report line the host reads.
pub const MAX_REPORT_LEN: usize = 4096;

/// The environment a command gets before `--env` entries are added.
pub const BASE_ENVIRONMENT: [(&str, &str); 3] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("TERM", "dumb"),
];

/// A root disk for the command: the init mounts it and switches into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// The block device, e.g. `/dev/vda`.
    pub device: String,
    /// Mount it read-only.
    pub readonly: bool,
}

/// The command and how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandSpec {
    /// The program and its arguments (never empty once checked).
    pub argv: Vec<OsString>,
    /// `KEY=VALUE` entries added to [`BASE_ENVIRONMENT`] (later entries win).
    pub env: Vec<OsString>,
    /// The working directory [default: `/`].
    pub workdir: Option<OsString>,
    /// Mount this disk and run the command inside it.
    pub root: Option<RootDisk>,
    /// Connect stdin to [`PORT_STDIN`] (otherwise it is `/dev/null`).
    pub stdin: bool,
    /// Run the command on a pseudo-terminal of this size (rows, columns): its stdin, stdout and
    /// stderr are the terminal, relayed over the stdin and stdout streams.
    pub tty: Option<(u16, u16)>,
    /// Interfaces to configure by DHCP before the command starts (`eth0` for a `--net user`
    /// NIC), with busybox's `udhcpc`.
    pub dhcp: Vec<String>,
}

/// Why a spec or a report could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

impl CommandSpec {
    /// The spec as records `key=value\0`: values may hold any byte but NUL, which no argument,
    /// environment entry or path can hold either.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        let mut record = |key: &str, value: &[u8]| -> Result<(), ProtocolError> {
            if value.contains(&0) {
                return Err(ProtocolError(format!(
                    "the {key} value contains a NUL byte"
                )));
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value);
            out.push(0);
            Ok(())
        };
        for arg in &self.argv {
            record("arg", arg.as_bytes())?;
        }
        for entry in &self.env {
            record("env", entry.as_bytes())?;
        }
        if let Some(workdir) = &self.workdir {
            record("workdir", workdir.as_bytes())?;
        }
        if let Some(root) = &self.root {
            record("root", root.device.as_bytes())?;
            if root.readonly {
                record("root-readonly", b"1")?;
            }
        }
        if self.stdin {
            record("stdin", b"1")?;
        }
        if let Some((rows, columns)) = self.tty {
            record("tty", format!("{rows}x{columns}").as_bytes())?;
        }
        for interface in &self.dhcp {
            record("dhcp", interface.as_bytes())?;
        }
        Ok(out)
    }

    /// Reads what [`CommandSpec::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let mut spec = Self::default();
        let mut root_readonly = false;
        let body = match bytes.last() {
            None => &[][..],
            Some(0) => &bytes[..bytes.len() - 1],
            Some(_) => return Err(ProtocolError("the spec does not end with NUL".into())),
        };
        if !body.is_empty() {
            for record in body.split(|&byte| byte == 0) {
                let at = record
                    .iter()
                    .position(|&byte| byte == b'=')
                    .ok_or_else(|| ProtocolError("a spec record has no '='".into()))?;
                let (key, value) = (&record[..at], &record[at + 1..]);
                let text = || OsString::from_vec(value.to_vec());
                match key {
                    b"arg" => spec.argv.push(text()),
                    b"env" => spec.env.push(text()),
                    b"workdir" => spec.workdir = Some(text()),
                    b"root" => {
                        let device = String::from_utf8(value.to_vec())
                            .map_err(|_| ProtocolError("the root device is not UTF-8".into()))?;
                        spec.root = Some(RootDisk {
                            device,
                            readonly: false,
                        });
                    }
                    b"root-readonly" => root_readonly = value == b"1",
                    b"stdin" => spec.stdin = value == b"1",
                    b"dhcp" => {
                        let interface = std::str::from_utf8(value)
                            .ok()
                            .filter(|name| {
                                !name.is_empty()
                                    && name.len() < 16
                                    && name.bytes().all(|b| b.is_ascii_alphanumeric())
                            })
                            .ok_or_else(|| ProtocolError("bad DHCP interface name".into()))?;
                        spec.dhcp.push(interface.to_string());
                    }
                    b"tty" => {
                        let size = std::str::from_utf8(value)
                            .ok()
                            .and_then(|text| text.split_once('x'))
                            .and_then(|(rows, columns)| {
                                Some((rows.parse().ok()?, columns.parse().ok()?))
                            })
                            .ok_or_else(|| ProtocolError("bad terminal size".into()))?;
                        spec.tty = Some(size);
                    }
                    other => {
                        return Err(ProtocolError(format!(
                            "unknown spec record '{}'",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
        }
        if let Some(root) = &mut spec.root {
            root.readonly = root_readonly;
        }
        if spec.argv.is_empty() {
            return Err(ProtocolError("the spec has no command".into()));
        }
        Ok(spec)
    }

    /// The command's environment: [`BASE_ENVIRONMENT`] overridden by `env`, in order.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        let mut vars: Vec<(OsString, OsString)> = BASE_ENVIRONMENT
            .iter()
            .map(|(key, value)| (OsString::from(key), OsString::from(value)))
            .collect();
        for entry in &self.env {
            let bytes = entry.as_bytes();
            let (key, value) = match bytes.iter().position(|&byte| byte == b'=') {
                Some(at) => (&bytes[..at], &bytes[at + 1..]),
                None => (bytes, &[][..]),
            };
            let key = OsString::from_vec(key.to_vec());
            let value = OsString::from_vec(value.to_vec());
            match vars.iter_mut().find(|(existing, _)| *existing == key) {
                Some(slot) => slot.1 = value,
                None => vars.push((key, value)),
            }
        }
        vars
    }
}

/// How the command ended, as the init reports it on the control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// It exited with this status (127 and 126 when it could not be started, as shells do).
    Exited(u8),
    /// A signal killed it.
    Signaled(u8),
    /// The init could not set the command up (root disk, working directory, copies).
    SetupFailed(String),
}

impl Report {
    /// One line: `exit N`, `signal N` or `error MESSAGE` (newlines in the message become spaces).
    pub fn encode(&self) -> Vec<u8> {
        let line = match self {
            Self::Exited(code) => format!("exit {code}"),
            Self::Signaled(signal) => format!("signal {signal}"),
            Self::SetupFailed(message) => {
                let mut message = message.replace(['\n', '\r'], " ");
                message.truncate(MAX_REPORT_LEN - 16);
                format!("error {message}")
            }
        };
        let mut bytes = line.into_bytes();
        bytes.push(b'\n');
        bytes
    }

    /// Reads one line written by [`Report::encode`] (with or without its newline).
    pub fn decode(line: &[u8]) -> Result<Self, ProtocolError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let text = std::str::from_utf8(line)
            .map_err(|_| ProtocolError("the report is not UTF-8".into()))?;
        let (kind, value) = text.split_once(' ').unwrap_or((text, ""));
        let number = || {
            value
                .parse::<u8>()
                .map_err(|_| ProtocolError(format!("bad number in report '{text}'")))
        };
        match kind {
            "exit" => Ok(Self::Exited(number()?)),
            "signal" => match number()? {
                0 => Err(ProtocolError("signal 0 in report".into())),
                signal => Ok(Self::Signaled(signal)),
            },
            "error" => Ok(Self::SetupFailed(value.to_string())),
            _ => Err(ProtocolError(format!("unknown report '{text}'"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(text: &str) -> OsString {
        OsString::from(text)
    }

    #[test]
    fn specs_round_trip_with_any_bytes_but_nul() {
        let spec = CommandSpec {
            argv: vec![
                os("sh"),
                os("-c"),
                OsString::from_vec(b"echo 'a=b'\n\xff\x01".to_vec()),
                os(""),
            ],
            env: vec![os("A=1=2"), os("EMPTY=")],
            workdir: Some(os("/tmp/w d")),
            root: Some(RootDisk {
                device: "/dev/vdb".into(),
                readonly: true,
            }),
            stdin: true,
            tty: Some((50, 132)),
            dhcp: vec!["eth0".into(), "eth2".into()],
        };
        assert_eq!(CommandSpec::decode(&spec.encode().unwrap()), Ok(spec));
        assert!(CommandSpec::decode(b"arg=sh\0tty=50\0").is_err());
        let plain = CommandSpec {
            argv: vec![os("true")],
            ..CommandSpec::default()
        };
        assert_eq!(CommandSpec::decode(&plain.encode().unwrap()), Ok(plain));
    }

    #[test]
    fn bad_specs_are_refused() {
        let nul = CommandSpec {
            argv: vec![OsString::from_vec(b"a\0b".to_vec())],
            ..CommandSpec::default()
        };
        assert!(nul.encode().is_err());
        assert!(CommandSpec::decode(b"")
            .unwrap_err()
            .0
            .contains("no command"));
        assert!(CommandSpec::decode(b"arg=x").is_err());
        assert!(CommandSpec::decode(b"arg=x\0noequals\0").is_err());
        assert!(CommandSpec::decode(b"arg=x\0color=red\0").is_err());
        assert!(CommandSpec::decode(b"env=A=1\0").is_err());
        assert!(CommandSpec::decode(b"arg=x\0dhcp=../eth0\0").is_err());
        assert!(CommandSpec::decode(b"arg=x\0dhcp=\0").is_err());
    }

    #[test]
    fn environment_overrides_the_base_in_order() {
        let spec = CommandSpec {
            argv: vec![os("env")],
            env: vec![os("PATH=/x"), os("K=1"), os("K=2"), os("BARE")],
            ..CommandSpec::default()
        };
        let env = spec.environment();
        let get = |key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.to_str().unwrap().to_string())
        };
        assert_eq!(get("PATH").as_deref(), Some("/x"));
        assert_eq!(get("K").as_deref(), Some("2"));
        assert_eq!(get("BARE").as_deref(), Some(""));
        assert_eq!(get("HOME").as_deref(), Some("/root"));
        assert_eq!(env.iter().filter(|(k, _)| k == "K").count(), 1);
    }

    #[test]
    fn reports_round_trip_and_bad_ones_are_refused() {
        for report in [
            Report::Exited(0),
            Report::Exited(255),
            Report::Signaled(9),
            Report::SetupFailed("cannot mount /dev/vda: EINVAL".into()),
        ] {
            assert_eq!(Report::decode(&report.encode()), Ok(report));
        }
        assert_eq!(
            Report::SetupFailed("a\nb".into()).encode(),
            b"error a b\n".to_vec()
        );
        for bad in [
            &b"exit 256"[..],
            b"exit",
            b"signal 0",
            b"quit 1",
            b"exit -1",
            b"\xff",
        ] {
            assert!(Report::decode(bad).is_err(), "{bad:?}");
        }
    }
}
