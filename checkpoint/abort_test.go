package checkpoint_test

import (
	"context"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// A restore whose pages never come (the page source accepts and then says nothing)
// must end at its deadline, with CRIU and the half-restored tree killed, and the
// frozen source still resumable.
func TestRestoreAbortsAtDeadline(t *testing.T) {
	eng := testutil.RequiresCRIU(t, checkpoint.FeatureUFFDNonCoop)
	rec := launch(t, "stuck", "counter")
	grows(t, rec.Stdout, "counter output")
	ctx := context.Background()
	dir := t.TempDir()
	if _, err := eng.Dump(ctx, checkpoint.DumpOptions{Pid: rec.Pid, ImagesDir: dir, LeaveStopped: true, ManageCgroups: true}); err != nil {
		t.Fatal(err)
	}
	// A page "server" that accepts connections and never answers.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	lp, err := eng.StartLazyPages(ctx, checkpoint.LazyPagesOptions{ImagesDir: dir,
		Source: &checkpoint.Address{Host: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port}})
	if err != nil {
		t.Fatal(err)
	}
	defer lp.Stop()

	before := childrenOf(t)
	rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	start := time.Now()
	res, err := eng.Restore(rctx, checkpoint.RestoreOptions{ImagesDir: dir, ManageCgroups: true, LazyPages: true})
	if err == nil {
		killChild(res.Pid)
		t.Skip("this CRIU restored without the page source; nothing to abort")
	}
	took := time.Since(start)
	t.Logf("restore ended after %s: %v", took, err)
	if took > 10*time.Second {
		t.Errorf("restore took %s despite a 3 s deadline", took)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// Aborted: nothing CRIU started may be left.
		for pid := range childrenOf(t) {
			if !before[pid] && procState(pid) != 0 && procState(pid) != 'Z' {
				t.Errorf("aborted restore left process %d (state %c)", pid, procState(pid))
			}
		}
	}
	if err := checkpoint.Resume(rec.Pid); err != nil {
		t.Fatal(err)
	}
	grows(t, rec.Stdout, "the source to count after the failed restore")
}
