package vmtest

import (
	"fmt"
	"strings"
)

// guestInit is the guest's /init (busybox sh, PID 1). It sets the guest up the way duplex's
// code expects a host to be, runs /vmtest/run (written per run by runScript), and powers
// the guest off. Every step that fails is reported on the console and does not stop the
// run: the command's own failure then says more than a missing mount would.
//
// The cgroup layout copies the hybrid hosts duplex runs on (internal/workload,
// internal/testutil): v1 controllers each at /sys/fs/cgroup/<controller>, a named systemd
// hierarchy, and cgroup2 at /sys/fs/cgroup/unified.
const guestInit = `#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /root /etc /var
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
step() { "$@" || echo "vmtest-init: failed: $*"; }
step mount -t proc proc /proc
step mount -t sysfs sysfs /sys
step mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/mqueue
step mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
step mount -t tmpfs -o mode=1777 tmpfs /dev/shm
step mount -t mqueue mqueue /dev/mqueue
step mount -t tmpfs -o mode=1777 tmpfs /tmp
step mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/netns /run/lock
ln -sfn /run /var/run
step mount -t tracefs nodev /sys/kernel/tracing
step mount -t bpf bpf /sys/fs/bpf

step mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
	mkdir -p /sys/fs/cgroup/$c
	step mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
step mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
step mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified

rel=$(uname -r)
if [ -f /lib/modules/vmtest.load ]; then
	while read -r m; do
		[ -n "$m" ] && step insmod "/lib/modules/$rel/$m"
	done </lib/modules/vmtest.load
fi
step ip link set lo up
hostname vmtest
echo "vmtest-init: ready after $(cut -d' ' -f1 /proc/uptime) s"

sh /vmtest/run
echo "vmtest-init: done after $(cut -d' ' -f1 /proc/uptime) s"
poweroff -f
echo o >/proc/sysrq-trigger
`

// endMarker is the line the guest prints after the command, with its exit status.
func endMarker(nonce string) string { return "vmtest-exit-" + nonce }

// runScript is /vmtest/run: the environment, the command with its output on the second
// serial port (raw, so bytes pass unchanged), then the end marker on both ports.
func runScript(nonce string, env, command []string) string {
	var b strings.Builder
	b.WriteString("#!/bin/sh\n")
	for _, kv := range env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			continue
		}
		fmt.Fprintf(&b, "export %s=%s\n", k, shellQuote(v))
	}
	b.WriteString("stty -F /dev/ttyS1 raw -echo 2>/dev/null\ncd /root\n")
	for i, arg := range command {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(shellQuote(arg))
	}
	b.WriteString(" </dev/null >/dev/ttyS1 2>&1\nrc=$?\n")
	// The end marker opens and closes ttyS1 again: that last close waits until the port
	// has sent everything, so nothing is lost to the power-off that follows.
	fmt.Fprintf(&b, "echo \"%s $rc\" >/dev/ttyS1\necho \"%s $rc\"\n", endMarker(nonce), endMarker(nonce))
	return b.String()
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
