//! The command on a pseudo-terminal (`kiln run` from a terminal, or `--tty`): the terminal's
//! slave side is its stdin, stdout and stderr and its controlling terminal; two threads relay
//! the master side to and from the host's stdout and stdin streams.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::mpsc;
use std::time::Duration;

/// How long the output relay may go on after the command ended (a background process that keeps
/// the terminal open must not hold the report back).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// A new pseudo-terminal: the master and the slave's path.
pub struct Pty {
    master: File,
    slave: CString,
}

impl Pty {
    /// Opens `/dev/ptmx` (devpts must be mounted at /dev/pts) with the window size given.
    pub fn open(rows: u16, columns: u16) -> io::Result<Self> {
        let master = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open("/dev/ptmx")?;
        let fd = master.as_raw_fd();
        let unlock: libc::c_int = 0;
        let mut number: libc::c_uint = 0;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: ioctls on the master with live arguments of the types they expect.
        unsafe {
            if libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) != 0
                || libc::ioctl(fd, libc::TIOCGPTN, &mut number) != 0
                || libc::ioctl(fd, libc::TIOCSWINSZ, &size) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        let slave = CString::new(format!("/dev/pts/{number}")).expect("no NUL");
        Ok(Self { master, slave })
    }

    /// Makes `command` run on the slave side, as its controlling terminal.
    pub fn attach(&self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let slave = self.slave.clone();
        // SAFETY: only async-signal-safe calls (setsid, open, ioctl, dup2, close) on memory
        // prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                libc::setsid();
                let fd = libc::open(slave.as_ptr(), libc::O_RDWR);
                if fd < 0 || libc::ioctl(fd, libc::TIOCSCTTY, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                for target in 0..3 {
                    if libc::dup2(fd, target) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if fd > 2 {
                    libc::close(fd);
                }
                Ok(())
            })
        };
    }

    /// Starts the relays: host stdin → terminal, terminal → host stdout. The returned
    /// receiver gets a message when the terminal's output has ended.
    pub fn relay(self, stdin: Option<OwnedFd>, stdout: &OwnedFd) -> io::Result<mpsc::Receiver<()>> {
        let (done_sender, done) = mpsc::channel();
        let mut to_terminal = self.master.try_clone()?;
        if let Some(stdin) = stdin {
            let mut from_host = File::from(stdin);
            std::thread::Builder::new()
                .name("pty-in".into())
                .spawn(move || {
                    let _ = io::copy(&mut from_host, &mut to_terminal);
                })?;
        }
        let mut from_terminal = self.master;
        let mut to_host = File::from(stdout.try_clone()?);
        std::thread::Builder::new()
            .name("pty-out".into())
            .spawn(move || {
                let mut buffer = vec![0u8; 16 << 10];
                // EIO once no process has the slave open any more.
                while let Ok(read @ 1..) = from_terminal.read(&mut buffer) {
                    if to_host.write_all(&buffer[..read]).is_err() {
                        break;
                    }
                }
                let _ = done_sender.send(());
            })?;
        Ok(done)
    }
}

/// Waits for the output relay to finish, at most [`OUTPUT_GRACE`].
pub fn wait_for_output(done: &mpsc::Receiver<()>) {
    let _ = done.recv_timeout(OUTPUT_GRACE);
}
