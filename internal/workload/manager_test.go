package workload_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

func newManager(t *testing.T, stateDir, parent string, eng *checkpoint.Engine) *workload.Manager {
	t.Helper()
	cfg := workload.Config{StateDir: stateDir, CgroupParent: parent, Log: testutil.Logger(t)}
	if eng != nil {
		cfg.Checkpointer = eng
	}
	m, err := workload.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.Close)
	return m
}

// stopAll kills whatever a test left running, so a failing test leaves nothing.
func stopAll(t *testing.T, m *workload.Manager) {
	t.Cleanup(func() {
		for _, r := range m.List() {
			if r.State == workload.Running || r.State == workload.Frozen {
				if _, err := m.Stop(context.Background(), r.Name, 0); err != nil {
					t.Errorf("cleanup: %v", err)
				}
			}
		}
		m.Cleanup()
	})
}

// lastCount returns the last complete number a counter printed.
func lastCount(t *testing.T, path string) int {
	t.Helper()
	nums := counts(t, path)
	if len(nums) == 0 {
		return 0
	}
	return nums[len(nums)-1]
}

func counts(t *testing.T, path string) []int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []int
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		n, err := strconv.Atoi(sc.Text())
		if err == nil {
			out = append(out, n)
		}
	}
	return out
}

func TestRunStopAndLogs(t *testing.T) {
	testutil.RequiresRoot(t)
	prog := testutil.Build(t, "./internal/testprog")
	parent := testutil.CgroupParent(t)
	m := newManager(t, t.TempDir(), parent, nil)
	stopAll(t, m)

	rec, err := m.Run(context.Background(), workload.Spec{Name: "count", Args: []string{prog, "counter"}})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "counter output", func() bool { return lastCount(t, rec.Stdout) >= 5 })

	// The root is PID 1 of its own namespace and leads its session there.
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", rec.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(status), fmt.Sprintf("NSpid:\t%d\t1\n", rec.Pid)) {
		t.Errorf("root is not PID 1 of its own namespace:\n%s", status)
	}
	if !strings.Contains(string(status), fmt.Sprintf("NSsid:\t%d\t1\n", rec.Pid)) {
		t.Errorf("root does not lead its session inside the namespace:\n%s", status)
	}
	// It sits in its own cgroup.
	cg, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", rec.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cg), "/"+parent+"/count") {
		t.Errorf("root not in its cgroup /%s/count:\n%s", parent, cg)
	}

	got, err := m.Stop(context.Background(), "count", 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != workload.Stopped || got.Pid != 0 {
		t.Errorf("after stop: state %s pid %d, want stopped and no pid", got.State, got.Pid)
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", rec.Pid)); err == nil {
		t.Errorf("pid %d still exists after stop", rec.Pid)
	}
	for _, root := range []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"} {
		if _, err := os.Stat(filepath.Join(root, parent, "count")); err == nil {
			t.Errorf("cgroup %s/%s/count left behind", root, parent)
		}
	}
	if err := m.Remove("count"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Get("count"); !errors.Is(err, workload.ErrNotFound) {
		t.Errorf("Get after Remove: %v, want ErrNotFound", err)
	}
}

func TestExitIsRecorded(t *testing.T) {
	testutil.RequiresRoot(t)
	m := newManager(t, t.TempDir(), testutil.CgroupParent(t), nil)
	stopAll(t, m)
	if _, err := m.Run(context.Background(), workload.Spec{Name: "short", Args: []string{"sh", "-c", "echo bye; exit 7"}}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "exit", func() bool {
		r, _ := m.Get("short")
		return r.State == workload.Exited
	})
	r, _ := m.Get("short")
	if r.ExitCode == nil || *r.ExitCode != 7 {
		t.Errorf("exit code %v, want 7", r.ExitCode)
	}
	b, _ := os.ReadFile(r.Stdout)
	if string(b) != "bye\n" {
		t.Errorf("stdout %q, want %q", b, "bye\n")
	}
}

func TestBadInput(t *testing.T) {
	testutil.RequiresRoot(t)
	state := t.TempDir()
	m := newManager(t, state, testutil.CgroupParent(t), nil)
	stopAll(t, m)
	ctx := context.Background()

	for _, tc := range []struct {
		spec workload.Spec
		want string
	}{
		{workload.Spec{Name: "nope", Args: []string{"/definitely/not/here"}}, "no such file"},
		{workload.Spec{Name: "nope", Args: []string{"no-such-command-xyz"}}, `"no-such-command-xyz" not found in PATH`},
		{workload.Spec{Name: "bad name!", Args: []string{"true"}}, "name"},
		{workload.Spec{Name: "nope", Args: nil}, "no command"},
		{workload.Spec{Name: "nope", Args: []string{"true"}, Cwd: "/no/such/dir"}, "working directory /no/such/dir does not exist"},
	} {
		_, err := m.Run(ctx, tc.spec)
		if !errors.Is(err, workload.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Run(%v): %v, want ErrInvalid mentioning %q", tc.spec.Args, err, tc.want)
		}
	}
	// Nothing half-done: no record, no state directory.
	if l := m.List(); len(l) != 0 {
		t.Errorf("failed runs left records: %+v", l)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 0 {
		t.Errorf("failed runs left state directories: %v", ents)
	}
	if _, err := m.Stop(ctx, "ghost", time.Second); !errors.Is(err, workload.ErrNotFound) {
		t.Errorf("Stop(ghost): %v, want ErrNotFound", err)
	}
}

func TestAdoptAfterRestart(t *testing.T) {
	testutil.RequiresRoot(t)
	prog := testutil.Build(t, "./internal/testprog")
	state, parent := t.TempDir(), testutil.CgroupParent(t)
	m1, err := workload.New(workload.Config{StateDir: state, CgroupParent: parent, Log: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := m1.Run(context.Background(), workload.Spec{Name: "survivor", Args: []string{prog, "counter"}})
	if err != nil {
		m1.Close()
		t.Fatal(err)
	}
	if _, err := m1.Run(context.Background(), workload.Spec{Name: "goner", Args: []string{prog, "counter"}}); err != nil {
		m1.Close()
		t.Fatal(err)
	}
	gone, _ := m1.Get("goner")
	m1.Close() // the daemon goes away; its workloads do not

	// One workload dies while nobody watches.
	if err := syscallKill(gone.Pid); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "goner to die", func() bool { return !procAlive(gone.Pid) })

	m2 := newManager(t, state, parent, nil)
	stopAll(t, m2)
	got, err := m2.Get("survivor")
	if err != nil {
		t.Fatal(err)
	}
	if got.State != workload.Running || got.Pid != rec.Pid {
		t.Fatalf("survivor after restart: %s pid %d, want running pid %d", got.State, got.Pid, rec.Pid)
	}
	lost, _ := m2.Get("goner")
	if lost.State != workload.Lost {
		t.Errorf("goner after restart: %s, want lost", lost.State)
	}
	// The adopted workload is still watched: its end is noticed.
	before := lastCount(t, rec.Stdout)
	testutil.Eventually(t, 5*time.Second, "counter to advance", func() bool { return lastCount(t, rec.Stdout) > before })
	if _, err := m2.Stop(context.Background(), "survivor", 0); err != nil {
		t.Fatal(err)
	}
	if procAlive(rec.Pid) {
		t.Errorf("adopted workload %d survived stop", rec.Pid)
	}
}

func TestMemoryLimit(t *testing.T) {
	testutil.RequiresRoot(t)
	parent := testutil.CgroupParent(t)
	m := newManager(t, t.TempDir(), parent, nil)
	stopAll(t, m)
	if _, err := m.Run(context.Background(), workload.Spec{Name: "capped", Args: []string{"sleep", "300"}, MemoryLimit: 64 << 20}); err != nil {
		t.Fatal(err)
	}
	var limit string
	for _, f := range []string{
		filepath.Join("/sys/fs/cgroup/memory", parent, "capped", "memory.limit_in_bytes"),
		filepath.Join("/sys/fs/cgroup", parent, "capped", "memory.max"),
	} {
		if b, err := os.ReadFile(f); err == nil {
			limit = strings.TrimSpace(string(b))
			break
		}
	}
	if limit != fmt.Sprint(64<<20) {
		t.Errorf("memory limit in the workload's cgroup is %q, want %d", limit, 64<<20)
	}
	if _, err := m.Run(context.Background(), workload.Spec{Name: "neg", Args: []string{"true"}, MemoryLimit: -1}); !errors.Is(err, workload.ErrInvalid) {
		t.Errorf("negative memory limit: %v, want ErrInvalid", err)
	}
}

// A root that handles SIGTERM gets the grace period and exits by itself; one that
// does not (a shell as namespace init ignores it) is killed at once.
func TestStopHonoursHandlers(t *testing.T) {
	testutil.RequiresRoot(t)
	m := newManager(t, t.TempDir(), testutil.CgroupParent(t), nil)
	stopAll(t, m)
	ctx := context.Background()
	if _, err := m.Run(ctx, workload.Spec{Name: "polite", Args: []string{"sh", "-c", "trap 'echo bye; exit 3' TERM; while :; do sleep 0.05; done"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Run(ctx, workload.Spec{Name: "deaf", Args: []string{"sh", "-c", "while :; do sleep 0.05; done"}}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // let the shell install its trap

	start := time.Now()
	r, err := m.Stop(ctx, "deaf", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("stopping a root without a SIGTERM handler took %s", took)
	}
	if r.ExitCode == nil || *r.ExitCode != 128+9 {
		t.Errorf("deaf exit code %v, want SIGKILL (137)", r.ExitCode)
	}
	r, err = m.Stop(ctx, "polite", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if r.ExitCode == nil || *r.ExitCode != 3 {
		t.Errorf("polite exit code %v, want 3 from its own TERM handler", r.ExitCode)
	}
}
