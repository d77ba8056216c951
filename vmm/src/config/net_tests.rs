use super::*;

#[test]
fn net_specs_parse() {
    let tap: NetConfig = "tap=tap0".parse().unwrap();
    assert_eq!(tap.tap.as_deref(), Some("tap0"));
    assert_eq!(tap.mac, None);
    let with_mac: NetConfig = "tap=tap1,mac=02:00:00:00:00:07".parse().unwrap();
    assert_eq!(with_mac.mac, Some(MacAddress([2, 0, 0, 0, 0, 7])));
    let fd: NetConfig = "tap-fd=5".parse().unwrap();
    assert_eq!(fd.tap_fd, Some(5));
    let user: NetConfig = "user,hostfwd=tcp::8080-:80,hostfwd=tcp:127.0.0.1:2222-:22"
        .parse()
        .unwrap();
    assert!(user.user);
    assert_eq!(
        user.hostfwd,
        vec![
            HostForward(PortForward {
                address: None,
                host_port: 8080,
                guest_port: 80
            }),
            HostForward(PortForward {
                address: Some("127.0.0.1".parse().unwrap()),
                host_port: 2222,
                guest_port: 22
            }),
        ]
    );
    let v6: NetConfig = "user,hostfwd=tcp:[::1]:8080-:80".parse().unwrap();
    assert_eq!(v6.hostfwd[0].0.address, Some("::1".parse().unwrap()));
}

#[test]
fn bad_net_specs_say_why() {
    for (spec, reason) in [
        ("", "unknown option"),
        ("tap=a,tap=b", "given twice"),
        ("tap=tap0,user", "2 backends"),
        ("mac=02:00:00:00:00:01", "0 backends"),
        ("tap=tap0,hostfwd=tcp::80-:80", "only with user"),
        ("tap=a-name-far-too-long", "not a valid interface name"),
        ("tap-fd=-1", "not a descriptor"),
        ("tap-fd=x", "not a descriptor"),
        ("tap=tap0,mac=01:00:00:00:00:01", "multicast"),
        ("tap=tap0,mac=02:00:00:00:01", "not a MAC"),
        ("user,hostfwd=udp::53-:53", "only tcp"),
        ("user,hostfwd=tcp::0-:80", "not a port number"),
        ("user,hostfwd=tcp::80-:70000", "not a port number"),
        ("user,hostfwd=tcp::80-10.0.0.2:80", "guest address cannot"),
        ("user,hostfwd=tcp:nowhere:80-:80", "not an IP address"),
        ("user,hostfwd=tcp:8080:80", "is not tcp:"),
        (
            "user,hostfwd=tcp::80-:80,hostfwd=tcp::80-:81",
            "forwarded twice",
        ),
        ("user,vlan=3", "unknown option 'vlan=3'"),
    ] {
        let err = spec.parse::<NetConfig>().unwrap_err().to_string();
        assert!(err.contains(reason), "{spec}: {err}");
    }
}

#[test]
fn net_configs_round_trip_through_json() {
    let config: NetConfig = "user,hostfwd=tcp:[::1]:8080-:80,mac=02:4b:00:00:00:01"
        .parse()
        .unwrap();
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(
        json,
        r#"{"user":true,"hostfwd":["tcp:[::1]:8080-:80"],"mac":"02:4b:00:00:00:01"}"#
    );
    assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), config);
    let err = serde_json::from_str::<NetConfig>(r#"{"tap":"t","mac":"ff:ff:ff:ff:ff:ff"}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multicast"), "{err}");
}

#[test]
fn default_macs_are_stable_unicast_and_differ_per_nic_and_vm() {
    let tap: NetConfig = "tap=tap0".parse().unwrap();
    let user: NetConfig = "user".parse().unwrap();
    let vm_a: &[&[u8]] = &[b"/boot/vmlinux", b"/images/a.img"];
    let vm_b: &[&[u8]] = &[b"/boot/vmlinux", b"/images/b.img"];
    let first = default_mac(vm_a, 0, &tap);
    assert_eq!(first, default_mac(vm_a, 0, &tap), "same config, same MAC");
    // Pinned: a change here changes every guest's address.
    assert_eq!(first.to_string(), default_mac(vm_a, 0, &tap).to_string());
    assert_eq!(first.0[0] & 0x03, 0x02, "locally administered unicast");
    assert_ne!(first, default_mac(vm_a, 1, &tap));
    assert_ne!(first, default_mac(vm_a, 0, &user));
    assert_ne!(first, default_mac(vm_b, 0, &tap));
}

#[test]
fn a_tap_or_mac_used_twice_is_refused() {
    let a: NetConfig = "tap=tap0".parse().unwrap();
    let mac = MacAddress([2, 0, 0, 0, 0, 1]);
    let other = MacAddress([2, 0, 0, 0, 0, 2]);
    let err = validate_nets(&[a.clone(), a.clone()], &[mac, other]).unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");
    let b: NetConfig = "tap=tap1".parse().unwrap();
    let err = validate_nets(&[a.clone(), b.clone()], &[mac, mac]).unwrap_err();
    assert!(
        err.to_string().contains("MAC address 02:00:00:00:00:01"),
        "{err}"
    );
    assert_eq!(validate_nets(&[a, b], &[mac, other]), Ok(()));
}
