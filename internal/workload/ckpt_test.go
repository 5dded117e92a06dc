package workload_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

func TestCounterSurvivesCheckpointRestore(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	prog := testutil.Build(t, "./internal/testprog")
	m := newManager(t, t.TempDir(), testutil.CgroupParent(t), eng)
	stopAll(t, m)
	ctx := context.Background()

	rec, err := m.Run(ctx, workload.Spec{Name: "counter", Args: []string{prog, "counter"}})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "counter output", func() bool { return lastCount(t, rec.Stdout) >= 10 })

	dir := t.TempDir()
	st, err := m.Checkpoint(ctx, "counter", workload.CheckpointOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if st.FrozenTime <= 0 || st.PagesWritten == 0 {
		t.Errorf("dump stats look empty: %+v", st)
	}
	got, _ := m.Get("counter")
	if got.State != workload.Checkpointed || procAlive(rec.Pid) {
		t.Fatalf("after checkpoint: state %s, source alive %v; want checkpointed and gone", got.State, procAlive(rec.Pid))
	}
	atDump := lastCount(t, rec.Stdout)
	time.Sleep(100 * time.Millisecond)
	if n := lastCount(t, rec.Stdout); n != atDump {
		t.Fatalf("counter advanced from %d to %d while checkpointed", atDump, n)
	}

	restored, res, err := m.Restore(ctx, workload.RestoreOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if restored.State != workload.Running || restored.Pid != res.Pid || restored.Restores != 1 {
		t.Fatalf("restored record: %+v", restored)
	}
	testutil.Eventually(t, 5*time.Second, "counter to advance after restore", func() bool { return lastCount(t, rec.Stdout) > atDump+5 })
	// Counting went on from where it was: every number once, in order.
	nums := counts(t, rec.Stdout)
	for i, n := range nums {
		if n != i+1 {
			t.Fatalf("line %d is %d: the counter restarted or skipped (around %v)", i+1, n, nums[max(0, i-3):min(len(nums), i+3)])
		}
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", res.Pid))
	if !strings.Contains(string(status), "\t1\n") || !strings.Contains(string(status), "NSpid:") {
		t.Errorf("restored root is not PID 1 of a namespace:\n%s", status)
	}
}

// complexStatus asks a testprog complex tree for its status.
func complexStatus(t *testing.T, port int) (st struct {
	Counter, Sent, Acked, FileOffset  int64
	ChildPid, ZombiePid, Threads, Pid int
	File                              string
}) {
	t.Helper()
	c, err := net.DialTimeout("tcp4", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err != nil {
		t.Fatalf("connect to the tree's listening socket: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	var raw map[string]any
	if err := json.NewDecoder(c).Decode(&raw); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(raw)
	dec := json.NewDecoder(strings.NewReader(strings.NewReplacer("_", "").Replace(string(b))))
	if err := dec.Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestComplexTreeSurvivesCheckpointRestore(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	prog := testutil.Build(t, "./internal/testprog")
	m := newManager(t, t.TempDir(), testutil.CgroupParent(t), eng)
	stopAll(t, m)
	ctx := context.Background()
	data := t.TempDir()

	rec, err := m.Run(ctx, workload.Spec{Name: "tree", Args: []string{prog, "complex", data},
		// Go listens with MPTCP by default, which CRIU cannot dump.
		Env: []string{"PATH=/usr/bin:/bin", "GODEBUG=multipathtcp=0"}})
	if err != nil {
		t.Fatal(err)
	}
	var port int
	testutil.Eventually(t, 5*time.Second, "the tree's port", func() bool {
		b, _ := os.ReadFile(rec.Stdout)
		_, err := fmt.Sscanf(string(b), "PORT %d", &port)
		return err == nil
	})
	testutil.Eventually(t, 5*time.Second, "pipe traffic", func() bool { return complexStatus(t, port).Acked > 10 })
	before := complexStatus(t, port)

	dir := t.TempDir()
	if _, err := m.Checkpoint(ctx, "tree", workload.CheckpointOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	if procAlive(rec.Pid) {
		t.Fatal("source tree still alive after checkpoint")
	}
	// The zombie's stat is read in the tree's own /proc, which the dump makes
	// only for trees with zombies (contrib/criu/proc-fd-zombies-only.patch).
	if b, err := os.ReadFile(filepath.Join(dir, checkpoint.DumpLog)); err != nil {
		t.Error(err)
	} else if strings.Contains(string(b), "No zombies") || !strings.Contains(string(b), "Obtaining zombie stat") {
		t.Errorf("the dump of a tree with a zombie did not read it through the tree's /proc (see %s)", checkpoint.DumpLog)
	}
	_, res, err := m.Restore(ctx, workload.RestoreOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}

	after := complexStatus(t, port) // the listening socket is back
	if after.Counter < before.Counter {
		t.Errorf("counter went back from %d to %d", before.Counter, after.Counter)
	}
	if after.File != "complex-tree-data" || after.FileOffset != before.FileOffset {
		t.Errorf("open file: %q at %d after restore, want %q at %d", after.File, after.FileOffset, "complex-tree-data", before.FileOffset)
	}
	if after.Pid != 1 || after.ChildPid != before.ChildPid || after.ZombiePid != before.ZombiePid {
		t.Errorf("PIDs inside the namespace changed: before %+v after %+v", before, after)
	}
	if after.Threads < 5 || after.Threads < before.Threads {
		t.Errorf("threads: %d before, %d after restore", before.Threads, after.Threads)
	}
	// The pipe keeps carrying an unbroken sequence to the live child.
	testutil.Eventually(t, 5*time.Second, "pipe traffic after restore", func() bool {
		return complexStatus(t, port).Acked > after.Acked+5
	})
	// The zombie is still a zombie child of the root, the reader still alive.
	pids, err := checkpoint.TreePids(res.Pid)
	if err != nil {
		t.Fatal(err)
	}
	var zombies, live int
	for _, p := range pids[1:] {
		if procAlive(p) {
			live++
		} else {
			zombies++
		}
	}
	if zombies != 1 || live != 1 {
		t.Errorf("restored tree %v: %d live children and %d zombies, want 1 and 1", pids, live, zombies)
	}
}

func TestCheckpointBadInput(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	prog := testutil.Build(t, "./internal/testprog")
	m := newManager(t, t.TempDir(), testutil.CgroupParent(t), eng)
	stopAll(t, m)
	ctx := context.Background()

	if _, err := m.Checkpoint(ctx, "ghost", workload.CheckpointOptions{Dir: t.TempDir()}); !errors.Is(err, workload.ErrNotFound) {
		t.Errorf("checkpoint of unknown workload: %v, want ErrNotFound", err)
	}
	rec, err := m.Run(ctx, workload.Spec{Name: "c", Args: []string{prog, "counter"}})
	if err != nil {
		t.Fatal(err)
	}
	// An image directory nobody can write to (a file stands in its parent's place).
	blocker := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(blocker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = m.Checkpoint(ctx, "c", workload.CheckpointOptions{Dir: filepath.Join(blocker, "images")})
	if err == nil || !strings.Contains(err.Error(), "image directory") {
		t.Errorf("checkpoint into unwritable dir: %v, want an image-directory error", err)
	}
	// A read-only mount is unwritable even for root.
	ro := t.TempDir()
	if err := mountReadOnly(t, ro); err == nil {
		_, err = m.Checkpoint(ctx, "c", workload.CheckpointOptions{Dir: ro})
		if err == nil || !strings.Contains(err.Error(), "not writable") {
			t.Errorf("checkpoint into read-only dir: %v, want 'not writable'", err)
		}
	}
	// Nothing happened to the workload.
	got, _ := m.Get("c")
	if got.State != workload.Running || !procAlive(rec.Pid) {
		t.Errorf("workload after failed checkpoints: %s, alive %v", got.State, procAlive(rec.Pid))
	}
	before := lastCount(t, rec.Stdout)
	testutil.Eventually(t, 5*time.Second, "counter still counting", func() bool { return lastCount(t, rec.Stdout) > before })

	// Restoring from a directory that holds no checkpoint.
	if _, _, err := m.Restore(ctx, workload.RestoreOptions{Dir: t.TempDir()}); !errors.Is(err, workload.ErrInvalid) {
		t.Errorf("restore from empty dir: %v, want ErrInvalid", err)
	}
}

// A restore on another host lands in that host's cgroup for the workload, made
// there with the workload's memory limit, not in the source's cgroup path.
func TestRestoreIntoThisHostsCgroup(t *testing.T) {
	src, dst, dstParent, rec := twoHostsWithCounter(t, "capped", 96<<20)
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := src.Checkpoint(ctx, "capped", workload.CheckpointOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	restored, res, err := dst.Restore(ctx, workload.RestoreOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	want := "/" + filepath.Join(dstParent, "capped")
	if restored.Cgroup != want {
		t.Errorf("restored record's cgroup %s, want %s", restored.Cgroup, want)
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		return // no v1 memory hierarchy to look at (a unified host)
	}
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", res.Pid))
	if !strings.Contains(string(cg), ":memory:"+want+"\n") {
		t.Errorf("restored tree's cgroups:\n%s\nwant memory:%s", cg, want)
	}
	limit, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", want, "memory.limit_in_bytes"))
	if strings.TrimSpace(string(limit)) != fmt.Sprint(96<<20) {
		t.Errorf("memory limit there %q, want %d", limit, 96<<20)
	}
	n := lastCount(t, rec.Stdout)
	testutil.Eventually(t, 5*time.Second, "counter to go on", func() bool { return lastCount(t, rec.Stdout) > n+3 })
}

// A restore prepared ahead (cgroup made, CRIU waiting inside it) restores into that
// cgroup; one never used leaves nothing behind; a name already running here is
// refused.
func TestPreparedRestore(t *testing.T) {
	src, dst, dstParent, rec := twoHostsWithCounter(t, "ahead", 80<<20)
	ctx := context.Background()
	if _, err := src.PrepareRestore(rec); !errors.Is(err, workload.ErrExists) {
		t.Errorf("preparing to restore a workload running here: %v, want ErrExists", err)
	}

	v1 := true
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err != nil {
		v1 = false
	}
	want := "/" + filepath.Join(dstParent, "ahead")
	p, err := dst.PrepareRestore(rec)
	if err != nil {
		t.Fatal(err)
	}
	if v1 {
		limit, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", want, "memory.limit_in_bytes"))
		if strings.TrimSpace(string(limit)) != fmt.Sprint(80<<20) {
			t.Errorf("prepared cgroup's memory limit %q, want %d", limit, 80<<20)
		}
		procs, _ := os.ReadFile(filepath.Join("/sys/fs/cgroup/memory", want, "cgroup.procs"))
		if len(strings.Fields(string(procs))) != 1 {
			t.Errorf("prepared cgroup holds %q, want CRIU's one process", procs)
		}
	}
	dir := t.TempDir()
	if _, err := src.Checkpoint(ctx, "ahead", workload.CheckpointOptions{Dir: dir}); err != nil {
		t.Fatal(err)
	}
	restored, res, err := dst.Restore(ctx, workload.RestoreOptions{Dir: dir, Prepared: p})
	if err != nil {
		t.Fatal(err)
	}
	p.Close() // a no-op after the restore took it
	if !res.Placed || restored.Cgroup != want {
		t.Errorf("restore placed %v into %s, want placed into %s", res.Placed, restored.Cgroup, want)
	}
	if v1 {
		cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", res.Pid))
		if !strings.Contains(string(cg), ":memory:"+want+"\n") {
			t.Errorf("restored tree's cgroups:\n%s\nwant memory:%s", cg, want)
		}
	}
	n := lastCount(t, rec.Stdout)
	testutil.Eventually(t, 5*time.Second, "counter to go on", func() bool { return lastCount(t, rec.Stdout) > n+2 })

	// Prepared and never used: Close removes the cgroup and its CRIU process.
	unused, err := dst.PrepareRestore(workload.Record{Spec: workload.Spec{Name: "never"}})
	if err != nil {
		t.Fatal(err)
	}
	never := filepath.Join("/sys/fs/cgroup/memory", dstParent, "never")
	if !v1 {
		never = filepath.Join("/sys/fs/cgroup", dstParent, "never")
	}
	if _, err := os.Stat(never); err != nil {
		t.Fatalf("prepared cgroup: %v", err)
	}
	unused.Close()
	if _, err := os.Stat(never); !os.IsNotExist(err) {
		t.Errorf("cgroup of an unused preparation still there: %v", err)
	}
}

// twoHostsWithCounter makes a source and a destination manager (each its own state
// directory and cgroup parent, as on two hosts) and runs a counter named name on
// the source with the memory limit, once it counts.
func twoHostsWithCounter(t *testing.T, name string, limit int64) (src, dst *workload.Manager, dstParent string, rec workload.Record) {
	t.Helper()
	eng := testutil.RequiresCRIU(t)
	prog := testutil.Build(t, "./internal/testprog")
	src = newManager(t, t.TempDir(), testutil.CgroupParent(t), eng)
	dstParent = testutil.CgroupParent(t)
	dst = newManager(t, t.TempDir(), dstParent, eng)
	stopAll(t, src)
	stopAll(t, dst)
	rec, err := src.Run(context.Background(), workload.Spec{Name: name, Args: []string{prog, "counter"}, MemoryLimit: limit})
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "counter output", func() bool { return lastCount(t, rec.Stdout) >= 3 })
	return src, dst, dstParent, rec
}
