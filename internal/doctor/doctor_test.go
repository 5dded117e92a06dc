package doctor_test

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/ebpf"
	"github.com/duplex-ha/duplex/internal/doctor"
	"github.com/duplex-ha/duplex/internal/testutil"
)

var allChecks = []string{
	"kernel", "root", "criu", "criu-check", "uffd", "lazy-dump", "smaps-copy", "dirty-tracking", "nftables-lock",
	"nft", "pidns", "cgroups", "tracefs", "btf", "ebpf-tracepoint", "pipe-max-size", "thp",
}

func run(t *testing.T, o doctor.Options) doctor.Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	start := time.Now()
	r := doctor.Run(ctx, o)
	t.Logf("Run took %v", time.Since(start).Round(time.Millisecond))
	for _, c := range r.Checks {
		t.Logf("%-16s %-7s required=%-5v %s", c.Name, c.Status, c.Required, c.Detail)
	}
	return r
}

func TestRunReportsEveryCheckOnce(t *testing.T) {
	r := run(t, doctor.Options{})
	seen := map[string]int{}
	for _, c := range r.Checks {
		seen[c.Name]++
		switch c.Status {
		case doctor.OK, doctor.Missing, doctor.Warn:
		default:
			t.Errorf("%s: unknown status %q", c.Name, c.Status)
		}
		if c.Detail == "" || strings.Contains(c.Detail, "\n") {
			t.Errorf("%s: detail must be one non-empty line, got %q", c.Name, c.Detail)
		}
	}
	for _, n := range allChecks {
		if seen[n] != 1 {
			t.Errorf("check %q reported %d times, want once", n, seen[n])
		}
		delete(seen, n)
	}
	for n := range seen {
		t.Errorf("unexpected check %q", n)
	}
}

func TestRunIsQuick(t *testing.T) {
	testutil.RequiresRoot(t)
	start := time.Now()
	doctor.Run(context.Background(), doctor.Options{})
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("Run took %v, want < 3s", d)
	}
}

// kernelSoftDirty probes CONFIG_MEM_SOFT_DIRTY without CRIU or the doctor: a page of
// a new anonymous mapping is soft-dirty once written, and /proc/self/pagemap shows
// it as bit 55 only on a kernel that tracks soft-dirty pages. (Writing "4" to
// /proc/self/clear_refs is no probe: kernels without soft-dirty accept it.)
func kernelSoftDirty(t *testing.T) bool {
	t.Helper()
	size := syscall.Getpagesize()
	mem, err := syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		t.Fatalf("mmap: %v", err)
	}
	defer syscall.Munmap(mem)
	mem[0] = 'x'

	f, err := os.Open("/proc/self/pagemap")
	if err != nil {
		t.Fatalf("open pagemap: %v", err)
	}
	defer f.Close()
	vpn := uint64(uintptr(unsafe.Pointer(&mem[0]))) / uint64(size)
	buf := make([]byte, 8)
	if _, err := f.ReadAt(buf, int64(vpn*8)); err != nil {
		t.Fatalf("read pagemap: %v", err)
	}
	e := binary.LittleEndian.Uint64(buf)
	if e&(1<<63) == 0 {
		t.Fatalf("probe page not present in pagemap (entry %#x)", e)
	}
	return e&(1<<55) != 0
}

func TestDirtyTrackingAgreesWithKernel(t *testing.T) {
	testutil.RequiresCRIU(t)
	kernel := kernelSoftDirty(t)
	t.Logf("kernel tracks soft-dirty pages: %v", kernel)

	r := run(t, doctor.Options{})
	c, ok := r.Get("dirty-tracking")
	if !ok {
		t.Fatal("no dirty-tracking check")
	}
	want := doctor.Missing
	if kernel {
		want = doctor.OK
	}
	if c.Status != want {
		t.Errorf("dirty-tracking is %s (%s), the kernel probe says %s", c.Status, c.Detail, want)
	}
	if c.Required {
		t.Error("dirty-tracking must not be required: post-copy and stop-and-copy work without it")
	}
	if !kernel && !strings.Contains(c.Detail, "pre-copy") {
		t.Errorf("detail should say pre-copy is unavailable: %q", c.Detail)
	}
}

func TestReportOK(t *testing.T) {
	optionalMissing := doctor.Report{Checks: []doctor.Check{
		{Name: "root", Status: doctor.OK, Required: true},
		{Name: "criu", Status: doctor.OK, Required: true},
		{Name: "dirty-tracking", Status: doctor.Missing},
		{Name: "tracefs", Status: doctor.Warn},
		{Name: "btf", Status: doctor.Missing},
	}}
	if !optionalMissing.OK() {
		t.Error("OK() = false with only optional checks missing")
	}
	if c, ok := optionalMissing.Get("tracefs"); !ok || c.Status != doctor.Warn {
		t.Errorf("Get(tracefs) = %+v, %v", c, ok)
	}
	if _, ok := optionalMissing.Get("nope"); ok {
		t.Error("Get(nope) found a check")
	}

	for _, bad := range []doctor.Status{doctor.Missing, doctor.Warn} {
		r := doctor.Report{Checks: append([]doctor.Check{
			{Name: "nftables-lock", Status: bad, Required: true},
		}, optionalMissing.Checks...)}
		if r.OK() {
			t.Errorf("OK() = true with a required check %s", bad)
		}
	}
	if !(doctor.Report{}).OK() {
		t.Error("an empty report has no failed required check")
	}
}

func TestMissingCRIU(t *testing.T) {
	path := filepath.Join(t.TempDir(), "no-such-criu")
	r := run(t, doctor.Options{CRIUPath: path})
	c, ok := r.Get("criu")
	if !ok {
		t.Fatal("no criu check")
	}
	if c.Status != doctor.Missing || !c.Required {
		t.Errorf("criu = %+v, want a required Missing check", c)
	}
	if !strings.Contains(c.Detail, "make deps") || !strings.Contains(c.Detail, path) {
		t.Errorf("criu detail %q should name %s and 'make deps'", c.Detail, path)
	}
	if r.OK() {
		t.Error("OK() = true without CRIU")
	}
	for _, n := range []string{"criu-check", "nftables-lock"} {
		if c, _ := r.Get(n); c.Status == doctor.OK {
			t.Errorf("%s is OK without CRIU", n)
		}
	}
}

func TestReportJSON(t *testing.T) {
	b, err := json.Marshal(doctor.Report{Checks: []doctor.Check{
		{Name: "btf", Status: doctor.OK, Detail: "present"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"checks":[{"name":"btf","status":"ok","required":false,"detail":"present"}]}`
	if string(b) != want {
		t.Errorf("json = %s, want %s", b, want)
	}
}

// The lazy-dump verdict follows the CRIU build: ok only for one 'make deps' built
// with duplex's patches, which says so in `criu --version`.
func TestLazyDumpFollowsCRIUBuild(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	v, err := eng.Version(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CRIU %s, GitID %q", v, v.GitID)
	r := run(t, doctor.Options{})
	c, ok := r.Get("lazy-dump")
	if !ok {
		t.Fatal("no lazy-dump check")
	}
	want := doctor.Warn
	if v.DuplexPatched() {
		want = doctor.OK
	}
	if c.Status != want {
		t.Errorf("lazy-dump is %s (%s), want %s for GitID %q", c.Status, c.Detail, want, v.GitID)
	}
	// smaps-copy is ok only with the patch and a kernel that runs the iterator.
	sc, ok := r.Get("smaps-copy")
	if !ok {
		t.Fatal("no smaps-copy check")
	}
	has, _ := eng.HasFeature(context.Background(), checkpoint.FeatureSmapsCopy)
	it, itErr := ebpf.LoadVMAIter()
	if itErr == nil {
		it.Close()
	}
	if want := has && itErr == nil; (sc.Status == doctor.OK) != want {
		t.Errorf("smaps-copy is %s (%s); CRIU has it: %v, iterator: %v", sc.Status, sc.Detail, has, itErr)
	}
	if crit, _ := r.Get("criu"); v.GitID != "" && !strings.Contains(crit.Detail, v.GitID) {
		t.Errorf("criu check %q does not name the build %q", crit.Detail, v.GitID)
	}
}
