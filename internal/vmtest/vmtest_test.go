package vmtest_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/vmtest"
)

// logWriter streams the guest's console into the test log.
type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// goBuild runs the go tool in the module root with a static (cgo-free) build.
func goBuild(t *testing.T, args ...string) {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = testutil.ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// guestChecks runs in the guest. Each check prints "PASS name" or "FAIL name"; the
// test wants every name below to pass.
const guestChecks = `
check() { name=$1; shift; if "$@" >/tmp/check.out 2>&1; then echo "PASS $name"; else echo "FAIL $name:"; cat /tmp/check.out; fi; }
uname -r
check mem_dirty_track criu check --feature mem_dirty_track
check nftables_lock criu check --feature network_lock_nftables

# Iterative pre-copy by hand: a PID-namespace init (its own session leader), two memory
# pre-dumps with dirty tracking, then the final dump on top of them.
unshare -p -f setsid sleep 1000 </dev/null >/dev/null 2>&1 &
for i in $(seq 50); do pid=$(cat /proc/$!/task/$!/children) && [ -n "$pid" ] && break; sleep 0.1; done
pid=${pid% }
mkdir -p /tmp/img/1 /tmp/img/2 /tmp/img/3
check pre_dump_1 criu pre-dump -t "$pid" -D /tmp/img/1 --track-mem -o pre1.log
check pre_dump_2 criu pre-dump -t "$pid" -D /tmp/img/2 --prev-images-dir ../1 --track-mem -o pre2.log
check final_dump criu dump -t "$pid" -D /tmp/img/3 --prev-images-dir ../2 --track-mem -o dump.log

check nft_table sh -c 'nft add table inet vmtest && nft add chain inet vmtest out "{ type filter hook output priority 0; }" && nft list tables | grep -q "inet vmtest"'
# Busybox's sh runs its own ip applet for a bare "ip": name iproute2's by its path.
ip=/usr/sbin/ip
check netns_veth_bridge sh -c "$ip netns add vt-a && $ip link add vt-br type bridge && $ip link add vt0 type veth peer name vt1 netns vt-a && $ip link set vt0 master vt-br && $ip link set vt-br up && $ip link set vt0 up"
check cgroup_v1_memory sh -c 'mkdir /sys/fs/cgroup/memory/vt && echo 1048576 >/sys/fs/cgroup/memory/vt/memory.kmem.tcp.limit_in_bytes'
check cgroup2_unified sh -c 'grep -q "cgroup2 /sys/fs/cgroup/unified" /proc/mounts && mkdir /sys/fs/cgroup/unified/vt && test -f /sys/fs/cgroup/unified/vt/cgroup.freeze'
check tracefs test -d /sys/kernel/tracing/events
`

var guestCheckNames = []string{"mem_dirty_track", "nftables_lock", "pre_dump_1", "pre_dump_2", "final_dump",
	"nft_table", "netns_veth_bridge", "cgroup_v1_memory", "cgroup2_unified", "tracefs"}

// The guest kernel tracks dirty memory where this host's does not, so CRIU's iterative
// pre-dump (the core of pre-copy migration) runs there; the other ingredients of a
// migration test (nftables, veth, bridge, network namespaces, hybrid cgroups) work too.
func TestGuestKernelTracksDirtyMemory(t *testing.T) {
	testutil.RequiresVM(t)
	eng := testutil.RequiresCRIU(t)
	if ok, err := eng.HasFeature(context.Background(), checkpoint.FeatureMemDirtyTrack); err != nil {
		t.Fatal(err)
	} else if ok {
		t.Log("note: this host's kernel tracks dirty memory itself")
	} else {
		t.Log("this host's kernel does not track dirty memory: criu check --feature mem_dirty_track fails here")
	}

	res, err := vmtest.Run(context.Background(), vmtest.Config{
		Command: []string{"sh", "-c", guestChecks},
		Timeout: 2 * time.Minute,
		Console: logWriter{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest (%s) ran in %s, exit %d", res.Accel, res.Wall.Round(time.Millisecond), res.ExitCode)
	for _, name := range guestCheckNames {
		if !strings.Contains(res.Output, "PASS "+name+"\n") {
			t.Errorf("guest check %s did not pass", name)
		}
	}
	if t.Failed() {
		t.Logf("guest output:\n%s", res.Output)
	}
}

// A static Go test binary runs in the guest: two of the checkpoint package's real CRIU
// tests (dump + restore beside the frozen source; an established TCP connection under the
// nftables network lock), with the helper program prebuilt and found via testutil's
// DUPLEX_TESTBIN_DIR.
func TestCheckpointTestsRunInGuest(t *testing.T) {
	testutil.RequiresVM(t)
	dir := t.TempDir()
	goBuild(t, "test", "-c", "-o", filepath.Join(dir, "checkpoint.test"), "./checkpoint")
	goBuild(t, "build", "-o", filepath.Join(dir, "bin", "testprog"), "./internal/testprog")

	tests := []string{"TestRestoreNextToFrozenSourceThenRollBack", "TestEstablishedTCPConnection"}
	res, err := vmtest.Run(context.Background(), vmtest.Config{
		Files: map[string]string{
			"/duplex/checkpoint.test": filepath.Join(dir, "checkpoint.test"),
			"/duplex/bin":             filepath.Join(dir, "bin"),
		},
		Env: []string{testutil.EnvTestBinDir + "=/duplex/bin"},
		Command: []string{"/duplex/checkpoint.test", "-test.v", "-test.count=1",
			"-test.run", "^(" + strings.Join(tests, "|") + ")$"},
		Timeout: 3 * time.Minute,
		Console: logWriter{t},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest (%s) ran in %s, exit %d", res.Accel, res.Wall.Round(time.Millisecond), res.ExitCode)
	if res.ExitCode != 0 {
		t.Errorf("checkpoint.test exited %d in the guest", res.ExitCode)
	}
	for _, name := range tests {
		if !strings.Contains(res.Output, "--- PASS: "+name+" ") {
			t.Errorf("%s did not pass in the guest", name)
		}
	}
}

func TestExitStatusAndOutput(t *testing.T) {
	testutil.RequiresVM(t)
	res, err := vmtest.Run(context.Background(), vmtest.Config{
		Command:   []string{"sh", "-c", `echo "out $GREETING"; echo err >&2; printf no-newline; exit 7`},
		Env:       []string{"GREETING=it's here"},
		MemoryMiB: 512,
		Timeout:   time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("guest (%s) ran in %s", res.Accel, res.Wall.Round(time.Millisecond))
	if res.ExitCode != 7 {
		t.Errorf("exit code %d, want 7", res.ExitCode)
	}
	if want := "out it's here\nerr\nno-newline"; res.Output != want {
		t.Errorf("output %q, want %q", res.Output, want)
	}
}

// Run a command in a guest with a kernel that tracks dirty memory.
func ExampleRun() {
	res, err := vmtest.Run(context.Background(), vmtest.Config{
		Files:   map[string]string{"/duplex/migrate.test": "/tmp/migrate.test"}, // CGO_ENABLED=0 go test -c ./migrate
		Command: []string{"/duplex/migrate.test", "-test.v", "-test.run", "PreCopy"},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("exit %d after %s with %s\n%s", res.ExitCode, res.Wall, res.Accel, res.Output)
}
