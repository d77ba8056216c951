//! Kiln's Firecracker-compatible control plane.
//!
//! Programs written for Firecracker start it with `--api-sock PATH` and configure the microVM
//! over HTTP on that Unix socket, or hand it a `--config-file`. This crate answers both the way
//! Firecracker does (same paths, bodies, status codes, ordering rules and error messages) on
//! top of the `kiln-vmm` library:
//!
//! - [`http`]: the HTTP/1.1 subset the API needs, with size limits;
//! - [`router`]: paths and bodies into [`router::Action`]s;
//! - [`resources`]: the pre-boot configuration, checked by `kiln-vmm`'s validation;
//! - [`controller`]: carries actions out (`InstanceStart` is `Vm::new` + `Vm::start`; later
//!   requests go to the `VmHandle`);
//! - [`server`]: the socket, its thread and one thread per connection;
//! - [`config_file`]: Firecracker's `--config-file` layout;
//! - [`metrics`]: Firecracker-style JSON lines.
#![deny(missing_docs)]

pub mod config_file;
pub mod controller;
pub mod http;
pub mod metrics;
pub mod model;
pub mod resources;
pub mod router;
pub mod server;

pub use config_file::ConfigFile;
pub use controller::{Controller, Logging, NoLogging, StartedHook};
pub use resources::Resources;
pub use server::{bind, ApiServer, BindError, ServerLimits};

/// The Firecracker API version Kiln answers as (`GET /version`, `GET /`): the paths and bodies
/// of Firecracker's v1 OpenAPI description that Kiln implements (see docs/user-guide.md).
pub const FIRECRACKER_API_VERSION: &str = "1.12.0";

/// A refused request: its status and Firecracker-style `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (400 for everything the client can fix).
    pub status: u16,
    /// What is wrong, naming the field.
    pub message: String,
}

impl ApiError {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}
