# Test runner inside Kiln's virtual KVM host (busybox sh), sourced by the generated /kiln/run.
# Results go to file descriptor 3 (the second serial port) in the format of results.rs;
# progress goes to the console.

# Milliseconds since the virtual host booted.
uptime_ms() {
    read -r up _ </proc/uptime
    secs=${up%.*}
    hundredths=${up#*.}
    hundredths=${hundredths#0}
    echo $((secs * 1000 + hundredths * 10))
}

# check_disks DIR: the drives DIR/disks lists (`vdX BYTES` lines) are there with the size of
# their host images; otherwise prints why not and fails. Catches a drive mapping gone wrong.
check_disks() {
    [ -f "$1/disks" ] || return 0
    while read -r name bytes; do
        if [ ! -b "/dev/$name" ]; then
            echo "/dev/$name is missing in the virtual host (it has: $(cd /sys/block && echo vd*))"
            return 1
        fi
        read -r sectors <"/sys/block/$name/size"
        if [ "$((sectors * 512))" != "$bytes" ]; then
            echo "/dev/$name has $((sectors * 512)) bytes, but its image has $bytes"
            return 1
        fi
    done <"$1/disks"
}

# start_host DIR: starts DIR/host.sh (when the test has one) in its own session, so that
# finish_host can kill whatever it left running; its output goes to DIR/host.
start_host() {
    [ -f "$1/host.sh" ] || return 0
    mkdir -p "$1/host-tmp"
    rm -f "$1/host-status" "$1/host-pid"
    (
        KILN_CONSOLE="$1/stdout" KILN_TEST_DIR="$1/host-tmp" KILN_VSOCK="$1/vsock.sock" \
            PATH="/kiln/bin:$PATH" setsid sh -c 'echo $$ >"$0/host-pid"; exec sh "$0/host.sh"' "$1" \
            >"$1/host" 2>&1 </dev/null
        echo $? >"$1/host-status"
    ) 3>&- &
}

# finish_host DIR GRACE_SECS: waits for the host script at most GRACE_SECS more, then kills its
# session; prints its exit status, or "killed".
finish_host() {
    tenths=$(($2 * 10))
    while [ ! -f "$1/host-status" ] && [ "$tenths" -gt 0 ]; do
        sleep 0.1
        tenths=$((tenths - 1))
    done
    [ -f "$1/host-pid" ] && kill -KILL "-$(cat "$1/host-pid")" 2>/dev/null
    if [ -f "$1/host-status" ]; then
        cat "$1/host-status"
    else
        echo killed
    fi
}

# link_drive DEVICE PATH: makes PATH (a host path a disk image refers to, e.g. a qcow2 backing
# file) lead to DEVICE, the drive that holds that file here.
link_drive() {
    mkdir -p "$(dirname "$2")" && ln -sf "$1" "$2"
}

# run_test INDEX LIMIT_SECS DIR COMMAND...
# DIR holds test.cpio (appended to the base initramfs to make DIR/initrd), name and, when the
# test has disks, disks; host.sh when it has a host script to run beside COMMAND. COMMAND is
# kiln, or for a host-only script `env ... setsid sh DIR/host-only.sh`, which starts kiln itself.
run_test() {
    index=$1
    limit=$2
    dir=$3
    shift 3
    if ! problem=$(check_disks "$dir"); then
        echo "kiln-runner: test $index ($(cat "$dir/name")) not run: $problem"
        echo "KILN-TEST $index PROBLEM $problem" >&3
        return 0
    fi
    cat /kiln/guest/initramfs.cpio.gz "$dir/test.cpio" >"$dir/initrd"
    echo "kiln-runner: test $index ($(cat "$dir/name")) starting, limit ${limit}s"
    : >"$dir/stdout"
    start_host "$dir"
    start=$(uptime_ms)
    "$@" </dev/null >"$dir/stdout" 2>"$dir/stderr" 3>&- &
    pid=$!
    # The watchdog: kills kiln at the limit. Its sleep is killed with it (no pkill in busybox).
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$limit" &
        sleeper=$!
        wait "$sleeper"
        if kill -0 "$pid" 2>/dev/null; then
            : >"$dir/timed_out"
            # A host-only script leads a process group (setsid): kill all of it.
            kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid"
        fi
    ) 3>&- &
    watcher=$!
    wait "$pid"
    status=$?
    end=$(uptime_ms)
    # Whatever a host-only script left running goes with it.
    kill -KILL -"$pid" 2>/dev/null
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
    # kiln has exited, so its disks are closed (the last close of a block device writes its
    # dirty pages); sync anyway, so what the guest wrote is on the drives before anything else.
    [ -f "$dir/disks" ] && sync
    timed_out=0
    [ -e "$dir/timed_out" ] && timed_out=1
    host_status=none
    [ -f "$dir/host.sh" ] && host_status=$(finish_host "$dir" "$HOST_GRACE_SECS")
    echo "kiln-runner: test $index finished: exit=$status timed_out=$timed_out after $((end - start)) ms"
    {
        echo "KILN-TEST $index STATUS exit=$status timed_out=$timed_out elapsed_ms=$((end - start))"
        echo "KILN-TEST $index STDOUT"
        base64 "$dir/stdout"
        echo "KILN-TEST $index STDERR"
        base64 "$dir/stderr"
        if [ "$host_status" != none ]; then
            echo "KILN-TEST $index HOST exit=$host_status"
            base64 "$dir/host"
        fi
        echo "KILN-TEST $index END"
    } >&3
    # The guest's files are not needed any more; keep the virtual host's memory for the next.
    rm -rf "$dir/initrd" "$dir/stdout" "$dir/stderr" "$dir/host" "$dir/host-tmp" "$dir/work"
}
