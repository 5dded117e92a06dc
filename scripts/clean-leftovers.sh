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
rm -rf /tmp/duplex-it-* /tmp/duplex-testbin-* 2>/dev/null
exit 0
