//! What the API has been told before `InstanceStart`, in Firecracker's terms, and how it becomes
//! a [`VmConfig`]. Every change is checked by the same [`VmConfig`] validation the CLI uses
//! before it is kept, so a bad request leaves the earlier configuration in place.

use std::path::PathBuf;

use kiln_vmm::config::{
    host_memory_mib, DiskConfig, HugePages, MacAddress, NetConfig, VsockConfig,
};
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
    /// `PUT /network-interfaces/{id}`, in the order they were first put (the guest's eth0,
    /// eth1...).
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /entropy`.
    pub entropy: Option<EntropyDevice>,
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
            network_interfaces: Vec::new(),
            entropy: None,
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
        config.nets = self.network_interfaces.iter().map(net_config).collect();
        // Firecracker attaches an entropy device only on `PUT /entropy` (unlike `kiln run`).
        config.rng.enabled = self.entropy.is_some();
        config.rng.rate_bytes_per_sec = self
            .entropy
            .as_ref()
            .and_then(|entropy| entropy_rate(entropy).ok().flatten());
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

    /// Adds a network interface on a TAP device, or replaces the one with the same id.
    pub fn put_network_interface(&mut self, interface: NetworkInterface) -> Result<(), ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Network config error: {message}"));
        for (field, limiter) in [
            ("rx_rate_limiter", &interface.rx_rate_limiter),
            ("tx_rate_limiter", &interface.tx_rate_limiter),
        ] {
            if limiter.as_ref().is_some_and(|r| !r.is_null()) {
                return Err(refuse(format!(
                    "{field} is not supported by Kiln: network interfaces are not rate limited"
                )));
            }
        }
        if interface.mtu.is_some() {
            return Err(refuse(
                "mtu is not supported by Kiln: its virtio-net device does not offer an MTU".into(),
            ));
        }
        let mac = guest_mac(&interface).map_err(refuse)?;
        let others = self
            .network_interfaces
            .iter()
            .filter(|other| other.iface_id != interface.iface_id);
        for other in others {
            if other.host_dev_name == interface.host_dev_name {
                return Err(refuse(format!(
                    "The host device name {} is already in use.",
                    interface.host_dev_name
                )));
            }
            if mac.is_some() && guest_mac(other).ok().flatten() == mac {
                return Err(refuse(format!(
                    "The guest MAC address {} is already in use.",
                    interface.guest_mac.clone().unwrap_or_default()
                )));
            }
        }
        let mut candidate = self.clone();
        match candidate
            .network_interfaces
            .iter()
            .position(|other| other.iface_id == interface.iface_id)
        {
            Some(index) => candidate.network_interfaces[index] = interface,
            None => candidate.network_interfaces.push(interface),
        }
        candidate
            .vm_config()
            .validate_disks()
            .map_err(|err| refuse(err.to_string()))?;
        *self = candidate;
        Ok(())
    }

    /// Attaches the entropy device (a second PUT replaces its settings).
    pub fn put_entropy(&mut self, entropy: EntropyDevice) -> Result<(), ApiError> {
        let refuse =
            |message: String| ApiError::bad_request(format!("Entropy device error: {message}"));
        entropy_rate(&entropy).map_err(refuse)?;
        let mut candidate = self.clone();
        candidate.entropy = Some(entropy);
        candidate
            .vm_config()
            .validate_disks()
            .map_err(|err| refuse(err.to_string()))?;
        *self = candidate;
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
            network_interfaces: self.network_interfaces.clone(),
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
        }
    }
}

/// A Firecracker network interface as a Kiln NIC on the named TAP device (opened, or created
/// when Kiln may, at `InstanceStart`).
fn net_config(interface: &NetworkInterface) -> NetConfig {
    NetConfig {
        id: Some(interface.iface_id.clone()),
        tap: Some(interface.host_dev_name.clone()),
        mac: guest_mac(interface).ok().flatten(),
        ..NetConfig::default()
    }
}

/// The interface's `guest_mac`, parsed and checked (unicast, not all zeros).
fn guest_mac(interface: &NetworkInterface) -> Result<Option<MacAddress>, String> {
    interface
        .guest_mac
        .clone()
        .map(|text| MacAddress::try_from(text).map_err(|err| format!("guest_mac: {err}")))
        .transpose()
}

/// Firecracker's entropy rate limiter as Kiln's byte rate: its `bandwidth` bucket (`size` bytes
/// every `refill_time` ms) is a rate; Kiln has no operations limit and no one-time burst.
fn entropy_rate(entropy: &EntropyDevice) -> Result<Option<u64>, String> {
    let Some(limiter) = entropy.rate_limiter.as_ref().filter(|r| !r.is_null()) else {
        return Ok(None);
    };
    let unsupported =
        |what: &str| format!("rate_limiter {what} is not supported by Kiln (only bandwidth)");
    let object = limiter
        .as_object()
        .ok_or_else(|| "rate_limiter must be an object".to_string())?;
    if let Some(key) = object
        .keys()
        .find(|key| !matches!(key.as_str(), "bandwidth" | "ops"))
    {
        return Err(format!("rate_limiter has an unknown field {key}"));
    }
    if object.get("ops").is_some_and(|ops| !ops.is_null()) {
        return Err(unsupported("ops"));
    }
    let Some(bandwidth) = object.get("bandwidth").filter(|b| !b.is_null()) else {
        return Ok(None);
    };
    let number = |key: &str| bandwidth.get(key).and_then(serde_json::Value::as_u64);
    if bandwidth
        .get("one_time_burst")
        .is_some_and(|b| !b.is_null())
    {
        return Err(unsupported("bandwidth.one_time_burst"));
    }
    match (number("size"), number("refill_time")) {
        (Some(size), Some(refill_ms)) if size > 0 && refill_ms > 0 => {
            Ok(Some((size.saturating_mul(1000) / refill_ms).max(1)))
        }
        _ => Err(
            "rate_limiter bandwidth needs size and refill_time as positive integers".to_string(),
        ),
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
