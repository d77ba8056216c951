//! Firecracker's `--config-file`: the same bodies as the API, one key per endpoint, applied in
//! Firecracker's order and followed by `InstanceStart`.

use serde::Deserialize;

use crate::controller::Controller;
use crate::model::*;
use crate::router::Action;
use crate::ApiError;

/// The JSON layout of a Firecracker configuration file. Unlike Firecracker, Kiln refuses
/// unknown keys (a typo would otherwise configure nothing, silently).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `PUT /boot-source`.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// `PUT /drives/{id}` for each.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `PUT /machine-config`.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfiguration>,
    /// `PUT /logger`.
    #[serde(default)]
    pub logger: Option<Logger>,
    /// `PUT /metrics`.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// `PUT /network-interfaces/{id}` for each.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /vsock`.
    #[serde(default)]
    pub vsock: Option<Vsock>,
    /// `PUT /entropy`.
    #[serde(default)]
    pub entropy: Option<EntropyDevice>,
    /// Balloon device (not in Kiln).
    #[serde(default)]
    pub balloon: Option<serde_json::Value>,
    /// MMDS (not in Kiln).
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<serde_json::Value>,
    /// CPU template file (not in Kiln).
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
}

impl ConfigFile {
    /// Parses the file's text; errors name the field, line and column.
    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|err| err.to_string())
    }

    /// The API requests that configure the same microVM, in Firecracker's order, ending with
    /// `InstanceStart`. Features Kiln lacks are refused by name.
    pub fn actions(self) -> Result<Vec<Action>, ApiError> {
        let absent = |key: &str, value: &Option<serde_json::Value>| match value {
            Some(value) if !value.is_null() => Err(ApiError::bad_request(format!(
                "\"{key}\" is not supported by Kiln: {}",
                match key {
                    "balloon" => "it has no balloon device",
                    "mmds-config" => "it has no microVM metadata service",
                    _ => "it has no custom CPU templates",
                }
            ))),
            _ => Ok(()),
        };
        absent("balloon", &self.balloon)?;
        absent("mmds-config", &self.mmds_config)?;
        absent("cpu-config", &self.cpu_config)?;
        let mut actions = Vec::new();
        if let Some(logger) = self.logger {
            actions.push(Action::PutLogger(logger));
        }
        if let Some(metrics) = self.metrics {
            actions.push(Action::PutMetrics(metrics));
        }
        if let Some(machine) = self.machine_config {
            actions.push(Action::PutMachineConfig(machine.into()));
        }
        actions.push(Action::PutBootSource(self.boot_source));
        actions.extend(self.drives.into_iter().map(Action::PutDrive));
        actions.extend(
            self.network_interfaces
                .into_iter()
                .map(Action::PutNetworkInterface),
        );
        actions.extend(self.vsock.map(Action::PutVsock));
        actions.extend(self.entropy.map(Action::PutEntropy));
        actions.push(Action::Action(ActionType::InstanceStart));
        Ok(actions)
    }

    /// Configures and starts the microVM through `controller`; the first refusal stops it.
    pub fn apply(self, controller: &mut Controller) -> Result<(), ApiError> {
        for action in self.actions()? {
            controller.execute(action)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{
      "boot-source": {
        "kernel_image_path": "vmlinux",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": null
      },
      "drives": [
        {
          "drive_id": "rootfs",
          "path_on_host": "rootfs.ext4",
          "is_root_device": true,
          "partuuid": null,
          "is_read_only": false,
          "cache_type": "Unsafe",
          "io_engine": "Sync",
          "rate_limiter": null
        }
      ],
      "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": false,
        "track_dirty_pages": false,
        "huge_pages": "None"
      },
      "cpu-config": null,
      "balloon": null,
      "network-interfaces": [],
      "vsock": null,
      "logger": null,
      "metrics": null,
      "mmds-config": null,
      "entropy": null
    }"#;

    #[test]
    fn firecrackers_getting_started_file_becomes_api_requests() {
        let actions = ConfigFile::parse(EXAMPLE).unwrap().actions().unwrap();
        assert!(matches!(
            actions[0],
            Action::PutMachineConfig(MachineConfigUpdate {
                vcpu_count: Some(2),
                mem_size_mib: Some(1024),
                huge_pages: Some(HugePages::None),
                ..
            })
        ));
        assert!(
            matches!(&actions[1], Action::PutBootSource(b) if b.kernel_image_path == "vmlinux")
        );
        assert!(matches!(&actions[2], Action::PutDrive(d) if d.drive_id == "rootfs"));
        assert_eq!(actions[3], Action::Action(ActionType::InstanceStart));
        assert_eq!(actions.len(), 4);
    }

    #[test]
    fn unknown_keys_and_missing_features_are_named() {
        let err = ConfigFile::parse(r#"{"boot-source": {"kernel_image_path": "k"}, "drive": []}"#)
            .unwrap_err();
        assert!(err.contains("unknown field `drive`"), "{err}");
        let err = ConfigFile::parse(r#"{"drives": []}"#).unwrap_err();
        assert!(err.contains("missing field `boot-source`"), "{err}");
        let err = ConfigFile::parse(
            r#"{"boot-source": {"kernel_image_path": "k"}, "balloon": {"amount_mib": 1, "deflate_on_oom": false}}"#,
        )
        .unwrap()
        .actions()
        .unwrap_err();
        assert!(
            err.message.contains("\"balloon\" is not supported"),
            "{err:?}"
        );
    }
}
