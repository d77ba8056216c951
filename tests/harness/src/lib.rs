//! Runs Linux-guest tests for Kiln on any Linux machine.
//!
//! A [`GuestTest`] is a busybox shell script that the guest's init runs, plus the way `kiln`
//! boots it (vCPUs, memory, command line, kernel build, time limit). A [`Suite`] runs a batch of
//! them and returns one [`GuestOutcome`] each (guest console, Kiln log, exit status, timeout),
//! which a [`Check`] turns into pass or fail.
//!
//! Where tests run is decided once per process (see [`mode`]):
//! - **direct**: `/dev/kvm` opens and is not PVM: `kiln` runs here, one process per test;
//! - **vhost**: otherwise: one boot of the virtual KVM host (QEMU TCG with emulated AMD SVM, see
//!   `resources/vhost-run`) runs the whole batch, and results come back over its second serial
//!   port.
//!
//! A test may attach disk images ([`GuestTest::disk`]) that it creates on the host and reads
//! back after the batch, in both modes (see [`disk`]).
//!
//! `KILN_TEST_MODE=direct|vhost` forces a mode. Images come from the scripts in `resources/`,
//! cached under `${KILN_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/kiln}`.
#![deny(missing_docs)]

pub mod base64;
pub mod cli;
pub mod cpio;
mod direct;
pub mod disk;
pub mod guest_test;
pub mod host_scripts;
pub mod images;
pub mod mode;
pub mod outcome;
pub mod process;
pub mod results;
pub mod suite;
mod vhost;
mod vhost_drives;
mod vhost_stall;

pub use disk::{DiskOptions, GuestDisk};
pub use guest_test::{GuestTest, HostPaths, KernelVariant};
pub use images::GuestImages;
pub use outcome::{Check, CheckFailure, GuestOutcome};
pub use suite::Suite;

/// Why a whole suite could not run.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Something the tests need could not be prepared (images, mode, files, the kiln binary).
    #[error("{0}")]
    Setup(String),
}

/// `name` with every character other than ASCII letters, digits, `-` and `_` replaced by `_`.
pub(crate) fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A file-system-friendly directory name for a test: its index and its name.
pub(crate) fn test_dir_name(index: usize, name: &str) -> String {
    format!("{index:02}-{}", safe_name(name))
}
