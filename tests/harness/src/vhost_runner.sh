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

# run_test INDEX LIMIT_SECS DIR COMMAND...
# DIR holds test.cpio (appended to the base initramfs to make DIR/initrd), name and, when the
# test has disks, disks.
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
            # A host script leads a process group (setsid): kill all of it.
            kill -KILL -"$pid" 2>/dev/null || kill -KILL "$pid"
        fi
    ) 3>&- &
    watcher=$!
    wait "$pid"
    status=$?
    end=$(uptime_ms)
    # Whatever a host script left running goes with it.
    kill -KILL -"$pid" 2>/dev/null
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
    # kiln has exited, so its disks are closed (the last close of a block device writes its
    # dirty pages); sync anyway, so what the guest wrote is on the drives before anything else.
    [ -f "$dir/disks" ] && sync
    timed_out=0
    [ -e "$dir/timed_out" ] && timed_out=1
    echo "kiln-runner: test $index finished: exit=$status timed_out=$timed_out after $((end - start)) ms"
    {
        echo "KILN-TEST $index STATUS exit=$status timed_out=$timed_out elapsed_ms=$((end - start))"
        echo "KILN-TEST $index STDOUT"
        base64 "$dir/stdout"
        echo "KILN-TEST $index STDERR"
        base64 "$dir/stderr"
        echo "KILN-TEST $index END"
    } >&3
    # The guest's files are not needed any more; keep the virtual host's memory for the next.
    rm -rf "$dir/initrd" "$dir/stdout" "$dir/stderr" "$dir/work"
}
