package reaper_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/internal/reaper"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func state(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "gone"
	}
	s := string(b)
	return s[strings.LastIndexByte(s, ')')+2 : strings.LastIndexByte(s, ')')+3]
}

// An orphaned grandchild is reparented to the subreaper, and once it exits the
// sweeper reaps it; a child someone else owns is left alone.
func TestSubreaperReapsOrphans(t *testing.T) {
	if err := reaper.SetSubreaper(); err != nil {
		t.Fatal(err)
	}
	// sh starts a background sleep and exits at once: the sleep is orphaned.
	out, err := exec.Command("sh", "-c", "sleep 0.3 </dev/null >/dev/null 2>&1 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	var orphan int
	if _, err := fmt.Sscan(string(out), &orphan); err != nil {
		t.Fatal(err)
	}
	_, ppid, _ := strings.Cut(readStat(t, orphan), ") ")
	if f := strings.Fields(ppid); len(f) < 2 || f[1] != fmt.Sprint(os.Getpid()) {
		t.Fatalf("orphan %d not reparented to the subreaper (stat: %s)", orphan, ppid)
	}

	// A child owned by other code, which the sweeper must skip.
	owned := exec.Command("true")
	if err := owned.Start(); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var reaped []int
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		reaper.Run(ctx, 50*time.Millisecond, func(pid int) bool { return pid == owned.Process.Pid }, func(pid int, _ unix.WaitStatus) {
			mu.Lock()
			reaped = append(reaped, pid)
			mu.Unlock()
		})
	}()
	testutil.Eventually(t, 5*time.Second, "the orphan to be reaped", func() bool { return state(orphan) == "gone" })
	time.Sleep(200 * time.Millisecond)
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	if len(reaped) != 1 || reaped[0] != orphan {
		t.Errorf("reaped %v, want only the orphan %d", reaped, orphan)
	}
	if s := state(owned.Process.Pid); s != "Z" {
		t.Errorf("the owned child was touched: state %s, want still a zombie for its owner", s)
	}
	if err := owned.Wait(); err != nil {
		t.Errorf("owner could not wait for its child: %v", err)
	}
}

func readStat(t *testing.T, pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
