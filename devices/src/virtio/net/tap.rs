//! A TAP interface as a NIC backend: opened by name (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`),
//! or taken as an already open descriptor from whoever started Kiln.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::{Backend, BackendError, FramePart, Offloads};
use super::NET_HDR_SIZE;

/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
/// `IFNAMSIZ` without the NUL.
pub const MAX_NAME_LEN: usize = 15;

/// `struct ifreq` as the TUN ioctls use it: a name and the flags.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// Why a TAP interface cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit `IFNAMSIZ` or holds bytes an interface name cannot.
    #[error("'{0}' is not a valid interface name (1 to {MAX_NAME_LEN} bytes, no '/', ':', spaces or NUL)")]
    BadName(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    NoTunDevice(io::Error),
    /// The interface does not exist and Kiln may not create it.
    #[error("TAP interface '{0}' does not exist and Kiln lacks CAP_NET_ADMIN to create it; create it first, e.g. `ip tuntap add {0} mode tap user $(id -un)` as root")]
    NotFoundNoPrivilege(String),
    /// The interface exists but belongs to someone else (or is not a TAP).
    #[error("TAP interface '{0}' exists but this user may not attach to it (it belongs to another user, or it is a TUN or other kind of interface); `ip tuntap add {0} mode tap user $(id -un)` makes one this user can open")]
    NotPermitted(String),
    /// Another process has it open.
    #[error("TAP interface '{0}' is busy: another process has it open")]
    Busy(String),
    /// A descriptor passed with `tap-fd=` is not an open TAP.
    #[error("descriptor {0} is not an open TAP device: {1}")]
    NotATap(RawFd, String),
    /// Anything else.
    #[error("TAP interface '{0}': cannot {1}: {2}")]
    Io(String, &'static str, io::Error),
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    vnet_header: bool,
}

impl Tap {
    /// Opens the TAP interface `name`, creating it if it does not exist (needs
    /// `CAP_NET_ADMIN`; a created interface goes away with Kiln).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::NoTunDevice)?;
        let mut request = InterfaceRequest {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `request` lays out (40
        // bytes); the descriptor is ours.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if result < 0 {
            let err = io::Error::last_os_error();
            let exists = std::path::Path::new("/sys/class/net").join(name).exists();
            return Err(match err.raw_os_error() {
                Some(libc::EPERM) if !exists => TapError::NotFoundNoPrivilege(name.to_string()),
                Some(libc::EPERM | libc::EINVAL) => TapError::NotPermitted(name.to_string()),
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                _ => TapError::Io(name.to_string(), "attach to it (TUNSETIFF)", err),
            });
        }
        Self::finish(file, name.to_string(), true)
    }

    /// Takes over descriptor `fd`, an open TAP device (what orchestrators pass). It is closed
    /// with the device.
    ///
    /// # Safety
    /// `fd` must be a descriptor this process owns and nothing else in it uses or closes.
    pub unsafe fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_GETFD only asks whether the number is an open descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::NotATap(
                fd,
                io::Error::last_os_error().to_string(),
            ));
        }
        let mut request = InterfaceRequest {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF fills a `struct ifreq`; on anything but a TUN/TAP descriptor it
        // fails without writing.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut request) } < 0 {
            return Err(TapError::NotATap(
                fd,
                format!("TUNGETIFF: {}", io::Error::last_os_error()),
            ));
        }
        if request.flags & IFF_TAP == 0 {
            return Err(TapError::NotATap(
                fd,
                "it is a TUN (layer 3) device, not a TAP".into(),
            ));
        }
        if request.flags & IFF_NO_PI == 0 {
            return Err(TapError::NotATap(
                fd,
                "it was opened without IFF_NO_PI (frames would carry packet information)".into(),
            ));
        }
        // SAFETY: the caller hands the descriptor over; it is open (checked above).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = File::from(owned);
        let name_len = request.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&request.name[..name_len]).into_owned();
        // SAFETY: F_GETFL/F_SETFL on our descriptor.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(TapError::Io(
                    name,
                    "make it non-blocking",
                    io::Error::last_os_error(),
                ));
            }
        }
        let vnet_header = request.flags & IFF_VNET_HDR != 0;
        Self::finish(file, name, vnet_header)
    }

    fn finish(file: File, name: String, vnet_header: bool) -> Result<Self, TapError> {
        let tap = Self {
            file,
            name,
            vnet_header,
        };
        if vnet_header {
            let size = NET_HDR_SIZE as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
            if unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
                return Err(TapError::Io(
                    tap.name,
                    "set its virtio-net header size (TUNSETVNETHDRSZ)",
                    io::Error::last_os_error(),
                ));
            }
            tap.apply_offloads(0).map_err(|err| {
                TapError::Io(tap.name.clone(), "set its offloads (TUNSETOFFLOAD)", err)
            })?;
        }
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn apply_offloads(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Backend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn has_vnet_header(&self) -> bool {
        self.vnet_header
    }

    fn set_offloads(&mut self, offloads: Offloads) -> io::Result<()> {
        let mut flags = 0;
        if offloads.csum {
            flags |= TUN_F_CSUM;
            // The kernel refuses segmentation offloads without checksum offload.
            if offloads.tso4 {
                flags |= TUN_F_TSO4;
            }
            if offloads.tso6 {
                flags |= TUN_F_TSO6;
            }
        }
        self.apply_offloads(flags)
    }

    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError> {
        match self.file.read(buf) {
            Ok(len) => Ok(Some(len)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(None),
            // EIO while the interface is being torn down, for example: nothing for the guest.
            Err(err) => Err(BackendError::Dropped(err)),
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<bool, BackendError> {
        self.send_parts(&[FramePart::from_slice(frame)])
    }

    fn send_parts(&mut self, parts: &[FramePart]) -> Result<bool, BackendError> {
        let iovecs: Vec<libc::iovec> = parts.iter().map(FramePart::iovec).collect();
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| BackendError::Dropped(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: the iovecs describe readable memory (the contract of `FramePart`), alive for
        // the call; the kernel only reads them. A TAP takes a frame whole or not at all.
        let written = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        let result = if written < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        };
        match result {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // Bad headers (EINVAL), the interface down (EIO): this frame is lost.
            Err(err) => Err(BackendError::Dropped(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a-name-far-too-long", "a/b", "a b", "eth0:1"] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, TapError::BadName(_)), "{name}: {err}");
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(file);
        // SAFETY: a descriptor this test owns; on refusal it stays open and is closed below.
        let err = unsafe { Tap::from_fd(fd) }.unwrap_err();
        assert!(err.to_string().contains("is not an open TAP"), "{err}");
        // SAFETY: closing the descriptor the test opened.
        unsafe { libc::close(fd) };
        // SAFETY: a number that is not open (closed just above).
        let err = unsafe { Tap::from_fd(fd) }.unwrap_err();
        assert!(err.to_string().contains("is not an open TAP"), "{err}");
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<InterfaceRequest>(), 40);
    }
}
