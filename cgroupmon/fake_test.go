package cgroupmon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// writeTree creates files (path -> content) under dir.
func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for p, content := range files {
		full := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func fakeProc(t *testing.T) string {
	dir := t.TempDir()
	writeTree(t, dir, map[string]string{
		"loadavg": "1.50 0.75 0.25 2/95 25056\n",
		"uptime":  "4790.91 6723.06\n",
		"meminfo": "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\n" +
			"Buffers:           10000 kB\nCached:          2000000 kB\nSwapCached:            0 kB\nSlab:             300000 kB\n",
		"net/sockstat":    "sockets: used 11\nTCP: inuse 1 orphan 0 tw 5 alloc 1 mem 183\nUDP: inuse 0 mem 17\nUDPLITE: inuse 0\nFRAG: inuse 0 memory 4\n",
		"stat":            "cpu  1 2 3\ncpu0 1 2 3\ncpu1 1 2 3\ncpu2 1 2 3\nintr 1\n",
		"pressure/memory": "some avg10=1.25 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.50 avg60=0.00 avg300=0.00 total=0\n",
	})
	return dir
}

func TestHostFromFakeProc(t *testing.T) {
	c := New(Options{Proc: fakeProc(t), CgroupRoot: t.TempDir()})
	s, err := c.Host(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	ps := uint64(os.Getpagesize())
	want := HostSample{Load1: 1.5, Load5: 0.75, Load15: 0.25, CPUs: 3, MemTotal: 16000000 << 10, MemAvailable: 8000000 << 10,
		Buffers: 10000 << 10, Cached: 2000000 << 10, Slab: 300000 << 10, SockMem: (183 + 17) * ps, PressureSome10: 1.25}
	s.Time, s.Uptime = want.Time, s.Uptime.Round(0)
	if s.Uptime.Seconds() != 4790.91 {
		t.Errorf("uptime %s, want 4790.91s", s.Uptime)
	}
	s.Uptime = 0
	if s.Load1 != want.Load1 || s.Load5 != want.Load5 || s.Load15 != want.Load15 || s.CPUs != want.CPUs ||
		s.MemTotal != want.MemTotal || s.MemAvailable != want.MemAvailable || s.Buffers != want.Buffers ||
		s.Cached != want.Cached || s.Slab != want.Slab || s.SockMem != want.SockMem || s.PressureSome10 != want.PressureSome10 {
		t.Errorf("got %+v\nwant %+v", s, want)
	}
}

func TestWorkloadV1Hybrid(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string]string{
		"unified/cgroup.controllers":                    "",
		"memory/d/w/memory.stat":                        "cache 100\nrss 200\ntotal_cache 1000\ntotal_rss 2000\ntotal_shmem 5\n",
		"memory/d/w/memory.usage_in_bytes":              "4096\n",
		"memory/d/w/memory.kmem.usage_in_bytes":         "300\n",
		"memory/d/w/memory.kmem.tcp.usage_in_bytes":     "8192\n",
		"memory/d/w/memory.kmem.tcp.limit_in_bytes":     "9223372036854771712\n",
		"memory/d/w/memory.oom_control":                 "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
		"memory/d/x/memory.stat":                        "rss 1\n",
		"memory/d/x/memory.usage_in_bytes":              "1\n",
		"memory/d/x/memory.kmem.tcp.limit_in_bytes":     "9223372036854771712\n",
		"unified/d/w/memory.pressure":                   "some avg10=2.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=0\n",
		"memory/other/y/memory.kmem.tcp.limit_in_bytes": "9223372036854771712\n",
	})
	c := New(Options{Proc: fakeProc(t), CgroupRoot: root, SockAccountParent: "d/w"})
	if c.Mode() != Hybrid {
		t.Fatalf("mode %s, want hybrid", c.Mode())
	}
	w, err := c.Workload("web", "/d/w")
	if err != nil {
		t.Fatal(err)
	}
	want := WorkloadSample{Name: "web", Cgroup: "/d/w", Usage: 4096, Anon: 2000, Cache: 1000, Kernel: 300, Sock: 8192,
		PressureSome10: 2, PressureFull10: 1, OOMKills: 3}
	if w != want {
		t.Errorf("got %+v\nwant %+v", w, want)
	}
	// Accounting is switched on only under the parent: /d/w itself is not under /d/w.
	lim := func(p string) string {
		b, _ := os.ReadFile(filepath.Join(root, "memory", p, "memory.kmem.tcp.limit_in_bytes"))
		return strings.TrimSpace(string(b))
	}
	if got := lim("d/w"); got != "9223372036854771712" {
		t.Errorf("limit of /d/w rewritten to %s though it is not under the parent", got)
	}
	c = New(Options{Proc: fakeProc(t), CgroupRoot: root, SockAccountParent: "/d"})
	if w, err := c.Workload("x", "/d/x"); err != nil || w.Anon != 1 || w.Kernel != 0 {
		t.Fatalf("sample /d/x: %+v, %v", w, err)
	}
	if got := lim("d/x"); got != "-1" {
		t.Errorf("limit of /d/x is %s, want -1 written to switch accounting on", got)
	}
	if _, err := c.Workload("y", "/other/y"); err == nil {
		t.Error("sampling /other/y with no memory.stat succeeded")
	}
	if got := lim("other/y"); got != "9223372036854771712" {
		t.Errorf("limit of /other/y rewritten to %s though it is outside the parent", got)
	}
	// A limit somebody set is left alone.
	writeTree(t, root, map[string]string{"memory/d/z/memory.kmem.tcp.limit_in_bytes": "1048576\n"})
	if err := c.EnableSockAccounting("/d/z"); err != nil || lim("d/z") != "1048576" {
		t.Errorf("EnableSockAccounting on a limited cgroup: %v, limit now %s", err, lim("d/z"))
	}
}

func TestWorkloadV2Unified(t *testing.T) {
	root := t.TempDir()
	writeTree(t, root, map[string]string{
		"cgroup.controllers":   "cpu memory pids\n",
		"d/w/memory.current":   "5000\n",
		"d/w/memory.stat":      "anon 3000\nfile 1500\nkernel 400\nsock 100\nslab 7\n",
		"d/w/memory.events":    "low 0\nhigh 0\nmax 1\noom 2\noom_kill 2\n",
		"d/w/memory.pressure":  "some avg10=3.50 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.25 avg60=0.00 avg300=0.00 total=0\n",
		"d/nomem/cgroup.procs": "",
		"d/old/memory.current": "10\n",
		"d/old/memory.stat":    "anon 1\nfile 2\nslab 3\nkernel_stack 4\npagetables 5\npercpu 6\nsock 0\n",
	})
	c := New(Options{Proc: fakeProc(t), CgroupRoot: root})
	if c.Mode() != Unified {
		t.Fatalf("mode %s, want unified", c.Mode())
	}
	w, err := c.Workload("web", "/d/w")
	if err != nil {
		t.Fatal(err)
	}
	want := WorkloadSample{Name: "web", Cgroup: "/d/w", Usage: 5000, Anon: 3000, Cache: 1500, Kernel: 400, Sock: 100,
		PressureSome10: 3.5, PressureFull10: 0.25, OOMKills: 2}
	if w != want {
		t.Errorf("got %+v\nwant %+v", w, want)
	}
	if w, err := c.Workload("old", "/d/old"); err != nil || w.Kernel != 3+4+5+6 {
		t.Errorf("kernel before 5.18: %+v, %v", w, err)
	}
	if _, err := c.Workload("nomem", "/d/nomem"); !errors.Is(err, ErrNoMemoryController) {
		t.Errorf("group without memory controller: %v, want ErrNoMemoryController", err)
	}
	_, err = c.Workload("gone", "/d/gone")
	if !errors.Is(err, ErrNoCgroup) || !strings.Contains(err.Error(), filepath.Join(root, "d/gone")) || !strings.Contains(err.Error(), "gone") {
		t.Errorf("missing group: %v, want ErrNoCgroup naming %s", err, filepath.Join(root, "d/gone"))
	}
	s, err := c.Host(context.Background(), map[string]string{"web": "/d/w", "gone": "/d/gone"})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Workloads) != 2 || s.Workloads[0].Name != "gone" || s.Workloads[0].Error == "" || s.Workloads[1] != want {
		t.Errorf("host workloads %+v", s.Workloads)
	}
}

func TestUnder(t *testing.T) {
	for _, tc := range []struct {
		path, parent string
		want         bool
	}{
		{"/duplex/web", "/duplex", true},
		{"duplex/web", "/duplex", true},
		{"/duplex", "/duplex", false},
		{"/duplexx/web", "/duplex", false},
		{"/a", "/", true},
		{"/", "/", false},
	} {
		if got := under(tc.path, tc.parent); got != tc.want {
			t.Errorf("under(%q, %q) = %v", tc.path, tc.parent, got)
		}
	}
}
