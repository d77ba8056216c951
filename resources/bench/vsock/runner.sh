# shellcheck shell=sh disable=SC2154 # the settings are set by run-vms
# The measuring loop of Kiln's vsock benchmark (POSIX sh: busybox inside the virtual KVM host,
# /bin/sh on a host with real KVM). resources/bench/vsock/run copies it into the `run-vms`
# script it generates, after the settings:
#   KILN QEMU QEMU_DATA KERNEL INITRD HELPER WORK REPS MEMORY LIMIT_SECS ROUNDS SIZE BYTES
#   VMMS (a list of: kiln qemu qemu_irqchip_on; each has a start_<name> and a mode_<name>)
# and calls `run_all`. Machine-readable results go to stdout, progress to stderr:
#   VSOCK-RUN vmm=kiln rep=1 exit=0 timed_out=0
#   VSOCK-LINE vmm=kiln rep=1 RTT-US median=... p99=...   (and THROUGHPUT-MIBS ...)
#   VSOCK-TAIL vmm=kiln rep=1 console|stderr|client <line>  (only when a run failed)

APPEND="console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 quiet"
GUEST_CID=3
PORT=5000

# Kiln: its vsock device, host side on a Unix socket (Firecracker's convention).
start_kiln() {
    exec "$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --cpus 1 --memory "$MEMORY" \
        --vsock "cid=$GUEST_CID,uds=$WORK/v.sock" --rng off --cmdline quiet --console stdio
}
mode_kiln() {
    echo "uds $WORK/v.sock $PORT"
}

# QEMU microvm with vhost-vsock (the data path in the host kernel), default split irqchip.
start_qemu() {
    qemu_with microvm kvm
}
mode_qemu() {
    echo "vsock $GUEST_CID $PORT"
}

# The same with the PIC and IOAPIC in KVM, as Kiln has them (see the blk benchmark).
start_qemu_irqchip_on() {
    qemu_with microvm,ioapic2=off kvm,kernel-irqchip=on
}
mode_qemu_irqchip_on() {
    mode_qemu
}

# qemu_with MACHINE ACCEL
qemu_with() {
    exec "$QEMU" -M "$1" -accel "$2" -cpu host -smp 1 -m "$MEMORY" \
        -nodefaults -no-user-config -no-reboot -display none -serial stdio -L "$QEMU_DATA" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" \
        -device "vhost-vsock-device,guest-cid=$GUEST_CID"
}

# run_one VMM REP: boot, wait for the guest's echo server, measure round trips, then
# throughput, each on its own connection; the guest powers off after the second.
run_one() {
    vmm=$1
    run_rep=$2
    rm -f "$WORK/timed_out" "$WORK/v.sock" "$WORK/client"
    echo "vsock-bench: $vmm, repetition $run_rep" >&2
    : >"$WORK/console"
    "start_$vmm" </dev/null >"$WORK/console" 2>"$WORK/stderr" &
    pid=$!
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$LIMIT_SECS" &
        sleeper=$!
        wait "$sleeper"
        if kill -0 "$pid" 2>/dev/null; then
            : >"$WORK/timed_out"
            kill -KILL "$pid"
        fi
    ) &
    watcher=$!
    tenths=$((LIMIT_SECS * 10))
    while ! grep -q "LISTENING $PORT" "$WORK/console" 2>/dev/null && [ "$tenths" -gt 0 ] &&
        kill -0 "$pid" 2>/dev/null; do
        sleep 0.1
        tenths=$((tenths - 1))
    done
    # shellcheck disable=SC2046 # the mode is several words on purpose
    set -- $("mode_$vmm")
    "$HELPER" rtt "$@" "$ROUNDS" "$SIZE" >>"$WORK/client" 2>&1
    "$HELPER" push "$@" "$BYTES" >>"$WORK/client" 2>&1
    wait "$pid"
    status=$?
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
    timed_out=0
    [ -e "$WORK/timed_out" ] && timed_out=1
    echo "VSOCK-RUN vmm=$vmm rep=$run_rep exit=$status timed_out=$timed_out"
    grep -E '^(RTT-US|THROUGHPUT-MIBS) ' "$WORK/client" | sed "s/^/VSOCK-LINE vmm=$vmm rep=$run_rep /"
    if [ "$status" -ne 0 ] || [ "$(grep -c -E '^(RTT-US|THROUGHPUT-MIBS) ' "$WORK/client")" -ne 2 ]; then
        tr -d '\r' <"$WORK/console" | tail -n 15 | sed "s/^/VSOCK-TAIL vmm=$vmm rep=$run_rep console /"
        tail -n 15 "$WORK/stderr" | sed "s/^/VSOCK-TAIL vmm=$vmm rep=$run_rep stderr /"
        tail -n 5 "$WORK/client" | sed "s/^/VSOCK-TAIL vmm=$vmm rep=$run_rep client /"
    fi
}

# Every VMM once per repetition, alternating the order, as the blk benchmark does.
run_all() {
    echo "VSOCK-VERSION kiln $("$KILN" --version 2>&1 | head -n 1)"
    echo "VSOCK-VERSION qemu $("$QEMU" --version 2>&1 | head -n 1)"
    echo "VSOCK-VERSION host $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
    [ -c /dev/vhost-vsock ] || echo "VSOCK-VERSION note /dev/vhost-vsock is missing: QEMU's runs will fail"
    reversed=""
    for vmm in $VMMS; do
        reversed="$vmm $reversed"
    done
    rep=1
    while [ "$rep" -le "$REPS" ]; do
        order=$VMMS
        [ $((rep % 2)) -eq 1 ] || order=$reversed
        for vmm in $order; do
            run_one "$vmm" "$rep"
        done
        rep=$((rep + 1))
    done
    echo "VSOCK-END"
}
