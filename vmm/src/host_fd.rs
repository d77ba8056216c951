//! The descriptors Kiln shares with whoever started it (stdin, stdout): what they are, and
//! non-blocking access to them that does not change them for anyone else.
//!
//! `O_NONBLOCK` is a property of the open file description, which a shell shares with every job
//! it starts on the same terminal or pipe. Setting it on stdin or stdout itself would make the
//! shell's other programs see `EAGAIN` (and outlive Kiln if Kiln dies before restoring it). A
//! fresh description opened through `/proc/self/fd/N` reaches the same pipe or terminal with
//! flags of its own.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::Duration;

/// What sits behind a descriptor, as far as waiting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A regular file or a block device: reads and writes never wait for another program.
    Storage,
    /// A socket: `send`/`recv` take `MSG_DONTWAIT`, which needs no flag on the description.
    Socket,
    /// A pipe, a FIFO, a terminal or another character device: may wait for the other end.
    Stream,
}

/// Finds out what `fd` is.
pub fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
    let file_type = File::from(fd.try_clone_to_owned()?).metadata()?.file_type();
    Ok(if file_type.is_file() || file_type.is_block_device() {
        FdKind::Storage
    } else if file_type.is_socket() {
        FdKind::Socket
    } else {
        FdKind::Stream
    })
}

/// Opens a new, non-blocking open file description of the pipe or terminal behind `fd`,
/// for reading (`write == false`) or writing. Fails for sockets, for a pipe without a reader
/// (when opened for writing), without `/proc`, or when the file's permissions do not allow it.
pub fn reopen_nonblocking(fd: BorrowedFd<'_>, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        // O_NOCTTY: reopening a terminal must not make it Kiln's controlling terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A duplicate of a descriptor whose shared description was switched to non-blocking because
/// it could not be reopened (the fallback); the description's flags are restored on drop.
#[derive(Debug)]
pub struct SharedNonBlocking {
    fd: OwnedFd,
    saved_flags: libc::c_int,
}

impl SharedNonBlocking {
    /// Duplicates `fd` and sets `O_NONBLOCK` on its description until dropped.
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<Self> {
        let fd = fd.try_clone_to_owned()?;
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let saved_flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if saved_flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: F_SETFL with an int argument on a descriptor we own.
        if unsafe {
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_SETFL,
                saved_flags | libc::O_NONBLOCK,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, saved_flags })
    }
}

impl AsFd for SharedNonBlocking {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedNonBlocking {
    fn drop(&mut self) {
        // SAFETY: F_SETFL with an int argument on a descriptor we own.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, self.saved_flags) } < 0 {
            log::warn!(
                "cannot restore the flags of a console descriptor: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// `write(2)` once; `EAGAIN` comes back as [`io::ErrorKind::WouldBlock`].
pub fn write_fd(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writes at most `buf.len()` bytes from a live slice to a descriptor we borrow.
    let written = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(written as usize)
}

/// `read(2)` once; `EAGAIN` comes back as [`io::ErrorKind::WouldBlock`].
pub fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads at most `buf.len()` bytes into a live, exclusively borrowed slice.
    let read = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(read as usize)
}

/// `send(2)` that never waits and never raises `SIGPIPE`.
pub fn send_nowait(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: sends at most `buf.len()` bytes from a live slice on a socket we borrow.
    let sent = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// `recv(2)` that never waits.
pub fn recv_nowait(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives at most `buf.len()` bytes into a live, exclusively borrowed slice.
    let received = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(received as usize)
}

/// Waits up to `timeout` for `events` (`POLLIN`, `POLLOUT`) on `fd`; true when ready (an error
/// or hang-up on the descriptor also counts: the next read or write reports it).
pub fn poll_fd(fd: BorrowedFd<'_>, events: libc::c_short, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, and the count says one.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    match ready {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    /// A pipe as (read end, write end), both blocking.
    pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned only here.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn status_flags(fd: BorrowedFd<'_>) -> libc::c_int {
        // SAFETY: F_GETFL on a live descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
    }

    #[test]
    fn kinds_are_told_apart() {
        let (read, _write) = pipe();
        assert_eq!(fd_kind(read.as_fd()).unwrap(), FdKind::Stream);
        let file = tempfile_in_target();
        assert_eq!(fd_kind(file.as_fd()).unwrap(), FdKind::Storage);
        let (left, _right) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(fd_kind(left.as_fd()).unwrap(), FdKind::Socket);
    }

    fn tempfile_in_target() -> File {
        let path = std::env::temp_dir().join(format!("kiln-host-fd-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn a_reopened_pipe_is_non_blocking_and_the_original_is_untouched() {
        let (read, write) = pipe();
        let private = reopen_nonblocking(write.as_fd(), true).unwrap();
        assert_eq!(status_flags(write.as_fd()) & libc::O_NONBLOCK, 0);
        assert_ne!(status_flags(private.as_fd()) & libc::O_NONBLOCK, 0);
        // Fill the pipe through the private description: it ends in WouldBlock, not a hang.
        let chunk = [7u8; 4096];
        let err = loop {
            if let Err(err) = write_fd(private.as_fd(), &chunk) {
                break err;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(!poll_fd(private.as_fd(), libc::POLLOUT, Duration::from_millis(10)).unwrap());
        let reader = reopen_nonblocking(read.as_fd(), false).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(read_fd(reader.as_fd(), &mut buf).unwrap(), 16);
        assert_eq!(buf, [7u8; 16]);
    }

    #[test]
    fn the_fallback_restores_the_shared_flags() {
        let (_read, write) = pipe();
        let shared = SharedNonBlocking::new(write.as_fd()).unwrap();
        assert_ne!(status_flags(write.as_fd()) & libc::O_NONBLOCK, 0);
        drop(shared);
        assert_eq!(status_flags(write.as_fd()) & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn sockets_never_wait() {
        let (left, right) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let err = recv_nowait(left.as_fd(), &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let chunk = [1u8; 65536];
        let err = loop {
            if let Err(err) = send_nowait(right.as_fd(), &chunk) {
                break err;
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
