//! A restored VM's NICs on other backends than the snapshot's: clones of one snapshot each need
//! their own TAP, or their own forwarded host ports. The guest keeps every NIC's MAC.

use super::SnapshotError;
use crate::config::{NetConfig, VmConfig};

/// A TAP device used instead of the one a snapshot's NIC was on (clones each need their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOverride {
    /// The NIC, by the id it was configured with (the API's `iface_id`).
    pub id: String,
    /// The TAP device (opened, or created when Kiln may).
    pub tap: String,
}

/// Puts each NIC on its override's TAP; refuses an override that names no TAP NIC of the
/// snapshot. The MACs are pinned first (see [`pin_macs`]).
pub fn apply_net_overrides(
    config: &mut VmConfig,
    overrides: &[NetOverride],
) -> Result<(), SnapshotError> {
    pin_macs(config);
    let refuse = |reason: String| SnapshotError::Device("net".into(), reason);
    for (index, wanted) in overrides.iter().enumerate() {
        if overrides[..index].iter().any(|o| o.id == wanted.id) {
            return Err(refuse(format!(
                "interface '{}' is overridden twice",
                wanted.id
            )));
        }
        let Some(net) = config
            .nets
            .iter_mut()
            .find(|net| net.id.as_deref() == Some(wanted.id.as_str()))
        else {
            let known: Vec<&str> = config.nets.iter().filter_map(|n| n.id.as_deref()).collect();
            return Err(refuse(format!(
                "a TAP ('{}') was given for interface '{}', which the snapshot does not have \
                 (its interfaces: {})",
                wanted.tap,
                wanted.id,
                if known.is_empty() {
                    "none with an id".to_string()
                } else {
                    known.join(", ")
                }
            )));
        };
        if net.user {
            return Err(refuse(format!(
                "interface '{}' uses user-mode networking (passt), which each restore starts \
                 anew; only a TAP interface can be given another TAP",
                wanted.id
            )));
        }
        net.tap = Some(wanted.tap.clone());
        net.tap_fd = None;
    }
    Ok(())
}

/// A NIC of the snapshot, by number, put on another backend: `tap=NAME`, `tap-fd=N` or
/// `user[,hostfwd=...]` (its MAC stays the guest's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetReplacement {
    /// Which NIC, from 0 (eth0, eth1, ... in the guest).
    pub index: usize,
    /// The new backend: its `tap`, `tap_fd`, `user` and `hostfwd` are taken; its `mac`, if
    /// set, must be the NIC's own; its `id` is not used (the NIC keeps its own).
    pub backend: NetConfig,
}

/// Puts each NIC on its replacement's backend, keeping its id and MAC. Refused: a NIC number the
/// snapshot does not have, one given twice, a MAC (the guest's driver knows the NIC by its MAC).
/// A backend without the offloads the guest negotiated is refused later, by the transport.
pub fn apply_net_replacements(
    config: &mut VmConfig,
    replacements: &[NetReplacement],
) -> Result<(), SnapshotError> {
    pin_macs(config);
    let refuse = |reason: String| SnapshotError::Device("net".into(), reason);
    for (position, wanted) in replacements.iter().enumerate() {
        let number = wanted.index + 1;
        if replacements[..position]
            .iter()
            .any(|other| other.index == wanted.index)
        {
            return Err(refuse(format!("NIC {number} is given twice")));
        }
        let count = config.nets.len();
        let Some(net) = config.nets.get_mut(wanted.index) else {
            return Err(refuse(format!(
                "NIC {number} was given a backend ({}), but the snapshot has {count} NIC(s)",
                wanted.backend.backend_name()
            )));
        };
        if wanted.backend.mac.is_some_and(|mac| Some(mac) != net.mac) {
            return Err(refuse(format!(
                "NIC {number} keeps the MAC its guest knows ({}): leave out mac=",
                net.mac.map(|mac| mac.to_string()).unwrap_or_default()
            )));
        }
        net.tap = wanted.backend.tap.clone();
        net.tap_fd = wanted.backend.tap_fd;
        net.user = wanted.backend.user;
        net.hostfwd = wanted.backend.hostfwd.clone();
    }
    Ok(())
}

/// Pins every NIC's MAC: a default MAC derives from the backend and the VM's paths, which
/// overrides change, and the guest must keep the address it has.
fn pin_macs(config: &mut VmConfig) {
    let macs = config.net_macs();
    for (net, mac) in config.nets.iter_mut().zip(macs) {
        net.mac.get_or_insert(mac);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_overrides_move_tap_nics_and_keep_every_mac() {
        let mut config = VmConfig::new("/k");
        let nic = |id: &str, spec: &str| NetConfig {
            id: Some(id.into()),
            ..spec.parse().unwrap()
        };
        config.nets = vec![nic("eth0", "tap=t0"), nic("eth1", "user")];
        let macs = config.net_macs();
        let to = |id: &str, tap: &str| NetOverride {
            id: id.into(),
            tap: tap.into(),
        };

        let mut moved = config.clone();
        apply_net_overrides(&mut moved, &[to("eth0", "t9")]).unwrap();
        assert_eq!(moved.nets[0].tap.as_deref(), Some("t9"));
        // The defaults derive from the TAP's name and the VM's paths: pinned, so unchanged.
        moved
            .disks
            .push(crate::config::DiskConfig::new("/other.img"));
        assert_eq!(moved.net_macs(), macs);
        assert!(moved.nets[1].user, "the passt NIC stays as it was");

        for (overrides, expected) in [
            (
                vec![to("eth7", "t")],
                "'eth7', which the snapshot does not have (its interfaces: eth0, eth1)",
            ),
            (vec![to("eth1", "t")], "'eth1' uses user-mode networking"),
            (
                vec![to("eth0", "a"), to("eth0", "b")],
                "'eth0' is overridden twice",
            ),
        ] {
            let err = apply_net_overrides(&mut config.clone(), &overrides).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn replacements_change_the_backend_and_keep_id_and_mac() {
        let mut config = VmConfig::new("/k");
        let nic = |id: &str, spec: &str| NetConfig {
            id: Some(id.into()),
            ..spec.parse().unwrap()
        };
        config.nets = vec![
            nic("eth0", "user,hostfwd=tcp::8080-:80"),
            nic("eth1", "tap=t0"),
        ];
        let macs = config.net_macs();
        let to = |index: usize, spec: &str| NetReplacement {
            index,
            backend: spec.parse().unwrap(),
        };

        let mut moved = config.clone();
        apply_net_replacements(
            &mut moved,
            &[to(0, "user,hostfwd=tcp::9090-:80"), to(1, "user")],
        )
        .unwrap();
        assert_eq!(
            moved.nets[0].hostfwd,
            vec!["tcp::9090-:80".parse().unwrap()]
        );
        assert!(moved.nets[1].user && moved.nets[1].tap.is_none());
        assert_eq!(moved.nets[1].id.as_deref(), Some("eth1"));
        assert_eq!(moved.net_macs(), macs);

        let same_mac = format!("user,mac={}", macs[0]);
        apply_net_replacements(&mut config.clone(), &[to(0, &same_mac)]).unwrap();
        for (replacements, expected) in [
            (
                vec![to(2, "user")],
                "NIC 3 was given a backend (user), but the snapshot has 2 NIC(s)",
            ),
            (vec![to(0, "user"), to(0, "tap=x")], "NIC 1 is given twice"),
            (
                vec![to(1, "tap=x,mac=02:00:00:00:00:09")],
                "NIC 2 keeps the MAC its guest knows",
            ),
        ] {
            let err = apply_net_replacements(&mut config.clone(), &replacements).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }
}
