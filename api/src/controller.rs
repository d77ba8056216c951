//! Carries out API requests: before `InstanceStart` they shape a [`Resources`]; `InstanceStart`
//! builds and starts the VM through the library (`Vm::new` + `Vm::start`); afterwards requests
//! go to its [`VmHandle`]. The server is only the transport in front of this.

use std::sync::Arc;
use std::time::Instant;

use kiln_vmm::snapshot::{
    apply_net_overrides, read_state_file, NetOverride, RestoreConfig, SnapshotError, SnapshotKind,
};
use kiln_vmm::{ControlError, RunningVm, Vm, VmConfig, VmHandle, VmState};
use serde::Serialize;

use crate::http::Response;
use crate::metrics::{MetricsWriter, ProcessTimes};
use crate::model::*;
use crate::resources::Resources;
use crate::router::Action;
use crate::{ApiError, FIRECRACKER_API_VERSION};

/// Applies a logger configuration (the `kiln` binary owns the logger).
pub trait Logging: Send + Sync {
    /// Reconfigures the logger; the error says what is wrong.
    fn configure(&self, config: &Logger) -> Result<(), String>;
}

/// A [`Logging`] that accepts everything and does nothing (tests, embedders without a logger).
#[derive(Debug, Default)]
pub struct NoLogging;

impl Logging for NoLogging {
    fn configure(&self, _config: &Logger) -> Result<(), String> {
        Ok(())
    }
}

/// Receives the VM once `InstanceStart` has started it (the `kiln` binary waits for its end).
pub type StartedHook = Box<dyn FnMut(RunningVm) + Send>;

/// The microVM behind the API.
pub struct Controller {
    instance_id: String,
    resources: Resources,
    vm: Option<VmHandle>,
    logging: Arc<dyn Logging>,
    metrics: Option<MetricsWriter>,
    times: ProcessTimes,
    on_start: StartedHook,
    /// A boot resource was configured: loading a snapshot is no longer allowed (Firecracker).
    boot_path: bool,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("instance_id", &self.instance_id)
            .field("resources", &self.resources)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller for instance `instance_id` with nothing configured; `on_start` gets the VM
    /// when `InstanceStart` succeeds.
    pub fn new(
        instance_id: impl Into<String>,
        resources: Resources,
        logging: Arc<dyn Logging>,
        on_start: StartedHook,
    ) -> Self {
        Self {
            instance_id: instance_id.into(),
            resources,
            vm: None,
            logging,
            metrics: None,
            times: ProcessTimes::default(),
            on_start,
            boot_path: false,
        }
    }

    /// The configuration so far.
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The running VM's handle, once started.
    pub fn vm(&self) -> Option<&VmHandle> {
        self.vm.as_ref()
    }

    /// Records when the API became ready (reported in the metrics).
    pub fn set_startup_time(&mut self, since_process_start: std::time::Duration) {
        self.times.startup_us = Some(since_process_start.as_micros() as u64);
    }

    /// Answers one request.
    pub fn handle(&mut self, action: Action) -> Response {
        match self.execute(action) {
            Ok(response) => response,
            Err(err) => {
                log::warn!("API request refused ({}): {}", err.status, err.message);
                Response::fault(err.status, &err.message)
            }
        }
    }

    /// Carries out one request; errors are Firecracker-style faults.
    pub fn execute(&mut self, action: Action) -> Result<Response, ApiError> {
        let started = self.vm.is_some();
        if !action.allowed(started) {
            return Err(ApiError::bad_request(if started {
                "The requested operation is not supported after starting the microVM."
            } else {
                "The requested operation is not supported before starting the microVM."
            }));
        }
        match action {
            Action::GetInstanceInfo => json(&InstanceInfo {
                app_name: "Kiln".into(),
                id: self.instance_id.clone(),
                state: self.state_name().into(),
                vmm_version: FIRECRACKER_API_VERSION.into(),
            }),
            Action::GetVersion => json(&serde_json::json!({
                "firecracker_version": FIRECRACKER_API_VERSION
            })),
            Action::GetFullConfig => json(&self.resources.full_configuration()),
            Action::GetMachineConfig => json(&self.resources.machine),
            Action::PutBootSource(boot_source) => {
                self.resources.set_boot_source(boot_source)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::PutMachineConfig(update) | Action::PatchMachineConfig(update) => {
                self.resources.update_machine(&update)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::PutDrive(drive) => {
                self.resources.put_drive(drive)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::CreateSnapshot(params) => {
                let kind = match params.snapshot_type.unwrap_or_default() {
                    SnapshotType::Full => SnapshotKind::Full,
                    SnapshotType::Diff => SnapshotKind::Diff,
                };
                self.running()?
                    .snapshot_of_kind(kind, &params.snapshot_path, &params.mem_file_path)
                    .map_err(|err| match err {
                        // Firecracker's words, which its clients match on.
                        ControlError::Snapshot(SnapshotError::NotPaused) => ApiError::bad_request(
                            "Create snapshot error: Cannot save the microVM state: Operation not \
                             allowed: save/restore unavailable while running",
                        ),
                        err => ApiError::bad_request(format!("Create snapshot error: {err}")),
                    })?;
                Ok(Response::no_content())
            }
            Action::LoadSnapshot(params) => self.load_snapshot(params),
            Action::PatchDrive(update) => self.patch_drive(update),
            Action::PutLogger(logger) => {
                logger
                    .level_filter()
                    .and_then(|_| self.logging.configure(&logger))
                    .map_err(|err| ApiError::bad_request(format!("Logger error: {err}")))?;
                self.resources.logger = Some(logger);
                Ok(Response::no_content())
            }
            Action::PutMetrics(metrics) => self.put_metrics(metrics),
            Action::PutEntropy(entropy) => {
                self.resources.put_entropy(entropy)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::PutNetworkInterface(interface) => {
                self.resources.put_network_interface(interface)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::PutVsock(vsock) => {
                self.resources.put_vsock(vsock)?;
                self.boot_path = true;
                Ok(Response::no_content())
            }
            Action::Action(ActionType::InstanceStart) => self.start(),
            Action::Action(ActionType::SendCtrlAltDel) => {
                self.running()?
                    .send_ctrl_alt_del()
                    .map_err(|err| ApiError::bad_request(format!("Internal VMM error: {err}")))?;
                Ok(Response::no_content())
            }
            Action::Action(ActionType::FlushMetrics) => {
                self.flush_metrics()
                    .map_err(|err| ApiError::bad_request(format!("Internal VMM error: {err}")))?;
                Ok(Response::no_content())
            }
            Action::PatchVm(state) => self.change_state(state),
            Action::NotImplemented(what) => Err(ApiError::bad_request(format!(
                "Kiln does not implement {what}."
            ))),
        }
    }

    /// `Not started`, `Running`, `Paused`; `Ended` once the guest is gone.
    fn state_name(&self) -> &'static str {
        match self.vm.as_ref().map(VmHandle::state) {
            None | Some(VmState::NotStarted) => "Not started",
            Some(VmState::Running) => "Running",
            Some(VmState::Paused) => "Paused",
            Some(VmState::Ended) => "Ended",
        }
    }

    fn running(&self) -> Result<&VmHandle, ApiError> {
        self.vm.as_ref().ok_or_else(|| {
            ApiError::bad_request(
                "The requested operation is not supported before starting the microVM.",
            )
        })
    }

    /// Builds and starts a VM configured elsewhere (`kiln run --api-sock`: the CLI's flags, which
    /// can say more than the API, e.g. user-mode networking), as `InstanceStart` would; the API
    /// then serves it (pause, resume, snapshots). Like a boot through the API, this rules out
    /// loading a snapshot into this process.
    pub fn start_configured(&mut self, config: VmConfig) -> Result<(), ApiError> {
        if self.vm.is_some() {
            return Err(ApiError::bad_request(
                "The microVM is already running.".to_string(),
            ));
        }
        self.boot_path = true;
        self.start_vm(config).map(|_| ())
    }

    fn start(&mut self) -> Result<Response, ApiError> {
        let config = self.resources.vm_config();
        self.start_vm(config)
    }

    fn start_vm(&mut self, config: VmConfig) -> Result<Response, ApiError> {
        let start_error =
            |err: kiln_vmm::Error| ApiError::bad_request(format!("Start microvm error: {err}"));
        // The boot timer counts from InstanceStart, as Firecracker's does.
        let vm = Vm::new(config, Instant::now()).map_err(start_error)?;
        let running = vm.start().map_err(start_error)?;
        self.vm = Some(running.handle());
        log::info!("microVM '{}' started", self.instance_id);
        (self.on_start)(running);
        Ok(Response::no_content())
    }

    fn load_snapshot(&mut self, params: SnapshotLoadParams) -> Result<Response, ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Load snapshot error: {message}"));
        if self.boot_path {
            return Err(refuse(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
                    .into(),
            ));
        }
        let memory =
            match (&params.mem_file_path, &params.mem_backend) {
                (Some(path), None) => path.clone(),
                (None, Some(backend)) if backend.backend_type == BackendType::File => {
                    backend.backend_path.clone()
                }
                (None, Some(_)) => return Err(refuse(
                    "mem_backend Uffd is not supported by Kiln: it maps the memory file itself \
                     (use backend_type File)"
                        .into(),
                )),
                _ => {
                    return Err(refuse(
                        "give exactly one of mem_file_path and mem_backend".into(),
                    ))
                }
            };
        if let Some(empty) = params
            .network_overrides
            .iter()
            .find(|o| o.host_dev_name.trim().is_empty() || o.iface_id.trim().is_empty())
        {
            return Err(refuse(format!(
                "network_overrides: iface_id and host_dev_name must not be empty (got '{}' and '{}')",
                empty.iface_id, empty.host_dev_name
            )));
        }
        if params
            .vsock_override
            .as_ref()
            .is_some_and(|o| o.uds_path.trim().is_empty())
        {
            return Err(refuse("vsock_override: uds_path is empty".into()));
        }
        if params.clock_realtime == Some(true) {
            return Err(refuse(
                "clock_realtime is not supported by Kiln: the guest's clock goes on from the \
                 snapshot's time"
                    .into(),
            ));
        }
        let snapshot = read_state_file(std::path::Path::new(&params.snapshot_path))
            .map_err(|err| refuse(err.to_string()))?;
        let mut restore = RestoreConfig::new(&params.snapshot_path, memory);
        restore.console = self.resources.console.clone();
        restore.resume = params.resume_vm;
        restore.track_dirty_pages = params.track_dirty_pages.or(params.enable_diff_snapshots);
        restore.vsock_uds = params
            .vsock_override
            .as_ref()
            .map(|o| std::path::PathBuf::from(&o.uds_path));
        restore.net_overrides = params
            .network_overrides
            .iter()
            .map(|o| NetOverride {
                id: o.iface_id.clone(),
                tap: o.host_dev_name.clone(),
            })
            .collect();
        let vm = Vm::restore(&restore, Instant::now()).map_err(|err| refuse(err.to_string()))?;
        let running = vm.start().map_err(|err| refuse(err.to_string()))?;
        // What GET /vm/config shows from now on: the snapshot's machine and devices.
        let mut config = snapshot.config;
        // Checked by the restore already.
        let _ = apply_net_overrides(&mut config, &restore.net_overrides);
        self.resources.network_interfaces = config
            .nets
            .iter()
            .enumerate()
            .filter_map(|(index, net)| {
                Some(NetworkInterface {
                    iface_id: net.id.clone().unwrap_or_else(|| format!("net{index}")),
                    host_dev_name: net.tap.clone()?,
                    guest_mac: net.mac.map(|mac| mac.to_string()),
                    mtu: None,
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                })
            })
            .collect();
        self.resources.machine.vcpu_count = config.cpus;
        self.resources.machine.mem_size_mib = config.memory_mib;
        self.resources.machine.huge_pages = config.huge_pages;
        self.resources.machine.track_dirty_pages = restore
            .track_dirty_pages
            .unwrap_or(config.track_dirty_pages);
        self.resources.drives = config
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| Drive {
                drive_id: disk.id.clone().unwrap_or_else(|| format!("drive{index}")),
                path_on_host: Some(disk.path.to_string_lossy().into_owned()),
                is_root_device: disk.root,
                partuuid: disk.partuuid.clone(),
                is_read_only: disk.readonly,
                cache_type: None,
                rate_limiter: None,
                io_engine: None,
                socket: None,
            })
            .collect();
        self.resources.vsock = config.vsock.as_ref().map(|vsock| Vsock {
            guest_cid: u32::try_from(vsock.cid).unwrap_or(u32::MAX),
            uds_path: restore
                .vsock_uds
                .as_deref()
                .unwrap_or(&vsock.uds)
                .to_string_lossy()
                .into_owned(),
            vsock_id: None,
        });
        self.vm = Some(running.handle());
        log::info!(
            "microVM '{}' restored from '{}'",
            self.instance_id,
            params.snapshot_path
        );
        (self.on_start)(running);
        Ok(Response::no_content())
    }

    fn patch_drive(&mut self, update: PartialDrive) -> Result<Response, ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Drive config error: {message}"));
        if update.rate_limiter.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(refuse(
                "rate_limiter is not supported by Kiln: drives are not rate limited".into(),
            ));
        }
        let index = self
            .resources
            .drive_index(&update.drive_id)
            .ok_or_else(|| refuse(format!("there is no drive '{}'", update.drive_id)))?;
        if let Some(path) = update.path_on_host {
            self.running()?
                .replace_disk(index, std::path::Path::new(&path))
                .map_err(|err| refuse(err.to_string()))?;
            self.resources.drives[index].path_on_host = Some(path);
        }
        Ok(Response::no_content())
    }

    fn put_metrics(&mut self, metrics: Metrics) -> Result<Response, ApiError> {
        if self.metrics.is_some() {
            return Err(ApiError::bad_request(
                "Metrics error: Reinitialization of metrics not allowed.",
            ));
        }
        let writer =
            MetricsWriter::open(std::path::Path::new(&metrics.metrics_path)).map_err(|err| {
                ApiError::bad_request(format!(
                    "Metrics error: cannot open '{}': {err}",
                    metrics.metrics_path
                ))
            })?;
        self.metrics = Some(writer);
        self.resources.metrics = Some(metrics);
        Ok(Response::no_content())
    }

    fn change_state(&mut self, state: VmStateChange) -> Result<Response, ApiError> {
        let handle = self.running()?.clone();
        let began = Instant::now();
        let result = match state {
            VmStateChange::Paused => handle.pause(),
            VmStateChange::Resumed => handle.resume(),
        };
        result.map_err(|err| ApiError::bad_request(format!("Internal VMM error: {err}")))?;
        let took = Some(began.elapsed().as_micros() as u64);
        match state {
            VmStateChange::Paused => self.times.pause_us = took,
            VmStateChange::Resumed => self.times.resume_us = took,
        }
        Ok(Response::no_content())
    }

    /// Writes a metrics line now, if metrics are configured and the VM was started.
    pub fn flush_metrics(&mut self) -> std::io::Result<()> {
        let (Some(writer), Some(vm)) = (self.metrics.as_mut(), self.vm.as_ref()) else {
            return Ok(());
        };
        let ids: Vec<String> = self
            .resources
            .drives
            .iter()
            .map(|d| d.drive_id.clone())
            .collect();
        writer.write(&vm.metrics(), &ids, &self.times)
    }

    /// Whether a metrics destination is configured.
    pub fn has_metrics(&self) -> bool {
        self.metrics.is_some()
    }
}

fn json<T: Serialize>(value: &T) -> Result<Response, ApiError> {
    serde_json::to_string(value)
        .map(|body| Response::json(200, body))
        .map_err(|err| ApiError {
            status: 500,
            message: format!("cannot encode the answer: {err}"),
        })
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;
