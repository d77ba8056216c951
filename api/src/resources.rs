//! What the API has been told before `InstanceStart`, in Firecracker's terms, and how it becomes
//! a [`VmConfig`]. Every change is checked by the same [`VmConfig`] validation the CLI uses
//! before it is kept, so a bad request leaves the earlier configuration in place.

use std::path::PathBuf;

use kiln_vmm::config::{host_memory_mib, DiskConfig, HugePages, VsockConfig};
use kiln_vmm::{ConsoleConfig, VmConfig};

use crate::model::*;
use crate::ApiError;

/// Firecracker's kernel command line when `boot_args` is not given.
pub const FIRECRACKER_DEFAULT_CMDLINE: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
     i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";
/// Firecracker's default vCPU count.
pub const DEFAULT_VCPUS: u8 = 1;
/// Firecracker's default memory size.
pub const DEFAULT_MEM_MIB: u32 = 128;

/// The microVM as configured so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    /// `PUT /boot-source`.
    pub boot_source: Option<BootSource>,
    /// `PUT|PATCH /machine-config`, or the defaults.
    pub machine: MachineConfiguration,
    /// `PUT /drives/{id}`, the root drive first.
    pub drives: Vec<Drive>,
    /// `PUT /logger`.
    pub logger: Option<Logger>,
    /// `PUT /metrics`.
    pub metrics: Option<Metrics>,
    /// `PUT /vsock`.
    pub vsock: Option<Vsock>,
    /// Where the guest console goes (the process's stdio for `kiln fc`).
    pub console: ConsoleConfig,
}

impl Resources {
    /// Nothing configured: Firecracker's defaults (1 vCPU, 128 MiB) and Kiln's huge pages.
    pub fn new(console: ConsoleConfig) -> Self {
        Self {
            boot_source: None,
            machine: MachineConfiguration {
                vcpu_count: DEFAULT_VCPUS,
                mem_size_mib: DEFAULT_MEM_MIB,
                smt: false,
                cpu_template: None,
                track_dirty_pages: false,
                huge_pages: HugePages::default(),
            },
            drives: Vec::new(),
            logger: None,
            metrics: None,
            vsock: None,
            console,
        }
    }

    /// The configuration Kiln builds the VM from.
    pub fn vm_config(&self) -> VmConfig {
        let boot = self.boot_source.clone().unwrap_or_default();
        let mut config = VmConfig::new(boot.kernel_image_path);
        config.initrd = boot.initrd_path.map(PathBuf::from);
        config.cmdline = Some(
            boot.boot_args
                .unwrap_or_else(|| FIRECRACKER_DEFAULT_CMDLINE.to_string()),
        );
        config.default_cmdline = false;
        config.cpus = self.machine.vcpu_count;
        config.memory_mib = self.machine.mem_size_mib;
        config.huge_pages = self.machine.huge_pages;
        config.track_dirty_pages = self.machine.track_dirty_pages;
        config.console = self.console.clone();
        config.disks = self.drives.iter().map(disk_config).collect();
        config.vsock = self.vsock.as_ref().map(vsock_config);
        // Firecracker attaches an entropy device only on `PUT /entropy`, which Kiln's API does
        // not take yet: no rng, unlike `kiln run`.
        config.rng.enabled = false;
        config
    }

    /// Sets the boot source if the kernel and initrd are there and the command line fits.
    pub fn set_boot_source(&mut self, boot_source: BootSource) -> Result<(), ApiError> {
        let mut candidate = self.clone();
        candidate.boot_source = Some(boot_source);
        let config = candidate.vm_config();
        config
            .validate_boot_source()
            .and_then(|()| config.validate_cmdline())
            .map_err(|err| ApiError::bad_request(format!("Boot source error: {err}")))?;
        *self = candidate;
        Ok(())
    }

    /// Applies a machine configuration change if it is valid as a whole.
    pub fn update_machine(&mut self, update: &MachineConfigUpdate) -> Result<(), ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Machine config error: {message}"));
        if update.smt == Some(true) {
            return Err(refuse(
                "smt (simultaneous multithreading) is not supported by Kiln: its vCPUs have no \
                 SMT siblings; leave smt out or set it to false"
                    .into(),
            ));
        }
        if let Some(template) = update.cpu_template.filter(|t| *t != CpuTemplate::None) {
            return Err(refuse(format!(
                "cpu_template {template:?} is not supported by Kiln: it has no CPU templates; \
                 leave cpu_template out or set it to \"None\""
            )));
        }
        let mut machine = self.machine.clone();
        if let Some(count) = update.vcpu_count {
            machine.vcpu_count = count;
        }
        if let Some(mib) = update.mem_size_mib {
            machine.mem_size_mib = mib;
        }
        if let Some(huge_pages) = update.huge_pages {
            machine.huge_pages = huge_pages;
        }
        if let Some(track) = update.track_dirty_pages {
            machine.track_dirty_pages = track;
        }
        let mut candidate = self.clone();
        candidate.machine = machine;
        candidate
            .vm_config()
            .validate_machine(host_memory_mib())
            .map_err(|err| refuse(err.to_string()))?;
        *self = candidate;
        Ok(())
    }

    /// Adds a drive, or replaces the one with the same id; the root drive goes first.
    pub fn put_drive(&mut self, drive: Drive) -> Result<(), ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Drive config error: {message}"));
        if drive.socket.is_some() {
            return Err(refuse(
                "socket (a vhost-user block backend) is not supported by Kiln; give \
                 path_on_host instead"
                    .into(),
            ));
        }
        if drive.path_on_host.is_none() {
            return Err(refuse("path_on_host is required".into()));
        }
        if drive.rate_limiter.as_ref().is_some_and(|r| !r.is_null()) {
            return Err(refuse(
                "rate_limiter is not supported by Kiln: drives are not rate limited".into(),
            ));
        }
        if drive.io_engine == Some(IoEngine::Async) {
            return Err(refuse(
                "io_engine Async is not supported by Kiln: each disk is served by its own I/O \
                 thread (Sync)"
                    .into(),
            ));
        }
        let mut drives = self.drives.clone();
        let existing = drives.iter().position(|d| d.drive_id == drive.drive_id);
        let root_elsewhere = drives
            .iter()
            .any(|d| d.is_root_device && d.drive_id != drive.drive_id);
        if drive.is_root_device && root_elsewhere {
            return Err(refuse("A root block device already exists!".into()));
        }
        match existing {
            Some(index) => drives[index] = drive,
            None if drive.is_root_device => drives.insert(0, drive),
            None => drives.push(drive),
        }
        // The root drive is always the first (Firecracker's /dev/vda).
        if let Some(root) = drives.iter().position(|d| d.is_root_device) {
            let root_drive = drives.remove(root);
            drives.insert(0, root_drive);
        }
        let mut candidate = self.clone();
        candidate.drives = drives;
        candidate
            .vm_config()
            .validate_disks()
            .map_err(|err| refuse(err.to_string()))?;
        *self = candidate;
        Ok(())
    }

    /// Sets the vsock device (Firecracker's one per VM; a second PUT replaces it) if its CID
    /// and socket path are usable.
    pub fn put_vsock(&mut self, vsock: Vsock) -> Result<(), ApiError> {
        vsock_config(&vsock)
            .validate()
            .map_err(|err| ApiError::bad_request(format!("Vsock config error: {err}")))?;
        self.vsock = Some(vsock);
        Ok(())
    }

    /// The position of drive `id` among the guest's disks.
    pub fn drive_index(&self, id: &str) -> Option<usize> {
        self.drives.iter().position(|d| d.drive_id == id)
    }

    /// `GET /vm/config`.
    pub fn full_configuration(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            balloon: None,
            drives: self.drives.clone(),
            boot_source: self.boot_source.clone().unwrap_or_default(),
            cpu_config: None,
            logger: self.logger.clone(),
            machine_config: self.machine.clone(),
            metrics: self.metrics.clone(),
            mmds_config: None,
            network_interfaces: Vec::new(),
            vsock: self.vsock.clone(),
            entropy: None,
        }
    }
}

/// Firecracker's vsock device as Kiln's.
fn vsock_config(vsock: &Vsock) -> VsockConfig {
    VsockConfig {
        cid: u64::from(vsock.guest_cid),
        uds: PathBuf::from(&vsock.uds_path),
    }
}

/// A Firecracker drive as a Kiln disk. The drive id is the serial the guest sees when it fits
/// virtio's 20 bytes; otherwise Kiln's default (the image's file name).
fn disk_config(drive: &Drive) -> DiskConfig {
    DiskConfig {
        path: PathBuf::from(drive.path_on_host.clone().unwrap_or_default()),
        readonly: drive.is_read_only,
        root: drive.is_root_device,
        id: (drive.drive_id.len() <= 20).then(|| drive.drive_id.clone()),
        // Firecracker drives are raw; a qcow2 image is detected (and refused with a backing file).
        format: None,
        partuuid: drive.partuuid.clone(),
    }
}

#[cfg(test)]
#[path = "resources_tests.rs"]
mod tests;
