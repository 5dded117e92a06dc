package checkpoint_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/internal/testutil"
)

func TestKerndatCache(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	requiresDiskRun(t)
	const cache, stamp = "/run/criu.kdat", "/run/criu.kdat.duplex-stamp"
	if err := eng.EnsureKerndatCache(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(cache)
	if err != nil || fi.Size() == 0 {
		t.Fatalf("no cache after EnsureKerndatCache: %v", err)
	}
	// CRIU loads it instead of probing the kernel again.
	log := filepath.Join(t.TempDir(), "check.log")
	out, _ := exec.Command(eng.Path(), "check", "-v4", "-o", log).CombinedOutput()
	b, err := os.ReadFile(log)
	if err != nil {
		t.Fatalf("criu check wrote no log: %v: %s", err, out)
	}
	if !strings.Contains(string(b), "Loaded kdat cache from "+cache) {
		t.Errorf("CRIU did not load the cache:\n%s", b)
	}
	// A stamp of another boot or CRIU makes it again; a matching one keeps it.
	if err := os.WriteFile(stamp, []byte("boot of another day\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cache+".tmp", nil, 0o600); err != nil { // what a crashed CRIU leaves
		t.Fatal(err)
	}
	if err := eng.EnsureKerndatCache(); err != nil {
		t.Fatal(err)
	}
	s, _ := os.ReadFile(stamp)
	if !strings.HasPrefix(string(s), "boot ") || strings.Contains(string(s), "another day") {
		t.Errorf("stale stamp kept: %q", s)
	}
	if _, err := os.Stat(cache + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("the leftover criu.kdat.tmp stayed: %v", err)
	}
	before, _ := os.Stat(cache)
	if err := eng.EnsureKerndatCache(); err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Stat(cache); !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("a valid cache was made again")
	}
}

// A cache that went missing after the first migration (another CRIU build replaced
// it, someone removed it) is made again before the next CRIU starts, not left for
// every CRIU in the next downtime to probe the kernel again.
func TestWarmKerndatRemakesMissingCache(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	requiresDiskRun(t)
	const cache = "/run/criu.kdat"
	eng.WarmKerndat()
	if fi, err := os.Stat(cache); err != nil || fi.Size() == 0 {
		t.Fatalf("no cache after WarmKerndat: %v", err)
	}
	if err := os.Remove(cache); err != nil {
		t.Fatal(err)
	}
	eng.WarmKerndat()
	if fi, err := os.Stat(cache); err != nil || fi.Size() == 0 {
		t.Fatalf("the removed cache was not made again: %v", err)
	}
}

// requiresDiskRun skips where /run is a tmpfs: CRIU keeps its own kerndat cache there.
func requiresDiskRun(t *testing.T) {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs("/run", &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == unix.TMPFS_MAGIC {
		t.Skip("/run is a tmpfs here: CRIU keeps its own kerndat cache")
	}
}
