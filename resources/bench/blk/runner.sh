# shellcheck shell=sh disable=SC2154 # the settings are set by run-vms
# The measuring loop of Kiln's virtio-blk benchmark (POSIX sh: runs under busybox inside the
# virtual KVM host as well as under /bin/sh on a host with real KVM). resources/bench/blk/run
# copies it into the `run-vms` script it generates, after the settings:
#   KILN QEMU QEMU_DATA KERNEL INITRD WORK REPS DISK_MIB MEMORY LIMIT_SECS APPEND
#   VMMS (a list of: kiln qemu qemu_irqchip_on kiln_qcow2 qemu_qcow2; each has a start_<name>
#   function below; the *_qcow2 ones run on a fresh qcow2 overlay over a sparse raw base)
# and calls `run_all`. Machine-readable results go to stdout, progress to stderr:
#   BLK-RUN vmm=kiln rep=1 exit=0 timed_out=0 wall_ms=5230
#   BLK-LINE vmm=kiln rep=1 KILN-BLK name=seq_write value=... (each KILN-BLK console line)
#   BLK-TAIL vmm=kiln rep=1 console|stderr|threads <line>  (only when a run failed)

# Milliseconds since boot (the virtual host has no `date +%N` guarantee; 10 ms resolution).
uptime_ms() {
    read -r up _ </proc/uptime
    secs=${up%.*}
    hundredths=${up#*.}
    hundredths=${hundredths#0}
    echo $((secs * 1000 + hundredths * 10))
}

# The VMM command lines. Same kernel, initramfs, disk, vCPUs, memory and guest command line.
# Kiln's defaults are "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1"; QEMU gets them
# spelled out. Kiln does buffered pread/pwrite on the image in one I/O thread per disk and
# fdatasync on a flush; QEMU's counterpart is cache=writeback (buffered, flushes honoured)
# with aio=threads.
# Each replaces the background subshell it runs in (exec), so that $! is the VMM itself.
start_kiln() {
    exec "$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --cpus 1 --memory "$MEMORY" \
        --disk "path=$WORK/disk.img" --cmdline "$APPEND" --console stdio
}

# The same on a qcow2 overlay (format given, as a backing file requires).
start_kiln_qcow2() {
    exec "$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --cpus 1 --memory "$MEMORY" \
        --disk "path=$WORK/disk.qcow2,format=qcow2" --cmdline "$APPEND" --console stdio
}

# QEMU microvm's default interrupt controllers: kernel-irqchip=split (LAPIC in KVM, IOAPICs in
# QEMU, so every virtio-mmio interrupt and its EOI pass through QEMU's user space).
start_qemu() {
    qemu_with microvm kvm
}

# QEMU with the PIC and IOAPIC in KVM as well, as Kiln has them (its disk interrupt goes from an
# irqfd straight to KVM's IOAPIC). microvm's second IOAPIC (pins 24-47, where it puts the
# virtio-mmio interrupts) exists only in QEMU, so it is turned off: the interrupts then use pins
# 16-23 of the in-kernel one. (With kernel-irqchip=on alone the disk's interrupts are lost and
# the guest waits forever on its first request.)
start_qemu_irqchip_on() {
    qemu_with microvm,ioapic2=off kvm,kernel-irqchip=on
}

# QEMU microvm (default interrupt controllers) on the same kind of qcow2 overlay.
start_qemu_qcow2() {
    DRIVE="file=$WORK/disk.qcow2,format=qcow2"
    qemu_with microvm kvm
}

# qemu_with MACHINE ACCEL (the disk: DRIVE, default the raw image)
qemu_with() {
    exec "$QEMU" -M "$1" -accel "$2" -cpu host -smp 1 -m "$MEMORY" \
        -nodefaults -no-user-config -no-reboot -display none -serial stdio -L "$QEMU_DATA" \
        -kernel "$KERNEL" -initrd "$INITRD" \
        -append "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 $APPEND" \
        -drive "id=disk0,${DRIVE:-file=$WORK/disk.img,format=raw},if=none,cache=writeback,aio=threads" \
        -device virtio-blk-device,drive=disk0
}

# where_threads_wait PID: each thread's name, state and kernel stack, to tell a stuck guest
# (vCPU halted, I/O thread asleep) from a stuck host (a thread spinning in the kernel).
where_threads_wait() {
    for task in /proc/"$1"/task/*; do
        echo "thread $(cat "$task/comm") state=$(cut -d' ' -f3 "$task/stat") wchan=$(cat "$task/wchan")"
        sed 's/^/    /' "$task/stack" 2>/dev/null | head -n 12
    done
}

# run_one VMM REP: one VM on a fresh sparse image (or a fresh qcow2 overlay over a sparse raw
# base, made by `kiln image create`), killed at LIMIT_SECS.
run_one() {
    vmm=$1
    run_rep=$2
    rm -f "$WORK/disk.img" "$WORK/disk.qcow2" "$WORK/base.img" "$WORK/timed_out" "$WORK/threads"
    case "$vmm" in
    *_qcow2)
        truncate -s "${DISK_MIB}M" "$WORK/base.img"
        "$KILN" image create --backing "$WORK/base.img" --backing-format raw "$WORK/disk.qcow2" \
            >/dev/null
        ;;
    *) truncate -s "${DISK_MIB}M" "$WORK/disk.img" ;;
    esac
    echo "blk-bench: $vmm, repetition $run_rep" >&2
    start=$(uptime_ms)
    "start_$vmm" </dev/null >"$WORK/console" 2>"$WORK/stderr" &
    pid=$!
    # The watchdog kills the VMM at the limit; its sleep is killed with it.
    (
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        sleep "$LIMIT_SECS" &
        sleeper=$!
        wait "$sleeper"
        if kill -0 "$pid" 2>/dev/null; then
            : >"$WORK/timed_out"
            where_threads_wait "$pid" >"$WORK/threads" 2>&1
            kill -KILL "$pid"
        fi
    ) &
    watcher=$!
    wait "$pid"
    status=$?
    end=$(uptime_ms)
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
    timed_out=0
    [ -e "$WORK/timed_out" ] && timed_out=1
    echo "BLK-RUN vmm=$vmm rep=$run_rep exit=$status timed_out=$timed_out wall_ms=$((end - start))"
    tr -d '\r' <"$WORK/console" | grep '^KILN-BLK ' | sed "s/^/BLK-LINE vmm=$vmm rep=$run_rep /"
    if [ "$status" -ne 0 ] || ! grep -q '^KILN-BLK done' "$WORK/console"; then
        tr -d '\r' <"$WORK/console" | tail -n 15 | sed "s/^/BLK-TAIL vmm=$vmm rep=$run_rep console /"
        tail -n 15 "$WORK/stderr" | sed "s/^/BLK-TAIL vmm=$vmm rep=$run_rep stderr /"
        if [ -e "$WORK/threads" ]; then
            sed "s/^/BLK-TAIL vmm=$vmm rep=$run_rep threads /" "$WORK/threads"
        fi
    fi
    rm -f "$WORK/disk.img" "$WORK/disk.qcow2" "$WORK/base.img"
}

# Every VMM of $VMMS once per repetition, in order in odd repetitions and in reverse order in
# even ones (Kiln, QEMU, then QEMU, Kiln, ...), so that drift in the host's load hits all alike.
run_all() {
    echo "BLK-VERSION kiln $("$KILN" --version 2>&1 | head -n 1)"
    echo "BLK-VERSION qemu $("$QEMU" --version 2>&1 | head -n 1)"
    echo "BLK-VERSION host $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
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
    echo "BLK-END"
}
