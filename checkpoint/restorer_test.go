package checkpoint_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// A restorer started ahead serves one restore; an unused one is killed by Close.
func TestRestorerStartedAhead(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	rec := launch(t, "ahead", "counter")
	grows(t, rec.Stdout, "counter output")
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, LeaveStopped: true, ManageCgroups: true}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = checkpoint.Resume(rec.Pid) }()

	var placedPid int
	r, err := eng.StartRestorer(func(pid int) error { placedPid = pid; return nil })
	if err != nil {
		t.Fatal(err)
	}
	if placedPid <= 0 || procState(placedPid) == 0 {
		t.Fatalf("place saw pid %d, which does not run", placedPid)
	}
	// (CRIU may still be on its way through the wrapper's exec: while a process
	// execs, its command line reads empty.)
	testutil.Eventually(t, 2*time.Second, fmt.Sprintf("placed pid %d to be a CRIU swrk", placedPid), func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", placedPid))
		return strings.Contains(string(b), "swrk")
	})
	res, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true, Restorer: r,
		Place: func(int) error { t.Error("Place called although the restorer was placed"); return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer killChild(res.Pid)
	if !res.Placed {
		t.Error("restore through a placed restorer not reported as placed")
	}
	// It probed the kernel while it waited, not inside the restore: CRIU logs the
	// early probe's lines first, from its early-log buffer, and its version once
	// the request opened the log.
	if early, _ := eng.HasFeature(ctx, checkpoint.FeatureSwrkEarlyKerndat); early {
		b, err := os.ReadFile(filepath.Join(dir, checkpoint.RestoreLog))
		if err != nil {
			t.Fatal(err)
		}
		log := string(b)
		probe, version := strings.Index(log, "Loaded kdat cache"), strings.Index(log, "Version: ")
		if probe < 0 || version < 0 || probe > version {
			t.Errorf("the restore started ahead did not load the kerndat cache before its request (at %d, request at %d):\n%s",
				probe, version, log[:min(len(log), 1000)])
		}
	}
	grows(t, rec.Stdout, "the restored copy to count")
	if procState(placedPid) != 0 {
		t.Errorf("the restorer's CRIU (pid %d) still runs after the restore", placedPid)
	}
	// It served its one restore.
	if _, err := eng.Restore(ctx, checkpoint.RestoreOptions{ImagesDir: dir, Restorer: r}); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Errorf("second restore through the same restorer: %v", err)
	}
	r.Close() // a no-op now

	unused, err := eng.StartRestorer(nil)
	if err != nil {
		t.Fatal(err)
	}
	kids := childrenOf(t)
	unused.Close()
	testutil.Eventually(t, 2*time.Second, "the unused restorer to exit", func() bool { return len(childrenOf(t)) < len(kids) })
}

// CRIU is told not to use hardware breakpoints unless the engine allows them.
func TestHardwareBreakpointsOff(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	for _, hw := range []bool{false, true} {
		rec := launch(t, "bp"+map[bool]string{false: "off", true: "on"}[hw], "counter")
		grows(t, rec.Stdout, "counter output")
		e := checkpoint.New(eng.CRIUPath)
		e.HardwareBreakpoints = hw
		dir := t.TempDir()
		if _, err := e.Dump(context.Background(), checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, LeaveStopped: true, ManageCgroups: true}); err != nil {
			t.Fatal(err)
		}
		if err := checkpoint.Resume(rec.Pid); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(dir, checkpoint.DumpLog))
		if err != nil {
			t.Fatal(err)
		}
		stepped := strings.Contains(string(b), "Force no-breakpoints")
		if stepped == hw {
			t.Errorf("HardwareBreakpoints=%v: CRIU's log says no-breakpoints mode is %v", hw, stepped)
		}
	}
}

func TestSeizeWatch(t *testing.T) {
	testutil.RequiresRoot(t)
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	pid := cmd.Process.Pid

	w := checkpoint.WatchSeize(pid)
	time.Sleep(20 * time.Millisecond)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before := time.Now()
	if err := unix.PtraceSeize(pid); err != nil {
		t.Fatal(err)
	}
	after := time.Now()
	defer func() { _ = unix.PtraceDetach(pid) }()
	time.Sleep(20 * time.Millisecond) // the watch polls every 0.1 ms
	at, ok := w.Seized()
	if !ok || at.After(after) || before.Sub(at) > 50*time.Millisecond {
		t.Errorf("seize between %v and %v, watch says last untraced at %v (ok %v)", before, after, at, ok)
	}

	// A process traced from the start gives no answer rather than a wrong one.
	w2 := checkpoint.WatchSeize(pid)
	if _, ok := w2.Seized(); ok {
		t.Error("a process already traced when the watch began reported a seize")
	}
	// Nor does one that never gets seized.
	w3 := checkpoint.WatchSeize(os.Getpid())
	time.Sleep(5 * time.Millisecond)
	if _, ok := w3.Seized(); ok {
		t.Error("an untraced process reported a seize")
	}
}
