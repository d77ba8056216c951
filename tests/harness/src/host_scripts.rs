//! Shell functions for host-only scripts (`GuestTest::host_only_script`) that drive Kiln's
//! Firecracker API with curl, shared by the test files that do.

/// `api`, `expect`, `start_kiln`, `wait_file`, `wait_console` and `finish`, for busybox sh with
/// `$KILN`, `$WORK` set by the harness. A failed expectation prints `API-FAILURE: ...`, kills
/// Kiln and exits 1.
pub const API_SCRIPT_PRELUDE: &str = r#"
set -u
SOCK="$WORK/api.sock"
# api METHOD PATH [BODY]: prints the status; the body lands in $WORK/answer.
api() {
    if [ $# -ge 3 ]; then
        curl -sS --unix-socket "$SOCK" -X "$1" "http://localhost$2" \
            -H 'Content-Type: application/json' -d "$3" -o "$WORK/answer" -w '%{http_code}'
    else
        curl -sS --unix-socket "$SOCK" -X "$1" "http://localhost$2" -o "$WORK/answer" -w '%{http_code}'
    fi
}
# expect STATUS METHOD PATH [BODY]
expect() {
    want=$1
    shift
    got=$(api "$@")
    echo "API $1 $2 -> $got $(cat "$WORK/answer" 2>/dev/null)"
    if [ "$got" != "$want" ]; then
        echo "API-FAILURE: $1 $2 answered $got, expected $want"
        kill -KILL "$KILN_PID" 2>/dev/null
        cat "$WORK/kiln.log" >&2
        exit 1
    fi
}
# start_kiln [ARGS...]: a new Kiln with an API socket (a killed one leaves its socket file).
start_kiln() {
    rm -f "$SOCK"
    "$KILN" --api-sock "$SOCK" "$@" >"$WORK/console" 2>"$WORK/kiln.log" &
    KILN_PID=$!
    tries=0
    while [ ! -S "$SOCK" ]; do
        tries=$((tries + 1))
        if [ $tries -gt 1000 ]; then
            echo "API-FAILURE: the API socket never came up"
            cat "$WORK/kiln.log" >&2
            exit 1
        fi
        sleep 0.02
    done
}
# wait_file FILE TEXT: until FILE contains TEXT (or 120 s, or until Kiln ended without it).
# On failure, Kiln's log and the end of the guest console go to stderr: they say why (a guest
# that triple-faulted, hung or panicked).
wait_file() {
    tries=0
    until grep -q "$2" "$1" 2>/dev/null; do
        tries=$((tries + 1))
        if ! kiln_running && ! grep -q "$2" "$1" 2>/dev/null; then
            echo "API-FAILURE: Kiln ended before $1 showed $2"
            wait_failed
            return 1
        fi
        if [ $tries -gt 1200 ]; then
            echo "API-FAILURE: $1 never showed $2"
            wait_failed
            return 1
        fi
        sleep 0.1
    done
}
# kiln_running: false once the Kiln of $KILN_PID has exited (a zombie counts as exited: the
# script has not waited for it yet); true when there is no $KILN_PID.
kiln_running() {
    [ -n "${KILN_PID:-}" ] || return 0
    state=$(cut -d' ' -f3 "/proc/$KILN_PID/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}
wait_failed() {
    echo "--- kiln.log" >&2
    cat "$WORK/kiln.log" >&2 2>/dev/null
    echo "--- the end of the guest console" >&2
    tail -n 30 "$WORK/console" >&2 2>/dev/null
}
# wait_console TEXT: until the guest console shows TEXT (or 120 s).
wait_console() {
    wait_file "$WORK/console" "$1"
}
# finish: waits for Kiln, prints its status and the console, exits with Kiln's status.
finish() {
    wait "$KILN_PID"
    status=$?
    echo "KILN_STATUS=$status"
    cat "$WORK/console"
    cat "$WORK/kiln.log" >&2
    exit $status
}
"#;
