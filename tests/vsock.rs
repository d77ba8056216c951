//! virtio-vsock and virtio-rng end to end, with Firecracker's hybrid vsock convention on the host
//! side: a host client's `CONNECT` reaches a guest listener and gets `OK <port>`; a guest reaches
//! a host listener on `PATH_<port>`; 32 connections at once each move 1 MiB both ways intact;
//! connecting to a closed port is refused promptly in both directions; killing one host client
//! mid-transfer resets only its connection. The guest's hardware RNG is the virtio device.
//!
//! Each test's host side is a host script (`GuestTest::host_script`) that runs beside Kiln,
//! here or inside the virtual KVM host, with the static `kiln-vsock` helper (built from
//! resources/guest/kiln-vsock.c, also in the guest's /usr/bin).

use std::process::ExitCode;
use std::time::Duration;

use kiln_test_harness::{GuestOutcome, GuestTest, Suite};

/// The guest's context ID in every test.
const CID: u64 = 3;

/// `VALUE` of the console line `KEY=VALUE`, parsed as a number.
fn number(text: Option<&str>) -> Option<u64> {
    text.and_then(|value| value.split_whitespace().next()?.parse().ok())
}

/// The `N` of "after N ms" in a helper's error line.
fn millis_after(line: &str) -> Option<u64> {
    let rest = line.split("after ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `CONN-DONE` lines on the guest console: `(bytes, end)`.
fn connections_done(outcome: &GuestOutcome) -> Vec<(Option<u64>, String)> {
    outcome
        .stdout
        .lines()
        .filter_map(|line| line.trim_end_matches('\r').strip_prefix("CONN-DONE "))
        .map(|rest| {
            let mut bytes = None;
            let mut end = String::new();
            for word in rest.split_whitespace() {
                if let Some(value) = word.strip_prefix("bytes=") {
                    bytes = value.parse().ok();
                } else if let Some(value) = word.strip_prefix("end=") {
                    end = value.to_string();
                }
            }
            (bytes, end)
        })
        .collect()
}

fn main() -> ExitCode {
    let mut suite = Suite::new("vsock", env!("CARGO_BIN_EXE_kiln"));

    suite.guest(
        GuestTest::new(
            "host_connect_reaches_a_guest_listener_and_echoes",
            "kiln-vsock listen 5000 1 &\nwait $!\necho GUEST-DONE",
        )
        .vsock(CID)
        .host_script(
            r#"wait_console "LISTENING 5000" || exit 1
message="host says $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "SENT=$message"
echo "$message" | kiln-vsock uds-connect "$KILN_VSOCK" 5000 >"$KILN_TEST_DIR/out" 2>"$KILN_TEST_DIR/err"
echo "STATUS=$?"
echo "ECHO=$(cat "$KILN_TEST_DIR/out")"
echo "ANSWER=$(cat "$KILN_TEST_DIR/err")"
"#,
        ),
        |outcome| {
            let sent = outcome.host_value("SENT=");
            let answer = outcome.host_value("ANSWER=").unwrap_or_default();
            let port = answer.strip_prefix("OK ").and_then(|p| p.parse::<u64>().ok());
            outcome
                .check()
                .exit_code(0)
                .host_exit_code(0)
                .host_contains("STATUS=0")
                .that(
                    sent.is_some() && outcome.host_value("ECHO=") == sent,
                    format!(
                        "the echo {:?} differs from what the host sent {sent:?}",
                        outcome.host_value("ECHO=")
                    ),
                )
                .that(
                    port.is_some_and(|port| port >= 1 << 30),
                    format!("expected 'OK <host port>' with an ephemeral port, got {answer:?}"),
                )
                .that(
                    connections_done(outcome) == [(Some(sent.map_or(0, |s| s.len() as u64 + 1)), "eof".to_string())],
                    format!("guest side: {:?}", connections_done(outcome)),
                )
                .console_contains("GUEST-DONE")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "guest_connects_to_a_host_listener",
            r#"head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n' >/tmp/in
echo >>/tmp/in
tries=0
status=1
# The host listener starts before Kiln does; a retry only guards against a very slow host.
while [ "$status" != 0 ] && [ "$tries" -lt 10 ]; do
    tries=$((tries + 1))
    kiln-vsock connect 2 6000 </tmp/in >/tmp/out 2>/tmp/err
    status=$?
    [ "$status" = 0 ] || sleep 1
done
echo "TRIES=$tries STATUS=$status"
echo "SENT=$(cat /tmp/in)"
echo "ECHO=$(cat /tmp/out)"
cat /tmp/err
"#,
        )
        .vsock(CID)
        .host_script(r#"exec kiln-vsock uds-listen "${KILN_VSOCK}_6000" 1"#),
        |outcome| {
            let sent = outcome.console_value("SENT=");
            outcome
                .check()
                .exit_code(0)
                .console_contains("STATUS=0")
                .that(
                    sent.is_some_and(|s| s.len() == 24) && outcome.console_value("ECHO=") == sent,
                    format!(
                        "the echo {:?} differs from what the guest sent {sent:?}",
                        outcome.console_value("ECHO=")
                    ),
                )
                .host_exit_code(0)
                .host_contains("CONN-DONE bytes=25 end=eof")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "thirty_two_connections_move_1_mib_each_way_intact",
            "kiln-vsock listen 5001 32 &\nwait $!\necho GUEST-DONE",
        )
        .vsock(CID)
        .memory_mib(256)
        .timeout(Duration::from_secs(300))
        .host_script(
            r#"cd "$KILN_TEST_DIR"
for i in $(seq 1 32); do
    dd if=/dev/urandom of=in.$i bs=65536 count=16 2>/dev/null
done
wait_console "LISTENING 5001" || exit 1
for i in $(seq 1 32); do
    kiln-vsock uds-connect "$KILN_VSOCK" 5001 <in.$i >out.$i 2>err.$i &
done
wait
intact=0
for i in $(seq 1 32); do
    sent=$(sha256sum <in.$i)
    back=$(sha256sum <out.$i)
    if [ "$sent" = "$back" ] && [ "$(wc -c <out.$i)" = 1048576 ]; then
        intact=$((intact + 1))
    else
        echo "connection $i: $(wc -c <out.$i) bytes back; $(cat err.$i)"
    fi
done
echo "INTACT=$intact"
"#,
        ),
        |outcome| {
            let done = connections_done(outcome);
            let complete = done
                .iter()
                .filter(|(bytes, end)| *bytes == Some(1 << 20) && end == "eof")
                .count();
            outcome
                .check()
                .exit_code(0)
                .host_exit_code(0)
                .that(
                    number(outcome.host_value("INTACT=")) == Some(32),
                    format!(
                        "{:?} of 32 connections came back intact (SHA-256)",
                        outcome.host_value("INTACT=")
                    ),
                )
                .that(
                    complete == 32,
                    format!(
                        "the guest echoed 1 MiB to EOF on {complete} of 32 connections: {done:?}"
                    ),
                )
                .console_contains("GUEST-DONE")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "closed_ports_are_refused_promptly_both_ways",
            r#"kiln-vsock connect 2 6001 </dev/null 2>/tmp/err
echo "GUEST-STATUS=$?"
echo "GUEST-ERROR=$(cat /tmp/err)"
# The host tries a closed guest port, then says goodbye on this one.
kiln-vsock listen 5002 1 &
wait $!
"#,
        )
        .vsock(CID)
        .host_script(
            r#"wait_console "LISTENING 5002" || exit 1
kiln-vsock uds-connect "$KILN_VSOCK" 7000 </dev/null 2>"$KILN_TEST_DIR/err"
echo "HOST-STATUS=$?"
echo "HOST-ERROR=$(cat "$KILN_TEST_DIR/err")"
echo bye | kiln-vsock uds-connect "$KILN_VSOCK" 5002 >/dev/null 2>&1
"#,
        ),
        |outcome| {
            let guest_error = outcome.console_value("GUEST-ERROR=").unwrap_or_default();
            let host_error = outcome.host_value("HOST-ERROR=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .host_exit_code(0)
                .console_contains("GUEST-STATUS=2")
                .that(
                    guest_error.contains("Connection reset")
                        && millis_after(guest_error).is_some_and(|ms| ms < 1000),
                    format!("guest connect to a closed host port: {guest_error:?}"),
                )
                .host_contains("HOST-STATUS=3")
                .that(
                    host_error.contains("no OK")
                        && millis_after(host_error).is_some_and(|ms| ms < 1000),
                    format!("host CONNECT to a closed guest port: {host_error:?}"),
                )
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "killing_a_host_client_resets_only_its_connection",
            "kiln-vsock listen 5003 3 &\nwait $!\necho GUEST-DONE",
        )
        .vsock(CID)
        .timeout(Duration::from_secs(180))
        .host_script(
            r#"cd "$KILN_TEST_DIR"
dd if=/dev/urandom of=in.1 bs=65536 count=16 2>/dev/null
dd if=/dev/urandom of=in.2 bs=65536 count=16 2>/dev/null
wait_console "LISTENING 5003" || exit 1
kiln-vsock uds-connect "$KILN_VSOCK" 5003 </dev/zero >/dev/null 2>victim.err &
victim=$!
kiln-vsock uds-connect "$KILN_VSOCK" 5003 <in.1 >out.1 2>err.1 &
one=$!
kiln-vsock uds-connect "$KILN_VSOCK" 5003 <in.2 >out.2 2>err.2 &
two=$!
sleep 2
kill -9 "$victim"
echo "VICTIM-KILLED"
wait "$one" "$two"
intact=0
for i in 1 2; do
    [ "$(sha256sum <in.$i)" = "$(sha256sum <out.$i)" ] && intact=$((intact + 1))
done
echo "INTACT=$intact"
"#,
        ),
        |outcome| {
            let done = connections_done(outcome);
            let whole = done
                .iter()
                .filter(|(bytes, end)| *bytes == Some(1 << 20) && end == "eof")
                .count();
            outcome
                .check()
                .exit_code(0)
                .host_exit_code(0)
                .host_contains("VICTIM-KILLED")
                .that(
                    number(outcome.host_value("INTACT=")) == Some(2),
                    format!(
                        "{:?} of the 2 other connections came back intact",
                        outcome.host_value("INTACT=")
                    ),
                )
                .that(
                    done.len() == 3 && whole == 2,
                    format!("the guest's three connections ended as {done:?}"),
                )
                .console_contains("GUEST-DONE")
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "rng_feeds_the_guests_hardware_rng",
            r#"echo "RNG=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng bs=64 count=2 2>/dev/null | od -An -tx1 >/tmp/random
echo "RNG-BYTES=$(wc -w </tmp/random)"
echo "RNG-DISTINCT=$(tr -s ' ' '\n' </tmp/random | sort -u | grep -c .)"
"#,
        ),
        |outcome| {
            let current = outcome.console_value("RNG=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .that(
                    current.starts_with("virtio_rng"),
                    format!("rng_current is {current:?}, not the virtio device"),
                )
                .that(
                    number(outcome.console_value("RNG-BYTES=")) == Some(128),
                    format!(
                        "read {:?} bytes of 128",
                        outcome.console_value("RNG-BYTES=")
                    ),
                )
                // 128 random bytes hit far more than 40 of the 256 values (all but certainly).
                .that(
                    number(outcome.console_value("RNG-DISTINCT=")).is_some_and(|n| n > 40),
                    format!(
                        "{:?} distinct byte values: not random",
                        outcome.console_value("RNG-DISTINCT=")
                    ),
                )
                .finish()
        },
    );

    suite.guest(
        GuestTest::new(
            "rng_off_leaves_no_device",
            r#"echo "RNG=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo missing)""#,
        )
        .kiln_args(["--rng", "off"]),
        |outcome| {
            let current = outcome.console_value("RNG=").unwrap_or_default();
            outcome
                .check()
                .exit_code(0)
                .that(
                    !current.starts_with("virtio_rng"),
                    format!("rng_current is {current:?} with --rng off"),
                )
                .finish()
        },
    );

    suite.main()
}
