# The part of resources/bench/net/run that runs on the KVM host (the virtual one in vhost mode),
# as root (TAP interfaces). Sourced after these variables are set:
#   KILN QEMU QEMU_DATA KERNEL INITRD WORK REPS MEMORY MIB PINGS LIMIT_SECS VMMS
# Prints NET-RUN / NET-RESULT lines for run's table.

APPEND="console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 quiet"

start_kiln() {
    exec "$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --memory "$MEMORY" \
        --console stdio --rng off --net tap=kb0,mac=02:00:00:00:00:01
}

# qemu_net VHOST: QEMU -M microvm with virtio-net-device on a TAP it creates.
qemu_net() {
    exec "$QEMU" -M microvm -accel kvm -cpu host -smp 1 -m "$MEMORY" \
        -nodefaults -no-user-config -no-reboot -display none -serial stdio -L "$QEMU_DATA" \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND" \
        -netdev "tap,id=n0,ifname=kb0,script=no,downscript=no,vhost=$1" \
        -device virtio-net-device,netdev=n0,mac=02:00:00:00:00:01
}
start_qemu() { qemu_net off; }
start_qemu_vhost() { qemu_net on; }

# wait_console TEXT: until the console shows TEXT or the VM ended; false if it never did.
wait_console() {
    until grep -q -F -- "$1" "$WORK/console" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
}

now() {
    cut -d' ' -f1 /proc/uptime
}

run_one() {
    vmm=$1
    rep=$2
    echo "net-bench: $vmm, repetition $rep" >&2
    : >"$WORK/console"
    "start_$vmm" </dev/null >"$WORK/console" 2>"$WORK/stderr" &
    pid=$!
    (sleep "$LIMIT_SECS"; kill -KILL "$pid" 2>/dev/null) &
    watchdog=$!
    until ip link show kb0 >/dev/null 2>&1 || ! kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    ip addr add 10.8.0.1/24 dev kb0 2>/dev/null
    ip link set kb0 up 2>/dev/null
    # Guest to host: the guest sends MIB MiB and times it; host to guest: the host does.
    nc -l -p 5001 <&5 >/dev/null &
    if wait_console GUEST-LISTENING; then
        start=$(now)
        dd if=/dev/zero bs=65536 count=$((MIB * 16)) 2>/dev/null | nc 10.8.0.2 5002
        end=$(now)
        echo "NET-RESULT vmm=$vmm rep=$rep rx_mibs=$(awk -v m="$MIB" -v a="$start" -v b="$end" \
            'BEGIN { printf "%.1f", m / (b - a) }')"
    fi
    wait "$pid"
    status=$?
    kill "$watchdog" 2>/dev/null
    sed -n "s/^NET-GUEST /NET-RESULT vmm=$vmm rep=$rep /p" "$WORK/console" | tr -d '\r'
    echo "NET-RUN vmm=$vmm rep=$rep exit=$status"
    [ "$status" -eq 0 ] || tail -n 5 "$WORK/console" "$WORK/stderr" | sed 's/^/NET-TAIL /'
    ip link del kb0 2>/dev/null
}

run_all() {
    mkfifo "$WORK/hold"
    exec 5<>"$WORK/hold"
    ip link set lo up
    echo "NET-VERSION kiln $("$KILN" --version 2>&1 | head -n 1)"
    echo "NET-VERSION qemu $("$QEMU" --version 2>&1 | head -n 1)"
    echo "NET-VERSION host $(uname -r)"
    for rep in $(seq 1 "$REPS"); do
        for vmm in $VMMS; do
            run_one "$vmm" "$rep"
        done
    done
    echo "NET-END"
}
