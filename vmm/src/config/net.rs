//! NICs: a TAP interface (by name or as an open descriptor) or user-mode NAT through passt.

use std::hash::Hasher;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use kiln_devices::virtio::net::passt::PortForward;
use kiln_devices::virtio::net::tap::MAX_NAME_LEN;
use kiln_devices::virtio::net::MacAddress;

use super::ConfigError;

/// One NIC. Exactly one of `tap`, `tap_fd` and `user` says what is behind it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The API's `iface_id` (a snapshot load's `network_overrides` name NICs by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// An existing TAP interface (created if Kiln has CAP_NET_ADMIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// An open TAP descriptor Kiln inherited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<i32>,
    /// User-mode NAT through a passt child (no privileges needed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user: bool,
    /// Host TCP ports forwarded to the guest (`user` only), QEMU's
    /// `tcp:[ADDR]:HOSTPORT-:GUESTPORT`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostfwd: Vec<HostForward>,
    /// The NIC's MAC address (a stable one derived from the config when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
}

/// One forwarded host TCP port, written as QEMU writes it: `tcp:[ADDR]:HOSTPORT-:GUESTPORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostForward(pub PortForward);

impl std::str::FromStr for HostForward {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let rest = match text.split_once(':') {
            Some(("tcp", rest)) => rest,
            Some(("udp", _)) => {
                return Err(format!(
                    "'{text}': only tcp ports can be forwarded (hostfwd=tcp:...)"
                ))
            }
            _ => {
                return Err(format!(
                    "'{text}' is not tcp:[ADDR]:HOSTPORT-:GUESTPORT (e.g. tcp::8080-:80)"
                ))
            }
        };
        let shape =
            || format!("'{text}' is not tcp:[ADDR]:HOSTPORT-:GUESTPORT (e.g. tcp::8080-:80)");
        let (host, guest) = rest.split_once('-').ok_or_else(shape)?;
        let (address, host_port) = host.rsplit_once(':').ok_or_else(shape)?;
        let (guest_address, guest_port) = guest.rsplit_once(':').ok_or_else(shape)?;
        if !guest_address.is_empty() {
            return Err(format!(
                "'{text}': a guest address cannot be given; connections go to the guest's own address (write tcp:{host}-:{guest_port})"
            ));
        }
        let address = match address.trim_start_matches('[').trim_end_matches(']') {
            "" => None,
            address => Some(
                address
                    .parse::<IpAddr>()
                    .map_err(|_| format!("'{text}': '{address}' is not an IP address"))?,
            ),
        };
        let port = |value: &str, which: &str| {
            value
                .parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| {
                    format!("'{text}': {which} port '{value}' is not a port number (1-65535)")
                })
        };
        Ok(Self(PortForward {
            address,
            host_port: port(host_port, "host")?,
            guest_port: port(guest_port, "guest")?,
        }))
    }
}

impl TryFrom<String> for HostForward {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<HostForward> for String {
    fn from(forward: HostForward) -> Self {
        let PortForward {
            address,
            host_port,
            guest_port,
        } = forward.0;
        match address {
            Some(IpAddr::V6(v6)) => format!("tcp:[{v6}]:{host_port}-:{guest_port}"),
            Some(v4) => format!("tcp:{v4}:{host_port}-:{guest_port}"),
            None => format!("tcp::{host_port}-:{guest_port}"),
        }
    }
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses the CLI forms `tap=NAME`, `tap-fd=N` and `user[,hostfwd=...]...`, each with an
    /// optional `,mac=MAC`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| ConfigError::InvalidNetSpec {
            spec: spec.to_string(),
            reason,
        };
        let mut config = NetConfig::default();
        for item in spec.split(',') {
            let twice = || invalid(format!("'{item}' is given twice"));
            match item.split_once('=') {
                None if item == "user" => {
                    if config.user {
                        return Err(twice());
                    }
                    config.user = true;
                }
                Some(("tap", name)) => {
                    if config.tap.replace(name.to_string()).is_some() {
                        return Err(twice());
                    }
                }
                Some(("tap-fd", fd)) => {
                    let fd = fd.parse::<i32>().ok().filter(|fd| *fd >= 0).ok_or_else(|| {
                        invalid(format!("tap-fd '{fd}' is not a descriptor number"))
                    })?;
                    if config.tap_fd.replace(fd).is_some() {
                        return Err(twice());
                    }
                }
                Some(("mac", mac)) => {
                    let mac = mac
                        .parse()
                        .map_err(|e: kiln_devices::virtio::net::MacError| invalid(e.to_string()))?;
                    if config.mac.replace(mac).is_some() {
                        return Err(twice());
                    }
                }
                Some(("hostfwd", forward)) => config.hostfwd.push(forward.parse().map_err(invalid)?),
                _ => {
                    return Err(invalid(format!(
                        "unknown option '{item}'; expected tap=NAME, tap-fd=N or user, with hostfwd=tcp:[ADDR]:HOSTPORT-:GUESTPORT (user) and mac=MAC"
                    )))
                }
            }
        }
        config.check().map_err(invalid)?;
        Ok(config)
    }
}

impl NetConfig {
    /// What is behind the NIC, for messages: `tap tap0`, `tap-fd 5`, `user`.
    pub fn backend_name(&self) -> String {
        match (&self.tap, self.tap_fd) {
            (Some(name), _) => format!("tap {name}"),
            (None, Some(fd)) => format!("tap-fd {fd}"),
            _ => "user".to_string(),
        }
    }

    /// Exactly one backend, options that fit it.
    fn check(&self) -> Result<(), String> {
        let backends = usize::from(self.tap.is_some())
            + usize::from(self.tap_fd.is_some())
            + usize::from(self.user);
        if backends != 1 {
            return Err(format!(
                "{} backends given; a NIC needs exactly one of tap=NAME, tap-fd=N and user",
                backends
            ));
        }
        if !self.user && !self.hostfwd.is_empty() {
            return Err("hostfwd works only with user (passt) networking; a TAP NIC is reached at the guest's own address".into());
        }
        if let Some(name) = &self.tap {
            if name.is_empty()
                || name.len() > MAX_NAME_LEN
                || name
                    .bytes()
                    .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
            {
                return Err(format!(
                    "'{name}' is not a valid interface name (1 to {MAX_NAME_LEN} bytes, no '/', ':' or spaces)"
                ));
            }
        }
        let mut ports: Vec<u16> = self.hostfwd.iter().map(|f| f.0.host_port).collect();
        ports.sort_unstable();
        if let Some(pair) = ports.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(format!("host port {} is forwarded twice", pair[0]));
        }
        Ok(())
    }
}

/// Checks every NIC and that no TAP interface or MAC is used twice.
pub fn validate_nets(nets: &[NetConfig], macs: &[MacAddress]) -> Result<(), ConfigError> {
    for (index, net) in nets.iter().enumerate() {
        net.check()
            .map_err(|problem| ConfigError::BadNet { index, problem })?;
        let twice = nets[..index].iter().any(|earlier| {
            (net.tap.is_some() && earlier.tap == net.tap)
                || (net.tap_fd.is_some() && earlier.tap_fd == net.tap_fd)
        });
        if twice {
            return Err(ConfigError::BadNet {
                index,
                problem: format!("{} is already used by another NIC", net.backend_name()),
            });
        }
        if macs[..index].contains(&macs[index]) {
            return Err(ConfigError::BadNet {
                index,
                problem: format!("MAC address {} is already used by another NIC", macs[index]),
            });
        }
    }
    Ok(())
}

/// A stable MAC for NIC `index` of a VM: locally administered, unicast, the same for the same
/// config on every run. `identity` names the VM (its kernel, disks and sockets), so that two
/// VMs with different disks on one bridge get different addresses.
pub fn default_mac(identity: &[&[u8]], index: usize, net: &NetConfig) -> MacAddress {
    // FNV-1a: stable across Rust versions and platforms, unlike std's hashers.
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for byte in bytes {
                self.0 ^= u64::from(*byte);
                self.0 = self.0.wrapping_mul(0x100_0000_01b3);
            }
        }
    }
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    for part in identity {
        hash.write(part);
        hash.write(&[0]);
    }
    hash.write(&(index as u64).to_le_bytes());
    hash.write(net.backend_name().as_bytes());
    let bytes = hash.finish().to_le_bytes();
    // 0x02: locally administered, unicast; 0x4b: 'K'.
    MacAddress([0x02, 0x4b, bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
