//! Firecracker's request and response bodies (its OpenAPI description, `firecracker.yaml`), with
//! Firecracker's field names. Every input type refuses unknown fields, as Firecracker does;
//! fields Kiln does not implement are accepted only with the value that means "off" and refused
//! by name otherwise (see [`crate::controller`]).

use serde::{Deserialize, Serialize};

pub use kiln_vmm::config::HugePages;

/// `PUT /boot-source`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image on the host.
    pub kernel_image_path: String,
    /// Initrd on the host.
    #[serde(default)]
    pub initrd_path: Option<String>,
    /// The kernel command line; Firecracker's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Firecracker's static CPU templates (deprecated there; Kiln implements none but `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// `PUT /machine-config` and `GET /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading (Kiln: off only).
    #[serde(default)]
    pub smt: bool,
    /// CPU template (Kiln: `None` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking (Kiln: off only).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Page size behind guest RAM.
    #[serde(default)]
    pub huge_pages: HugePages,
}

/// `PATCH /machine-config`: any subset of the fields, at least one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    pub mem_size_mib: Option<u32>,
    /// Simultaneous multithreading.
    pub smt: Option<bool>,
    /// CPU template.
    pub cpu_template: Option<CpuTemplate>,
    /// Dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// Page size behind guest RAM.
    pub huge_pages: Option<HugePages>,
}

impl MachineConfigUpdate {
    /// Whether the update changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl From<MachineConfiguration> for MachineConfigUpdate {
    fn from(config: MachineConfiguration) -> Self {
        Self {
            vcpu_count: Some(config.vcpu_count),
            mem_size_mib: Some(config.mem_size_mib),
            smt: Some(config.smt),
            cpu_template: config.cpu_template,
            track_dirty_pages: Some(config.track_dirty_pages),
            huge_pages: Some(config.huge_pages),
        }
    }
}

/// What a drive does with the guest's flush requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Firecracker: flushes are acknowledged without syncing.
    Unsafe,
    /// Flushes sync the image.
    Writeback,
}

/// How a drive does its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking reads and writes (Kiln's per-disk I/O thread).
    Sync,
    /// io_uring (not in Kiln).
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (also in the path).
    pub drive_id: String,
    /// The image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Boot from it.
    pub is_root_device: bool,
    /// Boot partition of the root device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Read-only for the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// Flush handling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Rate limiter (Kiln: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// vhost-user backend socket (Kiln: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id (also in the path).
    pub drive_id: String,
    /// A new image for the running drive.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Rate limiter (Kiln: none).
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PUT /logger`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or named pipe for the log lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Error, Warning, Info, Debug, Trace or Off (any case).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Put the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Put the source file and line in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log lines from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// The level as a filter: Firecracker's names, any case (`Warning` and `Warn` both work).
    pub fn level_filter(&self) -> Result<Option<log::LevelFilter>, String> {
        let Some(level) = &self.level else {
            return Ok(None);
        };
        let filter = match level.to_ascii_lowercase().as_str() {
            "off" => log::LevelFilter::Off,
            "error" => log::LevelFilter::Error,
            "warning" | "warn" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => {
                return Err(format!(
                    "invalid level '{level}': use Error, Warning, Info, Debug, Trace or Off"
                ))
            }
        };
        Ok(Some(filter))
    }
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe for the JSON lines.
    pub metrics_path: String,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id (also in the path).
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default)]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// Receive rate limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Transmit rate limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /vsock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The host side's Unix socket.
    pub uds_path: String,
    /// Deprecated id.
    #[serde(default)]
    pub vsock_id: Option<String>,
}

/// The `action_type` of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Build and start the microVM.
    InstanceStart,
    /// Press Ctrl-Alt-Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// The `state` of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VmStateChange {
    /// Pause vCPUs and devices.
    Paused,
    /// Let them run again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The state wanted.
    pub state: VmStateChange,
}

/// The `snapshot_type` of `PUT /snapshot/create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the previous snapshot (needs `track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// The memory file to write.
    pub mem_file_path: String,
    /// The state file to write.
    pub snapshot_path: String,
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where a loaded snapshot's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BackendType {
    /// A memory file.
    File,
    /// A userfaultfd handler process (not in Kiln).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: BackendType,
    /// The file (or the handler's socket).
    pub backend_path: String,
}

/// `vsock_override` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The Unix socket the restored vsock device listens on instead of the snapshot's.
    pub uds_path: String,
}

/// One of `network_overrides` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The snapshot's interface.
    pub iface_id: String,
    /// The TAP device it is attached to instead of the snapshot's.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (deprecated in Firecracker in favour of `mem_backend`).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// The memory backend.
    #[serde(default)]
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages in the restored VM (for diff snapshots of it).
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Run the guest at once (default: restored paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// New TAP devices for network interfaces (clones each need their own).
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// A new Unix socket for the vsock device (clones each need their own).
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot (not in Kiln).
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

/// `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// `Kiln`.
    pub app_name: String,
    /// The `--id` of this instance.
    pub id: String,
    /// `Not started`, `Running`, `Paused` (or `Ended`, briefly, before the process exits).
    pub state: String,
    /// The Firecracker API version Kiln answers as (also in `GET /version`).
    pub vmm_version: String,
}

/// `GET /vm/config` (FullVmConfiguration): what Kiln has; absent devices are null or empty.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FullVmConfiguration {
    /// Never configured in Kiln.
    pub balloon: Option<serde_json::Value>,
    /// Drives, root first.
    pub drives: Vec<Drive>,
    /// Kernel, initrd, boot arguments.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// Never configured in Kiln.
    #[serde(rename = "cpu-config")]
    pub cpu_config: Option<serde_json::Value>,
    /// The logger set through the API or the config file.
    pub logger: Option<Logger>,
    /// vCPUs, memory, huge pages.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfiguration,
    /// The metrics set through the API or the config file.
    pub metrics: Option<Metrics>,
    /// Never configured in Kiln.
    #[serde(rename = "mmds-config")]
    pub mmds_config: Option<serde_json::Value>,
    /// Never configured in Kiln yet.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /vsock`.
    pub vsock: Option<Vsock>,
    /// Never configured in Kiln.
    pub entropy: Option<EntropyDevice>,
}
