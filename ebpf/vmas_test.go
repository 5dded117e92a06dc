package ebpf_test

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/ebpf"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func loadVMAIter(t *testing.T) *ebpf.VMAIter {
	t.Helper()
	testutil.RequiresRoot(t)
	v, err := ebpf.LoadVMAIter()
	if errors.Is(err, ebpf.ErrUnavailable) {
		t.Skipf("the kernel cannot run the VMA iterator: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

// mapsOf reads /proc/PID/maps as VMA records (flags left out: maps does not show
// them), without [vsyscall]: a fixed page of the kernel's, in no process's VMA tree.
func mapsOf(t *testing.T, pid int) []ebpf.VMA {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []ebpf.VMA
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.HasSuffix(sc.Text(), "[vsyscall]") {
			continue
		}
		var v ebpf.VMA
		var perms, dev string
		if _, err := fmt.Sscanf(sc.Text(), "%x-%x %s %x %s %d", &v.Start, &v.End, &perms, &v.Pgoff, &dev, &v.Inode); err != nil {
			t.Fatalf("maps line %q: %v", sc.Text(), err)
		}
		v.PID = pid
		out = append(out, v)
	}
	return out
}

func TestVMAIterMatchesMaps(t *testing.T) {
	v := loadVMAIter(t)
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	// Idle means asleep: until then the dynamic loader may still map and protect.
	testutil.Eventually(t, 5*time.Second, "sleep to be asleep in clock_nanosleep", func() bool {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
		return strings.HasPrefix(string(b), "230 ") || strings.HasPrefix(string(b), "35 ")
	})

	snap, err := v.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if len(snap[pid]) != 0 {
		t.Fatalf("%d bytes of records for a process nobody watches", len(snap[pid]))
	}
	if err := v.Watch(pid); err != nil {
		t.Fatal(err)
	}
	snap, err = v.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	got := ebpf.DecodeVMAs(snap[pid])
	want := mapsOf(t, pid)
	if len(got) != len(want) {
		t.Fatalf("iterator: %d VMAs, /proc/%d/maps: %d", len(got), pid, len(want))
	}
	for i := range want {
		// maps shows a file's offset in bytes, and none for anonymous memory.
		g := got[i]
		g.Flags, g.Pgoff = 0, g.Pgoff*4096
		if g.Inode == 0 {
			g.Pgoff = 0
		}
		if g != want[i] {
			t.Errorf("VMA %d: iterator %+v, maps %+v", i, got[i], want[i])
		}
		if got[i].Flags == 0 {
			t.Errorf("VMA %d: no flags", i)
		}
	}
	// The same tree, unchanged, gives the same bytes: what the smaps copy relies on.
	again, err := v.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	if string(again[pid]) != string(snap[pid]) {
		t.Error("two snapshots of an idle process differ")
	}
	// Watches are counted.
	if err := v.Watch(pid); err != nil {
		t.Fatal(err)
	}
	v.Unwatch(pid)
	if snap, _ = v.Snapshot(); len(snap[pid]) == 0 {
		t.Error("one of two watches undone, and the process is no longer reported")
	}
	v.Unwatch(pid)
	if snap, _ = v.Snapshot(); len(snap[pid]) != 0 {
		t.Error("unwatched process still reported")
	}
}
