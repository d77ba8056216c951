//! Host channels: the vsock device (Firecracker's hybrid vsock over a Unix socket) and the
//! entropy device.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kiln_devices::virtio::vsock::{MAX_GUEST_CID, MIN_GUEST_CID};

use super::ConfigError;

/// Room `sun_path` has for a socket path, without the NUL.
const UNIX_PATH_MAX: usize = 107;
/// The longest suffix Kiln appends for guest connections: `_4294967295`.
const PORT_SUFFIX_MAX: usize = 11;

/// A vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 to 2^32 - 2).
    pub cid: u64,
    /// The Unix socket Kiln listens on; guest connections to host port P go to `<uds>_P`.
    pub uds: PathBuf,
}

impl std::str::FromStr for VsockConfig {
    type Err = ConfigError;

    /// Parses the CLI form `cid=N,uds=PATH`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidVsockSpec {
            spec: spec.to_string(),
            reason,
        };
        let mut cid = None;
        let mut uds = None;
        for item in spec.split(',') {
            match item.split_once('=') {
                Some(("cid", value)) if cid.is_none() => {
                    cid = Some(
                        value
                            .parse::<u64>()
                            .map_err(|_| invalid(format!("cid '{value}' is not a number")))?,
                    );
                }
                Some(("uds", value)) if uds.is_none() => {
                    if value.is_empty() {
                        return Err(invalid("the uds path is empty".into()));
                    }
                    uds = Some(PathBuf::from(value));
                }
                Some(("cid" | "uds", _)) => {
                    return Err(invalid(format!("'{item}' is given twice")))
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown option '{item}'; expected cid=N and uds=PATH"
                    )))
                }
            }
        }
        Ok(Self {
            cid: cid.ok_or_else(|| invalid("no cid=N given".into()))?,
            uds: uds.ok_or_else(|| invalid("no uds=PATH given".into()))?,
        })
    }
}

impl VsockConfig {
    /// Checks the CID and the socket path (short enough for `PATH_<port>`, in an existing
    /// directory, not taken).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |problem: String| ConfigError::BadVsock {
            path: self.uds.clone(),
            problem,
        };
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.cid) {
            return Err(bad(format!(
                "has guest CID {}; it must be between {MIN_GUEST_CID} and {MAX_GUEST_CID} (0-2 and 2^32-1 are reserved)",
                self.cid
            )));
        }
        let length = self.uds.as_os_str().len();
        if length + PORT_SUFFIX_MAX > UNIX_PATH_MAX {
            return Err(bad(format!(
                "is {length} bytes long; with the '_<port>' suffix of guest connections a Unix socket path allows at most {}",
                UNIX_PATH_MAX - PORT_SUFFIX_MAX
            )));
        }
        let parent = match self.uds.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(bad(format!(
                "is in '{}', which is not an existing directory",
                parent.display()
            )));
        }
        if self.uds.symlink_metadata().is_ok() {
            return Err(bad(
                "already exists; remove it if no other VM uses it".to_string()
            ));
        }
        Ok(())
    }
}

/// The entropy device (virtio-rng): on unless turned off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Whether the guest gets the device.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Most bytes per second the guest gets (no limit when absent).
    #[serde(default)]
    pub rate_bytes_per_sec: Option<u64>,
}

fn enabled_by_default() -> bool {
    true
}

impl Default for RngConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rate_bytes_per_sec: None,
        }
    }
}

impl std::str::FromStr for RngConfig {
    type Err = ConfigError;

    /// Parses the CLI form: `on`, `off` or `rate=BYTES/s` (`K` and `M` suffixes allowed).
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: &str| ConfigError::InvalidRngSpec {
            spec: spec.to_string(),
            reason: reason.to_string(),
        };
        match spec {
            "" | "on" => return Ok(Self::default()),
            "off" => {
                return Ok(Self {
                    enabled: false,
                    rate_bytes_per_sec: None,
                })
            }
            _ => {}
        }
        let Some(rate) = spec.strip_prefix("rate=") else {
            return Err(invalid("expected on, off or rate=BYTES/s"));
        };
        let number = rate.strip_suffix("/s").unwrap_or(rate);
        let (digits, multiplier) = match number.chars().last() {
            Some('K' | 'k') => (&number[..number.len() - 1], 1024),
            Some('M' | 'm') => (&number[..number.len() - 1], 1024 * 1024),
            _ => (number, 1),
        };
        let value: u64 = digits
            .parse()
            .map_err(|_| invalid("the rate is not a whole number of bytes per second"))?;
        let bytes = value
            .checked_mul(multiplier)
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| invalid("the rate must be at least 1 byte per second"))?;
        Ok(Self {
            enabled: true,
            rate_bytes_per_sec: Some(bytes),
        })
    }
}

impl RngConfig {
    /// A rate of zero would starve the guest forever.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rate_bytes_per_sec == Some(0) {
            return Err(ConfigError::InvalidRngSpec {
                spec: "rate_bytes_per_sec: 0".into(),
                reason: "the rate must be at least 1 byte per second".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_specs_parse() {
        let config: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(config.cid, 3);
        assert_eq!(config.uds, PathBuf::from("/tmp/v.sock"));
        let swapped: VsockConfig = "uds=/tmp/v.sock,cid=3".parse().unwrap();
        assert_eq!(swapped, config);
    }

    #[test]
    fn bad_vsock_specs_say_why() {
        for (spec, reason) in [
            ("cid=3", "no uds=PATH"),
            ("uds=/tmp/x", "no cid=N"),
            ("cid=x,uds=/tmp/x", "not a number"),
            ("cid=3,uds=", "empty"),
            ("cid=3,cid=4,uds=/a", "twice"),
            ("cid=3,uds=/a,port=5", "unknown option 'port=5'"),
        ] {
            let err = spec.parse::<VsockConfig>().unwrap_err().to_string();
            assert!(err.contains(reason), "{spec}: {err}");
        }
    }

    #[test]
    fn vsock_validation_refuses_reserved_cids_and_unusable_paths() {
        let dir = std::env::temp_dir();
        let ok = VsockConfig {
            cid: 3,
            uds: dir.join(format!("kiln-vsock-cfg-{}.sock", std::process::id())),
        };
        assert_eq!(ok.validate(), Ok(()));
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let err = VsockConfig { cid, ..ok.clone() }.validate().unwrap_err();
            assert!(err.to_string().contains("guest CID"), "{cid}: {err}");
        }
        let long = VsockConfig {
            uds: PathBuf::from(format!("/tmp/{}", "x".repeat(100))),
            ..ok.clone()
        };
        assert!(long
            .validate()
            .unwrap_err()
            .to_string()
            .contains("bytes long"));
        let nowhere = VsockConfig {
            uds: PathBuf::from("/nonexistent-kiln-dir/v.sock"),
            ..ok.clone()
        };
        assert!(nowhere
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not an existing directory"));
        let taken = VsockConfig {
            uds: std::env::current_exe().unwrap(),
            ..ok
        };
        assert!(taken
            .validate()
            .unwrap_err()
            .to_string()
            .contains("already exists"));
    }

    #[test]
    fn rng_specs_parse() {
        assert_eq!("on".parse::<RngConfig>(), Ok(RngConfig::default()));
        assert!(!"off".parse::<RngConfig>().unwrap().enabled);
        for (spec, rate) in [
            ("rate=1000/s", 1000),
            ("rate=4K/s", 4096),
            ("rate=2M", 2 << 20),
        ] {
            let config: RngConfig = spec.parse().unwrap();
            assert_eq!(config.rate_bytes_per_sec, Some(rate), "{spec}");
            assert!(config.enabled);
        }
        for bad in ["rate=0/s", "rate=fast", "rate=-1/s", "sometimes"] {
            assert!(bad.parse::<RngConfig>().is_err(), "{bad}");
        }
    }
}
