#!/bin/sh
# Written by resources/bench/net/run: the guest half of one run.
ip addr add 10.8.0.2/24 dev eth0 && ip link set eth0 up
tries=0
until ping -c 1 -W 1 10.8.0.1 >/dev/null 2>&1 || [ $tries -ge 100 ]; do tries=$((tries + 1)); done
rtt=$(ping -c "$PINGS" -i 0.02 10.8.0.1 | sed -n 's|.*= [0-9.]*/\([0-9.]*\)/.*|\1|p')
now() { cut -d' ' -f1 /proc/uptime; }
start=$(now)
dd if=/dev/zero bs=65536 count=$((MIB * 16)) 2>/dev/null | nc 10.8.0.1 5001
end=$(now)
tx=$(awk -v m="$MIB" -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", m / (b - a) }')
mkfifo /tmp/hold
exec 5<>/tmp/hold
nc -l -p 5002 <&5 >/dev/null &
sleep 0.5
echo GUEST-LISTENING
wait $!
echo "NET-GUEST rtt_us=$(awk -v r="$rtt" 'BEGIN { printf "%.0f", r * 1000 }') tx_mibs=$tx"
