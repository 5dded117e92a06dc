package harness

import (
	"context"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/internal/testutil"
)

// NewT builds a cluster for a test: it skips unless root, fails the test if New fails,
// and closes the cluster when the test ends, first logging the output of every
// process started through it if the test failed.
func NewT(t testing.TB, o Options) *Cluster {
	t.Helper()
	testutil.RequiresRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := New(ctx, o)
	if err != nil {
		t.Fatalf("harness: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.mu.Lock()
			procs := append([]*Proc(nil), c.procs...)
			c.mu.Unlock()
			for _, p := range procs {
				t.Logf("output of %s (pid %d):\n%s", p.Name, p.Pid(), p.Output())
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("harness: close cluster %s: %v", c.Name, err)
		}
	})
	return c
}
