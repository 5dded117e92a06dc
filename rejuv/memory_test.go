package rejuv_test

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/rejuv"
)

func TestDropCachesFakeProc(t *testing.T) {
	proc := fakeProc(t)
	r, err := runOne(t, rejuv.Config{Actions: []string{"drop-caches"}}, (&machine{}).options(proc))
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(proc, "sys/vm/drop_caches")); got != "3" {
		t.Fatalf("drop_caches holds %q, want \"3\"", got)
	}
	// The fixture's meminfo does not change: 1228.8 MiB available, 2 GiB cached.
	if want := "MemAvailable 1.2 GiB -> 1.2 GiB, Cached 2.0 GiB -> 2.0 GiB"; r.Detail != want {
		t.Fatalf("detail %q, want %q", r.Detail, want)
	}
}

func TestDropCachesFakeProcWithoutMeminfo(t *testing.T) {
	proc := fakeProc(t)
	if err := os.Remove(filepath.Join(proc, "meminfo")); err != nil {
		t.Fatal(err)
	}
	r, err := runOne(t, rejuv.Config{Actions: []string{"drop-caches"}}, (&machine{}).options(proc))
	if err != nil {
		t.Fatalf("meminfo only measures, its absence must not fail the rung: %v", err)
	}
	if got := readFile(t, filepath.Join(proc, "sys/vm/drop_caches")); got != "3" {
		t.Fatalf("drop_caches holds %q, want \"3\"", got)
	}
	if !strings.HasPrefix(r.Detail, "caches dropped; open ") {
		t.Fatalf("detail %q does not say meminfo was unreadable", r.Detail)
	}
}

func TestDropCachesFakeProcWithoutKnob(t *testing.T) {
	proc := fakeProc(t)
	knob := filepath.Join(proc, "sys/vm/drop_caches")
	if err := os.Remove(knob); err != nil {
		t.Fatal(err)
	}
	r, err := runOne(t, rejuv.Config{Actions: []string{"drop-caches"}}, (&machine{}).options(proc))
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("err = %v, want fs.ErrNotExist", err)
	}
	if want := "drop-caches: open " + knob + ": no such file or directory"; err.Error() != want {
		t.Fatalf("err %q, want %q", err, want)
	}
	if _, serr := os.Stat(knob); serr == nil {
		t.Fatalf("the rung created %s", knob)
	}
	if r.Error == "" {
		t.Fatal("result has no error")
	}
}

func TestCompactMemoryFakeProc(t *testing.T) {
	proc := fakeProc(t)
	r, err := runOne(t, rejuv.Config{Actions: []string{"compact-memory"}}, (&machine{}).options(proc))
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(proc, "sys/vm/compact_memory")); got != "1" {
		t.Fatalf("compact_memory holds %q, want \"1\"", got)
	}
	if !strings.HasPrefix(r.Detail, "free memory in blocks of 2.0 MiB or more ") {
		t.Fatalf("detail %q", r.Detail)
	}
}

func TestCompactMemoryWithoutCompaction(t *testing.T) {
	proc := fakeProc(t)
	knob := filepath.Join(proc, "sys/vm/compact_memory")
	if err := os.Remove(knob); err != nil {
		t.Fatal(err)
	}
	r, err := runOne(t, rejuv.Config{Actions: []string{"compact-memory"}}, (&machine{}).options(proc))
	if err != nil {
		t.Fatalf("a kernel without CONFIG_COMPACTION is no failure: %v", err)
	}
	if want := "skipped: no " + knob + ", the kernel lacks CONFIG_COMPACTION"; r.Detail != want {
		t.Fatalf("detail %q, want %q", r.Detail, want)
	}
	if _, serr := os.Stat(knob); serr == nil {
		t.Fatalf("the rung created %s", knob)
	}
}

// requiresWritable skips a test when this root cannot write the knob (a container, a
// read-only /proc/sys): opening it for writing writes nothing.
func requiresWritable(t *testing.T, knob string) {
	t.Helper()
	f, err := os.OpenFile(knob, os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("needs a writable %s (this root is confined, e.g. a container with a read-only /proc/sys): %v", knob, err)
	}
	f.Close()
}

var memDetail = regexp.MustCompile(`^MemAvailable [0-9.]+ [KMGTP]?i?B -> [0-9.]+ [KMGTP]?i?B, Cached [0-9.]+ [KMGTP]?i?B -> [0-9.]+ [KMGTP]?i?B$`)

func TestDropCachesHost(t *testing.T) {
	testutil.RequiresRoot(t)
	requiresWritable(t, "/proc/sys/vm/drop_caches")
	r, err := runOne(t, rejuv.Config{Actions: []string{"drop-caches"}}, rejuv.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !memDetail.MatchString(r.Detail) {
		t.Fatalf("detail %q does not match %s", r.Detail, memDetail)
	}
	t.Logf("drop-caches took %s: %s", r.Took, r.Detail)
}

func TestCompactMemoryHost(t *testing.T) {
	testutil.RequiresRoot(t)
	const knob = "/proc/sys/vm/compact_memory"
	if _, err := os.Stat(knob); err == nil {
		requiresWritable(t, knob)
	}
	r, err := runOne(t, rejuv.Config{Actions: []string{"compact-memory"}}, rejuv.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(r.Detail, "free memory in blocks of ") && !strings.Contains(r.Detail, "CONFIG_COMPACTION") {
		t.Fatalf("detail %q", r.Detail)
	}
	t.Logf("compact-memory took %s: %s", r.Took, r.Detail)
}
