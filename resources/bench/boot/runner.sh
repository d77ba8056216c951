# shellcheck shell=sh disable=SC2154 # the settings are set by run-vms
# The measuring loop of Kiln's Linux boot benchmark (POSIX sh: runs under busybox inside the
# virtual KVM host as well as under /bin/sh on a host with real KVM). resources/bench/boot/run
# copies it into the `run-vms` script it generates, after the settings:
#   BOOTBENCH KILN QEMU QEMU_DATA KERNEL INITRD WORK REPS MEMORY LIMIT_SECS
#   VMMS ("kiln qemu" or "kiln") KILN_APPEND QEMU_APPEND (guest command lines) LOG_CONSOLES (1: one more run of each VMM
#   without `quiet`, whose whole console is reported)
# and calls `run_all`. Machine-readable results go to stdout, progress to stderr:
#   BOOT-RUN vmm=kiln rep=1 exit=0 timed_out=0 wall_us=... marker_us=... cpu_us=... max_rss_kib=...
#   BOOT-LINE vmm=kiln rep=1 KILN-BOOT ...     (each KILN-BOOT console line)
#   BOOT-TAIL vmm=kiln rep=1 console|stderr <line>   (only when a run failed)
#   BOOT-CONSOLE vmm=kiln <line>               (LOG_CONSOLES=1: that boot's console)

MARKER=KILN-BOOT-INIT

# run_one VMM REP APPEND: one boot, killed at LIMIT_SECS. The VMM command lines: same kernel,
# initramfs, vCPUs and memory; Kiln adds its default command line itself, QEMU gets it spelled
# out in APPEND.
run_one() {
    vmm=$1
    run_rep=$2
    if [ "$vmm" = kiln ]; then
        set -- "$KILN" run --kernel "$KERNEL" --initrd "$INITRD" --cpus 1 --memory "$MEMORY" \
            --cmdline "$3" --console stdio
    else
        set -- "$QEMU" -M microvm -accel kvm -cpu host -smp 1 -m "$MEMORY" \
            -nodefaults -no-user-config -no-reboot -display none -serial stdio -L "$QEMU_DATA" \
            -kernel "$KERNEL" -initrd "$INITRD" -append "$3"
    fi
    echo "boot-bench: $vmm, repetition $run_rep" >&2
    result=$("$BOOTBENCH" "$LIMIT_SECS" "$MARKER" "$WORK/console" "$WORK/stderr" -- "$@")
    echo "BOOT-RUN vmm=$vmm rep=$run_rep $result"
    tr -d '\r' <"$WORK/console" | grep '^KILN-BOOT ' | sed "s/^/BOOT-LINE vmm=$vmm rep=$run_rep /"
    # Kiln's boot timer: process start to the guest init's write, measured by Kiln.
    sed -n 's/.*Guest-boot-time = *\([0-9]*\) us.*/KILN-BOOT timer_us=\1/p' "$WORK/stderr" |
        sed "s/^/BOOT-LINE vmm=$vmm rep=$run_rep /"
    case "$result" in
    "exit=0 timed_out=0 "*) grep -q "^$MARKER" "$WORK/console" && return 0 ;;
    esac
    tr -d '\r' <"$WORK/console" | tail -n 15 | sed "s/^/BOOT-TAIL vmm=$vmm rep=$run_rep console /"
    tail -n 15 "$WORK/stderr" | sed "s/^/BOOT-TAIL vmm=$vmm rep=$run_rep stderr /"
}

append_of() {
    if [ "$1" = kiln ]; then echo "$KILN_APPEND"; else echo "$QEMU_APPEND"; fi
}

# Kiln, QEMU, then QEMU, Kiln, ...: drift in the host's load hits both alike. One unmeasured
# warm-up run of each first (page cache, dynamic linking) unless there is a single repetition.
run_all() {
    echo "BOOT-VERSION kiln $("$KILN" --version 2>&1 | head -n 1)"
    case " $VMMS " in
    *" qemu "*) echo "BOOT-VERSION qemu $("$QEMU" --version 2>&1 | head -n 1)" ;;
    esac
    echo "BOOT-VERSION host $(uname -r) cpus=$(grep -c ^processor /proc/cpuinfo)"
    reversed=""
    for vmm in $VMMS; do
        reversed="$vmm $reversed"
    done
    if [ "$REPS" -gt 1 ]; then
        for vmm in $VMMS; do
            run_one "$vmm" 0 "$(append_of "$vmm") quiet" >/dev/null
        done
    fi
    rep=1
    while [ "$rep" -le "$REPS" ]; do
        order=$VMMS
        [ $((rep % 2)) -eq 1 ] || order=$reversed
        for vmm in $order; do
            run_one "$vmm" "$rep" "$(append_of "$vmm") quiet"
        done
        rep=$((rep + 1))
    done
    if [ "$LOG_CONSOLES" = 1 ]; then
        for vmm in $VMMS; do
            run_one "$vmm" dmesg "$(append_of "$vmm") quiet kiln.dmesg" >/dev/null
            tr -d '\r' <"$WORK/console" | sed "s/^/BOOT-CONSOLE vmm=$vmm /"
        done
    fi
    echo "BOOT-END"
}
