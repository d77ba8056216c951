//! The host ends of the guest's vsock streams (Firecracker's convention: a guest connection to
//! host port P arrives on the Unix socket `<uds>_P`). One thread per stream, each blocking on
//! its own socket, so a slow reader of Kiln's stdout holds back only the command's stdout
//! (through vsock credit), never the VM or the other streams.

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_init::{Report, MAX_REPORT_LEN, PORT_CONTROL, PORT_STDERR, PORT_STDIN, PORT_STDOUT};
use kiln_vmm::VmHandle;

/// How long the host waits for the output streams to end after a setup failure was reported
/// (the init may have failed before connecting them).
const SETUP_FAILURE_GRACE: Duration = Duration::from_secs(2);

/// The command's report, once it is in and all of its output has been written out.
pub type ReportSlot = Arc<Mutex<Option<Report>>>;

/// The listening sockets, bound before the VM starts.
pub struct Listeners {
    control: UnixListener,
    stdout: UnixListener,
    stderr: UnixListener,
    stdin: Option<UnixListener>,
}

impl Listeners {
    /// Binds `<uds>_P` for each stream (stdin only when it is forwarded).
    pub fn bind(uds: &Path, forward_stdin: bool) -> io::Result<Self> {
        let bind = |port: u32| {
            let mut path = uds.as_os_str().to_owned();
            path.push(format!("_{port}"));
            UnixListener::bind(path)
        };
        Ok(Self {
            control: bind(PORT_CONTROL)?,
            stdout: bind(PORT_STDOUT)?,
            stderr: bind(PORT_STDERR)?,
            stdin: if forward_stdin {
                Some(bind(PORT_STDIN)?)
            } else {
                None
            },
        })
    }

    /// Starts the stream threads. When the report is in and stdout and stderr have ended, the
    /// report goes into `slot` and the VM is stopped.
    pub fn serve(self, vm: VmHandle, slot: ReportSlot) -> io::Result<()> {
        let (done_sender, done) = mpsc::channel();
        for (listener, fd, name) in [(self.stdout, 1, "stdout"), (self.stderr, 2, "stderr")] {
            let done_sender = done_sender.clone();
            spawn(&format!("kiln-{name}"), move || {
                relay_output(&listener, fd, name);
                let _ = done_sender.send(());
            })?;
        }
        if let Some(listener) = self.stdin {
            spawn("kiln-stdin", move || relay_stdin(&listener))?;
        }
        let control = self.control;
        spawn("kiln-control", move || {
            let Some(report) = read_report(&control) else {
                return;
            };
            let outputs_done = |limit: Option<Duration>| {
                for _ in 0..2 {
                    let received = match limit {
                        Some(limit) => done.recv_timeout(limit).is_ok(),
                        None => done.recv().is_ok(),
                    };
                    if !received {
                        return;
                    }
                }
            };
            match report {
                Report::SetupFailed(_) => outputs_done(Some(SETUP_FAILURE_GRACE)),
                _ => outputs_done(None),
            }
            *slot.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(report);
            vm.stop();
        })?;
        Ok(())
    }
}

fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(body)
        .map(|_| ())
}

/// Kiln's own descriptor `fd` as a `File` that is never closed.
fn own_fd(fd: i32) -> ManuallyDrop<File> {
    // SAFETY: 0, 1 and 2 stay open for the life of the process; ManuallyDrop never closes them.
    ManuallyDrop::new(unsafe { File::from_raw_fd(fd) })
}

/// Copies the guest's stream to Kiln's `fd` until the guest ends it. If Kiln's output is gone
/// (EPIPE), the connection is dropped, so the command sees its own write fail.
fn relay_output(listener: &UnixListener, fd: i32, name: &str) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let mut out = own_fd(fd);
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let read = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(read) => read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                log::warn!("reading the command's {name}: {err}");
                return;
            }
        };
        if let Err(err) = out.write_all(&buffer[..read]) {
            log::debug!("writing the command's {name}: {err}; dropping the stream");
            let _ = stream.shutdown(Shutdown::Both);
            // Drain what the guest still sends so that the end of the stream is still seen.
            while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
            return;
        }
    }
}

/// Copies Kiln's stdin to the guest's stdin stream, then ends it (the command sees EOF).
fn relay_stdin(listener: &UnixListener) {
    let Ok((mut stream, _)) = listener.accept() else {
        return;
    };
    let mut input = own_fd(0);
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        match input.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                if stream.write_all(&buffer[..read]).is_err() {
                    // The command closed its stdin.
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                log::warn!("reading stdin: {err}");
                break;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// The init's one report line, or `None` (with a log line) if none arrives intact.
fn read_report(listener: &UnixListener) -> Option<Report> {
    let (stream, _) = listener.accept().ok()?;
    let mut line = Vec::new();
    if let Err(err) = read_line(stream, &mut line) {
        log::warn!("reading the guest's report: {err}");
        return None;
    }
    match Report::decode(&line) {
        Ok(report) => Some(report),
        Err(err) => {
            log::warn!("the guest's report is malformed: {err}");
            None
        }
    }
}

/// Reads up to a newline (kept open afterwards: the guest waits on it until the VM stops).
fn read_line(stream: UnixStream, line: &mut Vec<u8>) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut stream = ManuallyDrop::new(stream);
    while line.len() < MAX_REPORT_LEN {
        match stream.read(&mut byte) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no newline")),
            Ok(_) if byte[0] == b'\n' => return Ok(()),
            Ok(_) => line.push(byte[0]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "the line is too long",
    ))
}
