//! virtio-net end to end, through the harness (inside the virtual KVM host here, where Kiln is
//! root). Host-only scripts run Kiln themselves:
//!
//! - TAP, in a network namespace the script creates (`unshare -n`): Kiln creates two TAP
//!   interfaces (it has CAP_NET_ADMIN), the script gives them addresses; the guest pings the
//!   host on both, sends 64 MiB over TCP to the host and receives 64 MiB from it, SHA-256 checked
//!   on both ends; each NIC has its own MAC (one given, one derived), as the host's neighbour
//!   table confirms.
//! - user (passt): the guest gets its address by DHCP, fetches from a TCP server on the host's
//!   loopback and sends 1 MiB to another (through passt's gateway mapping, SHA-256 checked), and
//!   a host client on the `hostfwd` port sends a line to a server in the guest and reads its
//!   answer; then the script kills passt: the guest sees its link go down, keeps running and
//!   powers off normally, and Kiln logs why.

use std::process::ExitCode;
use std::time::Duration;

use kiln_test_harness::{GuestTest, Suite};

/// Shell functions of the host-only scripts.
const PRELUDE: &str = r#"
set -u
# wait_for TEXT: until the guest console shows TEXT (at most 180 s).
wait_for() {
    tries=0
    until grep -q -F -- "$1" "$WORK/console" 2>/dev/null; do
        tries=$((tries + 1))
        if [ $tries -gt 1800 ]; then
            echo "HOST-FAILURE: no '$1' on the guest console"
            return 1
        fi
        sleep 0.1
    done
}
# report STATUS: prints the console and Kiln's log, exits with STATUS.
report() {
    echo "KILN-STATUS=$1"
    cat "$WORK/console"
    echo "KILN-LOG-BEGIN"
    cat "$WORK/kiln.log"
    exit "$1"
}
"#;

const TAP_GUEST: &str = r#"
ip link set eth0 up && ip addr add 10.9.0.2/24 dev eth0
ip link set eth1 up && ip addr add 10.9.1.2/24 dev eth1
echo "MAC0=$(cat /sys/class/net/eth0/address)"
echo "MAC1=$(cat /sys/class/net/eth1/address)"
for host in 10.9.0.1 10.9.1.1; do
    tries=0
    until ping -c 1 -W 1 $host >/dev/null 2>&1 || [ $tries -ge 90 ]; do tries=$((tries + 1)); done
done
echo "PING0=$(ping -c 3 -W 2 10.9.0.1 | grep -o '[0-9]* packets received')"
echo "PING1=$(ping -c 3 -W 2 10.9.1.1 | grep -o '[0-9]* packets received')"
head -c 67108864 /dev/urandom >/tmp/out
echo "GUEST-SENT=$(sha256sum </tmp/out | cut -d' ' -f1) $(wc -c </tmp/out)"
nc 10.9.0.1 5001 </tmp/out
echo "SEND-STATUS=$?"
rm /tmp/out
mkfifo /tmp/hold
exec 5<>/tmp/hold
nc -l -p 5002 <&5 >/tmp/in &
receiver=$!
sleep 1
echo GUEST-LISTENING
wait $receiver
echo "GUEST-GOT=$(sha256sum </tmp/in | cut -d' ' -f1) $(wc -c </tmp/in)"
"#;

const TAP_HOST: &str = r#"
cat >"$WORK/inner.sh" <<'INNER'
ip link set lo up
mkfifo "$WORK/hold"
exec 5<>"$WORK/hold"
nc -l -p 5001 <&5 >"$WORK/from-guest" &
receiver=$!
"$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --memory 512M --console "file=$WORK/console" \
    --net tap=kt0 --net tap=kt1,mac=02:00:00:00:00:b1 2>"$WORK/kiln.log" &
kiln=$!
# The receiver must not outlive Kiln (a guest that never connects).
(while kill -0 $kiln 2>/dev/null; do sleep 1; done; kill $receiver 2>/dev/null) &
tries=0
# (/sys shows the namespace that mounted it, not this one: ask ip.)
until ip link show kt0 >/dev/null 2>&1 && ip link show kt1 >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ $tries -gt 600 ] || ! kill -0 $kiln 2>/dev/null; then
        echo "HOST-FAILURE: Kiln did not create the TAP interfaces"
        kill $receiver $kiln 2>/dev/null
        wait $kiln
        report 1
    fi
    sleep 0.1
done
ip addr add 10.9.0.1/24 dev kt0 && ip link set kt0 up
ip addr add 10.9.1.1/24 dev kt1 && ip link set kt1 up
wait $receiver
echo "HOST-GOT=$(sha256sum <"$WORK/from-guest" | cut -d' ' -f1) $(wc -c <"$WORK/from-guest")"
rm -f "$WORK/from-guest"
head -c 67108864 /dev/urandom >"$WORK/to-guest"
echo "HOST-SENT=$(sha256sum <"$WORK/to-guest" | cut -d' ' -f1) $(wc -c <"$WORK/to-guest")"
if ! wait_for GUEST-LISTENING; then
    kill $kiln 2>/dev/null
    wait $kiln
    report 1
fi
nc 10.9.0.2 5002 <"$WORK/to-guest"
rm -f "$WORK/to-guest"
echo "NEIGH0=$(ip neigh show 10.9.0.2 dev kt0 | grep -o '..:..:..:..:..:..')"
echo "NEIGH1=$(ip neigh show 10.9.1.2 dev kt1 | grep -o '..:..:..:..:..:..')"
wait $kiln
report $?
INNER
unshare -n sh -c ". \"\$0\"; . \"\$1\"" "$WORK/prelude.sh" "$WORK/inner.sh"
"#;

const USER_GUEST: &str = r#"
udhcpc -i eth0 -n -q -t 20 -T 1 >/tmp/dhcp.log 2>&1
echo "DHCP-STATUS=$?"
echo "ADDRESS=$(ip -4 addr show eth0 | grep -o 'inet [0-9.]*' | cut -d' ' -f2)"
gateway=$(ip route | grep '^default' | cut -d' ' -f3)
echo "GATEWAY=$gateway"
mkfifo /tmp/hold
exec 5<>/tmp/hold
echo "FETCHED=$(nc -w 20 "$gateway" 6001 <&5)"
head -c 1048576 /dev/urandom >/tmp/blob
echo "GUEST-SENT=$(sha256sum </tmp/blob | cut -d' ' -f1)"
nc -w 20 "$gateway" 6002 </tmp/blob
# The hostfwd server: reads the host client's line and answers it behind a prefix.
nc -l -p 80 -e sh -c 'read line; echo "guest-echo:$line"; echo "GUEST-SERVER-READ=$line" >/dev/console' &
server=$!
sleep 0.5
echo "SERVER-READY-$((6 * 7))"
wait $server
echo "GUEST-SERVER-STATUS=$?"
echo GUEST-WAITS-FOR-LINK-DOWN
tries=0
until [ "$(cat /sys/class/net/eth0/carrier)" = 0 ] || [ $tries -ge 600 ]; do
    tries=$((tries + 1))
    sleep 0.1
done
echo "CARRIER=$(cat /sys/class/net/eth0/carrier)"
echo "STILL-RUNNING=yes"
"#;

const USER_HOST: &str = r#"
# passt takes the host interface with the default route as its template.
ip link set lo up
ip addr add 10.0.2.15/24 dev dummy0 && ip link set dummy0 up &&
    ip route add default via 10.0.2.2 dev dummy0 || echo "HOST-FAILURE: no dummy0 for passt"
greeting="greeting-$$-from-the-host-loopback"
echo "GREETING=$greeting"
echo "$greeting" >"$WORK/greeting"
mkfifo "$WORK/hold"
exec 5<>"$WORK/hold"
nc -l -p 6001 <"$WORK/greeting" &
nc -l -p 6002 <&5 >"$WORK/from-guest" &
receiver=$!
"$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --memory 256M --console "file=$WORK/console" \
    --net user,hostfwd=tcp:127.0.0.1:6080-:80 2>"$WORK/kiln.log" &
kiln=$!
# give_up: stops Kiln and reports what there is.
give_up() {
    kill $kiln $receiver 2>/dev/null
    wait $kiln
    report 1
}
wait_for SERVER-READY-42 || give_up
echo "HOSTFWD-REPLY=$(echo "line-from-host-$$" | nc -w 10 127.0.0.1 6080)"
echo "HOSTFWD-SENT=line-from-host-$$"
wait_for GUEST-WAITS-FOR-LINK-DOWN || give_up
wait $receiver
echo "HOST-GOT=$(sha256sum <"$WORK/from-guest" | cut -d' ' -f1)"
# passt listens on the forwarded port for the guest.
echo "HOSTFWD-LISTENING=$(netstat -tln | grep -c '127.0.0.1:6080 ')"
kill -KILL $(pidof passt)
echo "KILLED-PASST=$?"
wait $kiln
report $?
"#;

fn main() -> ExitCode {
    let mut suite = Suite::new("net", env!("CARGO_BIN_EXE_kiln"));

    suite.guest(
        GuestTest::new("tap_ping_64mib_both_ways_and_two_nics", TAP_GUEST)
            .host_only_script(format!(
                "{PRELUDE}\ncat >\"$WORK/prelude.sh\" <<'PRELUDE'\n{PRELUDE}\nPRELUDE\n{TAP_HOST}"
            ))
            .timeout(Duration::from_secs(300)),
        |outcome| {
            let value = |key: &str| outcome.console_value(key).unwrap_or_default().to_string();
            let mac0 = value("MAC0=");
            outcome
                .check()
                .exit_code(0)
                .console_lacks("HOST-FAILURE")
                .that(value("PING0=") == "3 packets received", "ping over eth0")
                .that(value("PING1=") == "3 packets received", "ping over eth1")
                .that(
                    !value("GUEST-SENT=").is_empty() && value("GUEST-SENT=") == value("HOST-GOT="),
                    "64 MiB guest to host arrive intact (same SHA-256 and size)",
                )
                .that(
                    value("HOST-SENT=").ends_with(" 67108864")
                        && value("HOST-SENT=") == value("GUEST-GOT="),
                    "64 MiB host to guest arrive intact (same SHA-256 and size)",
                )
                .that(
                    value("MAC1=") == "02:00:00:00:00:b1",
                    "eth1 has the MAC given",
                )
                .that(
                    mac0.starts_with("02:4b:") && mac0 != value("MAC1="),
                    "eth0 has its own derived MAC",
                )
                .that(value("NEIGH0=") == mac0, "the host saw eth0's MAC on kt0")
                .that(
                    value("NEIGH1=") == "02:00:00:00:00:b1",
                    "the host saw eth1's MAC on kt1",
                )
                .finish()
        },
    );

    suite.guest(
        GuestTest::new("user_dhcp_host_loopback_and_passt_killed", USER_GUEST)
            .host_only_script(format!("{PRELUDE}\n{USER_HOST}"))
            .timeout(Duration::from_secs(240)),
        |outcome| {
            let value = |key: &str| outcome.console_value(key).unwrap_or_default().to_string();
            outcome
                .check()
                .exit_code(0)
                .console_lacks("HOST-FAILURE")
                .that(
                    value("DHCP-STATUS=") == "0",
                    "udhcpc got a lease from passt",
                )
                .that(
                    value("ADDRESS=") == "10.0.2.15",
                    "the guest got the host template's address by DHCP",
                )
                .that(
                    !value("GREETING=").is_empty() && value("FETCHED=") == value("GREETING="),
                    "the guest fetched from the host's loopback server through the gateway",
                )
                .that(
                    !value("GUEST-SENT=").is_empty() && value("GUEST-SENT=") == value("HOST-GOT="),
                    "1 MiB from the guest reached the host's server intact",
                )
                .that(
                    value("HOSTFWD-LISTENING=") == "1",
                    "passt listens on the hostfwd port",
                )
                .that(
                    !value("HOSTFWD-SENT=").is_empty()
                        && value("GUEST-SERVER-READ=") == value("HOSTFWD-SENT="),
                    "the guest's server read the host client's line through the hostfwd port",
                )
                .that(
                    value("HOSTFWD-REPLY=") == format!("guest-echo:{}", value("HOSTFWD-SENT=")),
                    "the host client got the guest server's reply through the hostfwd port",
                )
                .that(value("KILLED-PASST=") == "0", "passt was killed")
                .that(value("CARRIER=") == "0", "the guest saw its link go down")
                .that(value("STILL-RUNNING=") == "yes", "the guest kept running")
                .console_contains("the network backend is gone")
                .console_contains("killed by signal 9")
                .finish()
        },
    );

    suite.main()
}
