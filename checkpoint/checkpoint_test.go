package checkpoint_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/internal/workload"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

// launch starts testprog args as a managed workload (own PID namespace and cgroup)
// and kills it when the test ends.
func launch(t testing.TB, name string, args ...string) workload.Record {
	t.Helper()
	return launchProg(t, name, testutil.Build(t, "./internal/testprog"), args...)
}

// launchProg starts prog args as a managed workload, like launch.
func launchProg(t testing.TB, name, prog string, args ...string) workload.Record {
	t.Helper()
	m, err := workload.New(workload.Config{StateDir: t.TempDir(), CgroupParent: testutil.CgroupParent(t), Log: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rec, err := m.Run(context.Background(), workload.Spec{Name: name, Args: append([]string{prog}, args...),
		// Go listens with MPTCP by default, which CRIU cannot dump.
		Env: []string{"PATH=/usr/bin:/bin", "GODEBUG=multipathtcp=0"}})
	if err != nil {
		m.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = m.Stop(context.Background(), name, 0)
		m.Close()
		m.Cleanup()
	})
	return rec
}

// procState returns the state letter of pid ('R', 'S', 'T', 'Z', ...), 0 if gone.
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	return s[strings.LastIndexByte(s, ')')+2]
}

// stopped waits until pid is in the stopped state.
func stopped(t *testing.T, pid int) {
	t.Helper()
	testutil.Eventually(t, 2*time.Second, fmt.Sprintf("pid %d to show as stopped", pid), func() bool { return procState(pid) == 'T' })
}

func logSize(t testing.TB, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// grows waits until the file at path grows.
func grows(t *testing.T, path, what string) {
	t.Helper()
	before := logSize(t, path)
	testutil.Eventually(t, 5*time.Second, what, func() bool { return logSize(t, path) > before })
}

// killChild kills a restored root (our child, thanks to restore-sibling mode) and reaps it.
func killChild(pid int) {
	_ = unix.Kill(pid, unix.SIGKILL)
	var ws unix.WaitStatus
	_, _ = unix.Wait4(pid, &ws, 0, nil)
}

func TestRestoreNextToFrozenSourceThenRollBack(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	rec := launch(t, "twin", "counter")
	grows(t, rec.Stdout, "counter output")
	ctx := context.Background()
	dir := t.TempDir()

	st, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, LeaveStopped: true, ManageCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.FrozenTime <= 0 || st.PagesWritten == 0 {
		t.Errorf("dump stats look empty: %+v", st)
	}
	// CRIU detaches with SIGSTOP pending: the task may show as runnable for a moment,
	// but it runs no code of its own before it stops.
	stopped(t, rec.Pid)

	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Pid == rec.Pid || res.RestoreTime <= 0 {
		t.Errorf("restore result %+v (source pid %d)", res, rec.Pid)
	}
	// The copy counts while the source stays frozen beside it on the same kernel.
	grows(t, rec.Stdout, "the restored copy to count")
	if s := procState(rec.Pid); s != 'T' {
		t.Errorf("source state %q while its copy runs, want still stopped", s)
	}

	// The caller chooses to roll back: the copy goes, the source resumes.
	killChild(res.Pid)
	if err := checkpoint.Resume(rec.Pid); err != nil {
		t.Fatal(err)
	}
	if s := procState(rec.Pid); s == 'T' || s == 0 {
		t.Fatalf("source state %q after resume", s)
	}
	grows(t, rec.Stdout, "the resumed source to count")
}

func TestRestoreWithMissingFileFailsAndSourceResumes(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	held := filepath.Join(t.TempDir(), "held-open.dat")
	rec := launch(t, "holder", "openfile", held)
	grows(t, rec.Stdout, "counter output")
	ctx := context.Background()
	dir := t.TempDir()

	if _, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, LeaveStopped: true, ManageCgroups: true}); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(held); err != nil {
		t.Fatal(err)
	}
	_, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true})
	if err == nil {
		t.Fatal("restore succeeded without the file the tree had open")
	}
	t.Logf("restore error:\n%v", err)
	if !errors.Is(err, checkpoint.ErrMissingFile) {
		t.Errorf("error does not match ErrMissingFile: %v", err)
	}
	var mf *checkpoint.MissingFileError
	if !errors.As(err, &mf) || mf.Path != held {
		t.Errorf("missing file reported as %v, want %s", mf, held)
	}
	if !strings.Contains(err.Error(), held) {
		t.Errorf("error text does not name %s", held)
	}
	if strings.Contains(err.Error(), "RLIMIT_NOFILE") {
		t.Errorf("error quotes CRIU's harmless rlimit line as a cause")
	}
	if s := procState(rec.Pid); s != 'T' {
		t.Fatalf("source state %q after the failed restore, want still stopped", s)
	}
	if err := checkpoint.Resume(rec.Pid); err != nil {
		t.Fatal(err)
	}
	grows(t, rec.Stdout, "the resumed source to count")
}

func TestDumpOfMissingProcess(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	_, err := eng.Dump(context.Background(), checkpoint.DumpOptions{Pid: 1 << 30, ImagesDir: t.TempDir()})
	var ce *checkpoint.CRIUError
	if !errors.As(err, &ce) || len(ce.Lines) == 0 {
		t.Fatalf("dump of a missing pid: %v, want a CRIUError quoting its log", err)
	}
}

func TestPreDumpNeedsDirtyTracking(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	ok, err := eng.HasFeature(context.Background(), checkpoint.FeatureMemDirtyTrack)
	if err != nil {
		t.Fatal(err)
	}
	if ok {
		t.Skip("this kernel tracks dirty memory; the refusal path does not apply")
	}
	_, err = eng.PreDump(context.Background(), checkpoint.DumpOptions{Pid: os.Getpid(), ImagesDir: t.TempDir()})
	if !errors.Is(err, checkpoint.ErrNotSupported) {
		t.Fatalf("pre-dump without dirty tracking: %v, want ErrNotSupported", err)
	}
}

func TestVersion(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	v, err := eng.Version(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !v.AtLeast(3, 0) {
		t.Errorf("implausible CRIU version %s", v)
	}
}

// childrenOf lists this test process's children.
func childrenOf(t *testing.T) map[int]bool {
	t.Helper()
	out := map[int]bool{}
	paths, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", os.Getpid()))
	for _, p := range paths {
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			var pid int
			if _, err := fmt.Sscan(f, &pid); err == nil {
				out[pid] = true
			}
		}
	}
	return out
}
