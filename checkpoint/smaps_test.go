package checkpoint

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// smapsEngine is an Engine whose CRIU and kernel can use the smaps copy.
func smapsEngine(t *testing.T) *Engine {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CRIU, BPF)")
	}
	e := New("")
	if ok, err := e.HasFeature(context.Background(), FeatureSmapsCopy); err != nil || !ok {
		t.Skipf("CRIU at %s lacks %s (duplex's patches: make deps): %v", e.Path(), FeatureSmapsCopy, err)
	}
	if e.vmaIterator() == nil {
		t.Skip("the kernel cannot run the VMA iterator (BPF task_vma)")
	}
	return e
}

// sleeper starts a process in a session of its own for CRIU to dump.
func sleeper(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd.Process.Pid
}

// dumpWithCopy dumps pid (left running) with the smaps copy c handed to CRIU,
// and returns CRIU's error and log.
func dumpWithCopy(t *testing.T, e *Engine, pid int, c *smapsCopy) (error, string) {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(e.Path(), "dump", "-t", strconv.Itoa(pid), "-D", dir, "-o", "dump.log", "-v4",
		"--leave-running", "--manage-cgroups=ignore")
	cmd.Env, cmd.ExtraFiles = c.apply(e.env(), nil)
	out, err := cmd.CombinedOutput()
	log, _ := os.ReadFile(filepath.Join(dir, "dump.log"))
	if err != nil {
		t.Logf("criu: %v: %s", err, out)
	}
	return err, string(log)
}

// The copy is what CRIU reads when the VMAs did not change, and is ignored when
// they did: a copy whose VMA records no longer match has its smaps replaced with
// garbage that would fail the dump if CRIU read it.
func TestSmapsCopy(t *testing.T) {
	e := smapsEngine(t)
	pid := sleeper(t)
	time.Sleep(50 * time.Millisecond) // past exec: its VMAs settle
	ctx := context.Background()
	images := filepath.Join(t.TempDir(), "images")

	fresh := func(t *testing.T) *smapsCopy {
		t.Helper()
		c, err := e.copySmaps(ctx, pid, images)
		if err != nil || c == nil {
			t.Fatalf("copySmaps: %v, %v", c, err)
		}
		t.Cleanup(c.close)
		if c.count() != 1 {
			t.Fatalf("copied the smaps of %d processes, want 1", c.count())
		}
		return c
	}
	used := "smaps of " + strconv.Itoa(pid) + ": the copy made before the freeze"
	changed := "smaps of " + strconv.Itoa(pid) + ": VMAs changed since the copy; reading /proc"
	garbage := []byte("this is not smaps\n")

	t.Run("unchanged", func(t *testing.T) {
		c := fresh(t)
		err, log := dumpWithCopy(t, e, pid, c)
		if err != nil || !strings.Contains(log, used) {
			t.Fatalf("dump: %v; log says the copy was used: %v", err, strings.Contains(log, used))
		}
	})
	t.Run("used", func(t *testing.T) {
		// The same, with the copy spoilt: CRIU reads it, so the dump fails.
		c := fresh(t)
		if err := os.WriteFile(filepath.Join(c.dir, strconv.Itoa(pid)+".smaps"), garbage, 0o600); err != nil {
			t.Fatal(err)
		}
		if err, log := dumpWithCopy(t, e, pid, c); err == nil {
			t.Fatalf("a dump from a garbage copy succeeded; log says the copy was used: %v", strings.Contains(log, used))
		}
	})
	t.Run("changed", func(t *testing.T) {
		c := fresh(t)
		vmas := filepath.Join(c.dir, strconv.Itoa(pid)+".vmas")
		b, err := os.ReadFile(vmas)
		if err != nil {
			t.Fatal(err)
		}
		b[24] ^= 0x02 // the first VMA's flags, as if mprotect had run since
		if err := os.WriteFile(vmas, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(c.dir, strconv.Itoa(pid)+".smaps"), garbage, 0o600); err != nil {
			t.Fatal(err)
		}
		err, log := dumpWithCopy(t, e, pid, c)
		if err != nil || !strings.Contains(log, changed) || strings.Contains(log, used) {
			t.Fatalf("dump: %v; log says the VMAs changed: %v", err, strings.Contains(log, changed))
		}
	})
	t.Run("off", func(t *testing.T) {
		e2 := New("")
		e2.NoSmapsCopy = true
		if c, err := e2.copySmaps(ctx, pid, images); c != nil || err != nil {
			t.Fatalf("NoSmapsCopy: %v, %v", c, err)
		}
	})
	// Nothing is left beside the images directory.
	if ents, _ := os.ReadDir(filepath.Dir(images)); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}
