#!/usr/bin/env bash
# Removes what a crashed test run may leave behind: its workloads (processes in
# duplex-test-* cgroups), those cgroups, and its temporary directories.
set -uo pipefail
for root in /sys/fs/cgroup/memory /sys/fs/cgroup/unified /sys/fs/cgroup; do
	for parent in "$root"/duplex-test-*; do
		[ -d "$parent" ] || continue
		for cg in "$parent"/*/ "$parent"/; do
			[ -f "$cg/cgroup.procs" ] || continue
			while read -r pid; do
				[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null && echo "clean: killed $pid in $cg"
			done <"$cg/cgroup.procs"
		done
		sleep 0.2
		find "$parent" -mindepth 1 -depth -type d -exec rmdir {} \; 2>/dev/null
		rmdir "$parent" 2>/dev/null && echo "clean: removed cgroup $parent"
	done
done
pkill -9 -f '/tmp/duplex-(it|testbin)-[^ ]*/duplexd' 2>/dev/null && echo "clean: killed stray test duplexd"
# Mounts a killed CRIU left in its work directory (its cgroup yard).
awk '{print $5}' /proc/self/mountinfo | grep '/\.criu\.cgyard\.' | sort -r | while read -r m; do
	umount -l "$m" && echo "clean: unmounted $m"
done
# Network locks of dumps whose tree was killed before they were undone.
if command -v nft >/dev/null; then
	for t in $(nft list tables 2>/dev/null | awk '/inet CRIU-/{print $3}'); do
		nft delete table inet "$t" && echo "clean: removed nftables table $t"
	done
fi
# VM guests of internal/vmtest whose test process died (QEMU runs as process duplex-vmtest).
pkill -9 -x duplex-vmtest 2>/dev/null && echo "clean: killed stray vmtest guest"
rm -rf /tmp/duplex-it-* /tmp/duplex-testbin-* /tmp/duplex-vmtest-* 2>/dev/null
# Network namespaces of integration/harness clusters (<prefix>-<8 hex>-sw|hN|cN, the
# prefix starting with dpx) and of netfail's tests (dpxnf<8 hex>a|b|c|s): kill what
# still runs inside, then delete them (their veths and bridge go with them).
ip netns list 2>/dev/null | awk '{print $1}' |
	grep -E '^(dpx[A-Za-z0-9_]*-[0-9a-f]{8}-(sw|[hc][0-9]+)|dpxnf[0-9a-f]{8}[abcs])$' |
	while read -r ns; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do
			kill -9 "$pid" 2>/dev/null && echo "clean: killed $pid in netns $ns"
		done
		ip netns delete "$ns" 2>/dev/null && echo "clean: removed netns $ns"
	done
exit 0
