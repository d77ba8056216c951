//! The guest's network for `kiln run --net user -- CMD`: each interface named in the spec gets
//! its address, route and name servers by DHCP from passt, with busybox's `udhcpc` and a
//! script of ours, before the command (and before a switch to a root disk, whose
//! `/etc/resolv.conf` then gets the same name servers).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The busybox Kiln puts in the initramfs when the host has `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// The script `udhcpc` runs on each lease event.
const SCRIPT_PATH: &str = "/etc/kiln-udhcpc.script";
/// Where the name servers go (the command's root gets a copy).
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// `udhcpc -s` script: configures the interface from the lease (busybox sets `interface`,
/// `ip`, `mask`, `router`, `dns`, `domain`).
const SCRIPT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
case "$1" in
deconfig)
    $bb ip -4 addr flush dev "$interface"
    $bb ip link set "$interface" up
    ;;
bound|renew)
    $bb ip -4 addr flush dev "$interface"
    $bb ip addr add "$ip/${mask:-24}" dev "$interface"
    for gateway in $router; do
        $bb ip route add default via "$gateway" dev "$interface"
        break
    done
    : >/etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
    for server in $dns; do
        echo "nameserver $server" >>/etc/resolv.conf
    done
    ;;
esac
exit 0
"#;

/// Configures `interfaces` by DHCP; returns warnings for the user (an interface without a
/// lease, no busybox in the guest).
pub fn configure(interfaces: &[String]) -> Vec<String> {
    if interfaces.is_empty() {
        return Vec::new();
    }
    if !Path::new(BUSYBOX).exists() {
        return vec![format!(
            "--net user: the guest has no busybox (install busybox-static on the host; with a \
             root disk kiln-init does not configure the network), so {} has no address",
            interfaces.join(", ")
        )];
    }
    let script = fs::create_dir_all("/etc")
        .and_then(|()| fs::write(SCRIPT_PATH, SCRIPT))
        .and_then(|()| fs::set_permissions(SCRIPT_PATH, fs::Permissions::from_mode(0o755)));
    if let Err(err) = script {
        return vec![format!("--net user: cannot write {SCRIPT_PATH}: {err}")];
    }
    let mut warnings = Vec::new();
    for interface in interfaces {
        // Foreground, quit once leased, give up after 10 tries a second apart.
        let status = Command::new(BUSYBOX)
            .args(["udhcpc", "-f", "-q", "-n", "-t", "10", "-T", "1", "-i"])
            .arg(interface)
            .args(["-s", SCRIPT_PATH])
            .stdin(Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => warnings.push(format!(
                "--net user: no DHCP lease for {interface} (udhcpc: {status})"
            )),
            Err(err) => warnings.push(format!("--net user: cannot run udhcpc: {err}")),
        }
    }
    warnings
}
