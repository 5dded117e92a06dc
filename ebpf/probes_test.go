package ebpf_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/ebpf"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func TestLoad(t *testing.T) {
	p := loadProbes(t, ebpf.Options{})
	got := p.Attached()
	for _, name := range []string{"rss_stat", "sock_exceed_buf_limit", "sock_rcvqueue_full", "mark_victim", "sched_process_exit"} {
		if got[name] == "" {
			t.Errorf("probe %s not attached", name)
		}
	}
	t.Logf("attached: %v", got)
}

func TestMemoryPerProcessAndCgroup(t *testing.T) {
	p := loadProbes(t, ebpf.Options{})
	dir, id := cgroup2Group(t)
	cmd := startHelper(t, "alloc", dir)
	pid := cmd.Process.Pid

	var last ebpf.ProcMemory
	testutil.Eventually(t, 2*time.Second, "the child's 64 MiB in Memory()", func() bool {
		ms, err := p.Memory()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			if m.Pid == pid {
				last = m
				return m.Anon >= 60<<20
			}
		}
		return false
	})
	t.Logf("child %d: %+v (cgroup %s id %d)", pid, last, dir, id)
	if last.CgroupID != id {
		t.Errorf("child's cgroup id = %d, want %d (%s)", last.CgroupID, id, dir)
	}
	if last.Updates == 0 {
		t.Error("no updates counted")
	}

	// The entry goes away when the process exits.
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	testutil.Eventually(t, 2*time.Second, "the child's entry to be removed", func() bool {
		ms, err := p.Memory()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			if m.Pid == pid {
				return false
			}
		}
		return true
	})
}

// TestSocketPressure runs the socket-buffer hogs that fire the sock tracepoints
// on this kernel (see README.md: a TCP receiver that stops reading fires neither
// unless socket memory is limited, by a memcg v1 TCP limit or global tcp_mem).
func TestSocketPressure(t *testing.T) {
	for _, tc := range []struct {
		name  string
		kind  string
		start func(t *testing.T, dir string)
	}{
		{"tcp-memcg-limit", ebpf.KindSockExceedBufLimit, func(t *testing.T, dir string) {
			g := memcgV1Group(t, "memory.kmem.tcp.limit_in_bytes", 1<<20)
			t.Setenv("DUPLEX_EBPF_TEST_MEMCG", g)
			startHelper(t, "tcphog", dir)
		}},
		{"ping-rcvbuf", ebpf.KindSockRcvqueueFull, func(t *testing.T, dir string) {
			startHelperFlags(t, "pinghog", dir, unix.CLONE_NEWNET)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := loadProbes(t, ebpf.Options{})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			events := p.Events(ctx)
			dir, id := cgroup2Group(t)
			tc.start(t, dir)
			timeout := time.After(5 * time.Second)
			for {
				select {
				case ev, ok := <-events:
					if !ok {
						t.Fatal("events closed early")
					}
					if ev.CgroupID == id && ev.Kind == tc.kind {
						t.Logf("event %+v", ev)
						if time.Since(ev.Time).Abs() > 5*time.Second {
							t.Errorf("event time %v is off by more than 5s", ev.Time)
						}
						return
					}
				case <-timeout:
					sc, _ := p.SocketPressure()
					t.Fatalf("no %s event for cgroup %d (%s) within 5s; counts %+v", tc.kind, id, dir, sc)
				}
			}
		})
	}
}

// TestTracepointFallback attaches the classic tracepoint variants (tracefs,
// mounted for the test if need be) and checks rss_stat still attributes memory.
func TestTracepointFallback(t *testing.T) {
	testutil.RequiresRoot(t)
	ensureTracefs(t)
	p := loadProbes(t, ebpf.Options{Methods: []string{ebpf.MethodTracepoint}})
	dir, id := cgroup2Group(t)
	cmd := startHelper(t, "alloc", dir)
	testutil.Eventually(t, 2*time.Second, "the child's 64 MiB in Memory()", func() bool {
		ms, err := p.Memory()
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range ms {
			if m.Pid == cmd.Process.Pid {
				return m.Anon >= 60<<20 && m.CgroupID == id
			}
		}
		return false
	})
}

func TestOOMKill(t *testing.T) {
	p := loadProbes(t, ebpf.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	events := p.Events(ctx)
	dir, id := cgroup2Group(t)
	g := memcgV1Group(t, "memory.limit_in_bytes", 32<<20)
	t.Setenv("DUPLEX_EBPF_TEST_MEMCG", g)
	cmd := startHelper(t, "oom", dir)
	timeout := time.After(5 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Kind == ebpf.KindOOMKill && ev.Pid == cmd.Process.Pid {
				t.Logf("event %+v", ev)
				if ev.CgroupID != id {
					t.Errorf("OOM victim's cgroup id = %d, want %d", ev.CgroupID, id)
				}
				return
			}
		case <-timeout:
			t.Fatalf("no oom_kill event for pid %d within 5s", cmd.Process.Pid)
		}
	}
}

func TestCloseUnblocksEvents(t *testing.T) {
	testutil.RequiresRoot(t)
	p, err := ebpf.Load(ebpf.Options{})
	if err != nil {
		if !testutil.OnCI() && errors.Is(err, ebpf.ErrUnavailable) {
			t.Skipf("eBPF probes unavailable: %v", err)
		}
		t.Fatal(err)
	}
	events := p.Events(context.Background())
	ctx, cancel := context.WithCancel(context.Background())
	cancelled := p.Events(ctx)
	cancel()
	select {
	case _, ok := <-cancelled:
		for ok {
			_, ok = <-cancelled
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Events channel not closed after its context ended")
	}
	done := make(chan error, 1)
	go func() { done <- p.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("close: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close blocked")
	}
	select {
	case _, ok := <-events:
		for ok {
			_, ok = <-events
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Events channel not closed by Close")
	}
	if err := p.Close(); err != nil {
		t.Fatalf("second close: %v", err)
	}
	if _, ok := <-p.Events(context.Background()); ok {
		t.Fatal("Events after Close returned an open channel")
	}
}

func TestStats(t *testing.T) {
	p := loadProbes(t, ebpf.Options{EnableStats: true})
	dir, _ := cgroup2Group(t)
	startHelper(t, "alloc", dir)
	st, err := p.Stats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("stats: %+v", st)
	if st["rss_stat"].RunCount == 0 || st["rss_stat"].RunTime == 0 {
		t.Errorf("rss_stat stats = %+v, want non-zero run count and time", st["rss_stat"])
	}
}

func TestCgroupIDRejectsNonCgroup(t *testing.T) {
	if _, err := ebpf.CgroupID(t.TempDir()); err == nil {
		t.Fatal("CgroupID of a temp dir succeeded")
	}
}
