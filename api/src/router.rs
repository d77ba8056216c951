//! From an HTTP request to what it asks for: Firecracker's paths and methods, its body
//! rules (GET has none, PUT and PATCH need one) and its error messages.

use serde::de::DeserializeOwned;

use crate::http::Method;
use crate::model::*;
use crate::ApiError;

/// One API request, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`.
    GetFullConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /machine-config` (all fields; unset optional ones get their defaults).
    PutMachineConfig(MachineConfigUpdate),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /entropy`.
    PutEntropy(EntropyDevice),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmStateChange),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// A Firecracker endpoint Kiln does not implement (balloon, MMDS, snapshots...).
    NotImplemented(&'static str),
}

impl Action {
    /// Parses a request as Firecracker would.
    pub fn parse(method: &Method, path: &str, body: Option<&[u8]>) -> Result<Action, ApiError> {
        let segments: Vec<&str> = path.trim_start_matches('/').split_terminator('/').collect();
        let first = segments.first().copied().unwrap_or("");
        let rest = segments.get(1..).unwrap_or(&[]);
        let invalid = || {
            ApiError::bad_request(format!(
                "Invalid request method and/or path: {} {path}.",
                method.as_str()
            ))
        };
        match (method, body) {
            (Method::Get, Some(_)) if known_path(first) => {
                return Err(ApiError::bad_request("GET request cannot have a body."))
            }
            (Method::Put, None) if known_path(first) => {
                return Err(ApiError::bad_request("Empty PUT request."))
            }
            (Method::Patch, None) if known_path(first) => {
                return Err(ApiError::bad_request("Empty PATCH request."))
            }
            _ => {}
        }
        let body = body.unwrap_or_default();
        let action = match (method, first, rest) {
            (Method::Get, "", []) => Action::GetInstanceInfo,
            (Method::Get, "version", []) => Action::GetVersion,
            (Method::Get, "vm", ["config"]) => Action::GetFullConfig,
            (Method::Get, "machine-config", []) => Action::GetMachineConfig,
            (Method::Put, "boot-source", []) => Action::PutBootSource(json(body)?),
            (Method::Put, "machine-config", []) => {
                Action::PutMachineConfig(json::<MachineConfiguration>(body)?.into())
            }
            (Method::Patch, "machine-config", []) => {
                let update: MachineConfigUpdate = json(body)?;
                if update.is_empty() {
                    return Err(ApiError::bad_request("Empty PATCH request."));
                }
                Action::PatchMachineConfig(update)
            }
            (Method::Put, "drives", ids) => {
                let id = path_id(ids)?;
                let drive: Drive = json(body)?;
                same_id(id, &drive.drive_id)?;
                Action::PutDrive(drive)
            }
            (Method::Patch, "drives", ids) => {
                let id = path_id(ids)?;
                let drive: PartialDrive = json(body)?;
                same_id(id, &drive.drive_id)?;
                Action::PatchDrive(drive)
            }
            (Method::Put, "logger", []) => Action::PutLogger(json(body)?),
            (Method::Put, "metrics", []) => Action::PutMetrics(json(body)?),
            (Method::Put, "entropy", []) => Action::PutEntropy(json(body)?),
            (Method::Put, "network-interfaces", ids) => {
                let id = path_id(ids)?;
                let interface: NetworkInterface = json(body)?;
                same_id(id, &interface.iface_id)?;
                Action::PutNetworkInterface(interface)
            }
            (Method::Put, "vsock", []) => Action::PutVsock(json(body)?),
            (Method::Put, "actions", []) => {
                Action::Action(json::<InstanceActionInfo>(body)?.action_type)
            }
            (Method::Patch, "vm", []) => Action::PatchVm(json::<Vm>(body)?.state),
            (Method::Put, "snapshot", ["create"]) => Action::CreateSnapshot(json(body)?),
            (Method::Put, "snapshot", ["load"]) => Action::LoadSnapshot(json(body)?),
            (Method::Get | Method::Put | Method::Patch, endpoint, _) => {
                match not_implemented(method, endpoint) {
                    Some(what) => Action::NotImplemented(what),
                    None => return Err(invalid()),
                }
            }
            (Method::Other(_), _, _) => return Err(invalid()),
        };
        Ok(action)
    }

    /// Whether Firecracker allows it before `InstanceStart` / after it.
    pub fn allowed(&self, started: bool) -> bool {
        match self {
            Action::GetInstanceInfo
            | Action::GetVersion
            | Action::GetFullConfig
            | Action::GetMachineConfig
            | Action::NotImplemented(_) => true,
            Action::PutBootSource(_)
            | Action::PutMachineConfig(_)
            | Action::PatchMachineConfig(_)
            | Action::PutDrive(_)
            | Action::PutLogger(_)
            | Action::PutMetrics(_)
            | Action::PutEntropy(_)
            | Action::PutNetworkInterface(_)
            | Action::PutVsock(_)
            | Action::LoadSnapshot(_)
            | Action::Action(ActionType::InstanceStart) => !started,
            Action::PatchDrive(_)
            | Action::PatchVm(_)
            | Action::CreateSnapshot(_)
            | Action::Action(ActionType::FlushMetrics | ActionType::SendCtrlAltDel) => started,
        }
    }
}

/// Paths Firecracker routes (for its body-presence errors).
fn known_path(first: &str) -> bool {
    matches!(
        first,
        "" | "version"
            | "vm"
            | "machine-config"
            | "boot-source"
            | "drives"
            | "logger"
            | "metrics"
            | "entropy"
            | "network-interfaces"
            | "vsock"
            | "actions"
            | "balloon"
            | "mmds"
            | "snapshot"
            | "cpu-config"
            | "serial"
            | "hotplug"
            | "pmem"
    )
}

/// Firecracker endpoints Kiln answers with a refusal that says so.
fn not_implemented(method: &Method, endpoint: &str) -> Option<&'static str> {
    Some(match (method, endpoint) {
        (_, "balloon") => "the balloon device (/balloon)",
        (_, "mmds") => "the microVM metadata service (/mmds)",
        (Method::Put, "cpu-config") => "custom CPU templates (/cpu-config)",
        (Method::Put, "serial") => "serial console configuration (/serial)",
        (_, "hotplug") => "memory hotplug (/hotplug/memory)",
        (_, "pmem") => "virtio-pmem devices (/pmem)",
        (Method::Patch, "network-interfaces") => {
            "network interface rate limiter updates (PATCH /network-interfaces)"
        }
        _ => return None,
    })
}

/// Deserializes a body the way Firecracker reports its errors.
fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request(format!(
            "An error occurred when deserializing the json body of a request: {err}."
        ))
    })
}

/// The single `{id}` segment of `/drives/{id}`-like paths, checked as Firecracker does.
fn path_id<'a>(segments: &[&'a str]) -> Result<&'a str, ApiError> {
    match segments {
        [] | [""] => Err(ApiError::bad_request("The ID cannot be empty.")),
        [id] => {
            if id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()) {
                Ok(id)
            } else {
                Err(ApiError::bad_request(
                    "API Resource IDs can only contain alphanumeric characters and underscores.",
                ))
            }
        }
        _ => Err(ApiError::bad_request(format!(
            "Invalid request path: '{}' has more than one id segment.",
            segments.join("/")
        ))),
    }
}

fn same_id(path: &str, body: &str) -> Result<(), ApiError> {
    if path == body {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "The id from the path does not match the id from the body!",
        ))
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
