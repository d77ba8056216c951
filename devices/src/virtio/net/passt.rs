//! Rootless NAT: a `passt` child (Debian package `passt`) on the other end of a socket pair,
//! speaking QEMU's stream framing. passt gives the guest its address by DHCP (and NDP/DHCPv6),
//! maps the guest's connections to host sockets, and forwards the host ports it is told to.
//!
//! passt is started with `--fd` (it then quits when Kiln's end closes) and `--foreground`, and
//! dies with Kiln (`PR_SET_PDEATHSIG`); dropping the backend kills and reaps it.

use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};

use super::stream::{Peer, Stream};

/// The Debian/Ubuntu/Fedora package that provides `passt`.
pub const PACKAGE: &str = "passt";

/// One forwarded host TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// The host address to listen on (all addresses when absent).
    pub address: Option<IpAddr>,
    /// The host port.
    pub host_port: u16,
    /// The guest port connections go to.
    pub guest_port: u16,
}

impl PortForward {
    /// passt's `-t` argument: `[ADDR/]HOSTPORT:GUESTPORT`.
    fn passt_spec(&self) -> String {
        match self.address {
            Some(address) => format!("{address}/{}:{}", self.host_port, self.guest_port),
            None => format!("{}:{}", self.host_port, self.guest_port),
        }
    }
}

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// The program is not installed.
    #[error("'{0}' was not found: user-mode networking (--net user) needs passt; install the '{PACKAGE}' package (apt-get install {PACKAGE})")]
    Missing(String),
    /// A forwarded port is taken.
    #[error("hostfwd port {port} on {address} is already in use")]
    PortInUse {
        /// The address.
        address: IpAddr,
        /// The port.
        port: u16,
    },
    /// The port cannot be bound for another reason (a privileged port, an address the host
    /// does not have).
    #[error("hostfwd port {port} on {address} cannot be bound: {source}")]
    PortUnusable {
        /// The address.
        address: IpAddr,
        /// The port.
        port: u16,
        /// Why.
        source: io::Error,
    },
    /// Anything else.
    #[error("cannot {0}: {1}")]
    Io(&'static str, io::Error),
}

/// How to start passt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstOptions {
    /// The program (`passt` on `PATH` by default).
    pub program: OsString,
    /// Host TCP ports forwarded to the guest.
    pub forwards: Vec<PortForward>,
}

impl Default for PasstOptions {
    fn default() -> Self {
        Self {
            program: OsString::from("passt"),
            forwards: Vec::new(),
        }
    }
}

/// The running passt child.
#[derive(Debug)]
struct PasstChild {
    child: Child,
    reaped: Option<std::process::ExitStatus>,
}

impl Peer for PasstChild {
    fn exit_reason(&mut self) -> Option<String> {
        if self.reaped.is_none() {
            // It closed its socket; give it a moment to finish exiting.
            for _ in 0..50 {
                match self.child.try_wait() {
                    Ok(Some(status)) => {
                        self.reaped = Some(status);
                        break;
                    }
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(2)),
                    Err(_) => break,
                }
            }
        }
        Some(match self.reaped {
            Some(status) => match (status.code(), status.signal()) {
                (Some(code), _) => {
                    format!("passt (pid {}) exited with status {code}", self.child.id())
                }
                (None, Some(signal)) => {
                    format!(
                        "passt (pid {}) was killed by signal {signal}",
                        self.child.id()
                    )
                }
                _ => format!("passt (pid {}) ended", self.child.id()),
            },
            None => format!("passt (pid {}) closed its socket", self.child.id()),
        })
    }
}

impl Drop for PasstChild {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Checks that every forwarded port can be bound now, so that a taken port is reported by name
/// before the VM starts (passt itself would only log it).
pub fn check_forwards(forwards: &[PortForward]) -> Result<(), PasstError> {
    for forward in forwards {
        let address = forward.address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        match TcpListener::bind((address, forward.host_port)) {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                return Err(PasstError::PortInUse {
                    address,
                    port: forward.host_port,
                })
            }
            Err(source) => {
                return Err(PasstError::PortUnusable {
                    address,
                    port: forward.host_port,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Starts passt on one end of a new socket pair and returns the other end as a backend.
pub fn spawn(options: &PasstOptions) -> Result<Stream, PasstError> {
    check_forwards(&options.forwards)?;
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| PasstError::Io("create a socket pair for passt", e))?;
    let child_fd = theirs.as_raw_fd();
    let mut command = Command::new(&options.program);
    command
        .arg("--foreground")
        .arg("--quiet")
        .arg("--fd")
        .arg(child_fd.to_string())
        .args(["-u", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if options.forwards.is_empty() {
        command.args(["-t", "none"]);
    }
    for forward in &options.forwards {
        command.arg("-t").arg(forward.passt_spec());
    }
    // SAFETY: only async-signal-safe calls between fork and exec (fcntl, prctl, getppid).
    unsafe {
        command.pre_exec(move || {
            // The socket pair is close-on-exec; passt's end must survive the exec.
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Dies with Kiln, even a Kiln killed by SIGKILL.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|err| {
        if err.kind() == io::ErrorKind::NotFound {
            PasstError::Missing(options.program.to_string_lossy().into_owned())
        } else {
            PasstError::Io("start passt", err)
        }
    })?;
    drop(theirs);
    log::debug!(
        "passt started (pid {}) with {} forwarded port(s)",
        child.id(),
        options.forwards.len()
    );
    let peer = PasstChild {
        child,
        reaped: None,
    };
    Stream::new(ours, Some(Box::new(peer))).map_err(|e| PasstError::Io("set up passt's socket", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_names_the_package() {
        let options = PasstOptions {
            program: OsString::from("/nonexistent/passt"),
            forwards: Vec::new(),
        };
        let err = spawn(&options).unwrap_err().to_string();
        assert!(err.contains("install the 'passt' package"), "{err}");
    }

    #[test]
    fn a_taken_port_is_reported_before_passt_starts() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let options = PasstOptions {
            program: OsString::from("/nonexistent/passt"),
            forwards: vec![PortForward {
                address: Some("127.0.0.1".parse().unwrap()),
                host_port: port,
                guest_port: 80,
            }],
        };
        let err = spawn(&options).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "hostfwd port {port} on 127.0.0.1 is already in use"
            )),
            "{err}"
        );
    }

    #[test]
    fn forwards_become_passt_arguments() {
        let forward = PortForward {
            address: None,
            host_port: 8080,
            guest_port: 80,
        };
        assert_eq!(forward.passt_spec(), "8080:80");
        let bound = PortForward {
            address: Some("127.0.0.1".parse().unwrap()),
            ..forward
        };
        assert_eq!(bound.passt_spec(), "127.0.0.1/8080:80");
    }
}
