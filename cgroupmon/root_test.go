package cgroupmon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/duplex-ha/duplex/internal/testutil"
)

const helperEnv = "DUPLEX_CGROUPMON_HELPER"

// TestMain doubles as the child the root tests put into a cgroup: it waits for a
// line on stdin (sent once it is in the cgroup), does its job, prints "ready" and
// holds on until stdin closes.
func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "alloc":
		helper(func() func() {
			b := make([]byte, 64<<20)
			for i := 0; i < len(b); i += 4096 {
				b[i] = 1
			}
			return func() { runtime.KeepAlive(b) }
		})
	case "sock":
		helper(func() func() {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			peer, err := ln.Accept() // never read: its receive queue fills
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			buf := make([]byte, 64<<10)
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			for {
				if _, err := c.Write(buf); err != nil {
					break
				}
			}
			return func() { runtime.KeepAlive(peer); runtime.KeepAlive(ln) }
		})
	}
	os.Exit(3)
}

func helper(job func() func()) {
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		os.Exit(4)
	}
	keep := job()
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, in)
	keep()
	os.Exit(0)
}

// testCgroup creates cgroup path in the v1 memory hierarchy and/or cgroup2, as
// internal/workload does, and removes it when the test ends.
func testCgroup(t *testing.T, c *Collector, path string) {
	t.Helper()
	v1 := cgroup1.WithHierarchy(cgroup1.SingleSubsystem(cgroup1.Default, cgroup1.Memory))
	if c.mode == Legacy || c.mode == Hybrid {
		cg, err := cgroup1.New(cgroup1.StaticPath(path), &specs.LinuxResources{}, v1)
		if err != nil {
			t.Fatalf("create memory cgroup %s: %v", path, err)
		}
		t.Cleanup(func() {
			if err := cg.Delete(); err != nil {
				t.Errorf("delete memory cgroup %s: %v", path, err)
			}
		})
	}
	if v2 := c.v2Dir("/"); v2 != "" {
		m, err := cgroup2.NewManager(v2, path, &cgroup2.Resources{})
		if err != nil {
			t.Fatalf("create cgroup2 group %s: %v", path, err)
		}
		t.Cleanup(func() {
			if err := m.Delete(); err != nil {
				t.Errorf("delete cgroup2 group %s: %v", path, err)
			}
		})
		if c.mode == Unified {
			parent := filepath.Dir(filepath.Join(v2, path))
			if err := os.WriteFile(filepath.Join(parent, "cgroup.subtree_control"), []byte("+memory"), 0); err != nil {
				t.Fatalf("enable memory controller under %s: %v", parent, err)
			}
		}
	}
}

// startIn starts this test binary as helper mode inside cgroup path and waits until
// it has done its job. The process is killed when the test ends.
func startIn(t *testing.T, c *Collector, path, mode string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	pid := uint64(cmd.Process.Pid)
	for _, dir := range []string{c.v1Dir(path), c.v2Dir(path)} {
		if dir == "" {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(fmt.Sprint(pid)), 0); err != nil {
			t.Fatalf("move %d into %s: %v", pid, dir, err)
		}
	}
	if _, err := io.WriteString(stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		t.Fatalf("helper %s: %q, %v", mode, line, err)
	}
}

func TestWorkloadMemoryReal(t *testing.T) {
	testutil.RequiresRoot(t)
	parent := testutil.CgroupParent(t)
	c := New(Options{})
	if c.Mode() == Unavailable {
		t.Fatal("no cgroup hierarchy under /sys/fs/cgroup")
	}
	path := "/" + parent + "/alloc"
	testCgroup(t, c, path)
	startIn(t, c, path, "alloc")
	w, err := c.Workload("alloc", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %+v", c.Mode(), w)
	if w.Usage < 60<<20 || w.Anon < 60<<20 {
		t.Errorf("usage %d, anon %d: want both >= 60 MiB for a process touching 64 MiB", w.Usage, w.Anon)
	}
	s, err := c.Host(context.Background(), map[string]string{"alloc": path})
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Workloads) != 1 || s.Workloads[0].Error != "" || s.Workloads[0].Anon < 60<<20 {
		t.Errorf("host sample workloads %+v", s.Workloads)
	}
}

func TestWorkloadSocketMemoryReal(t *testing.T) {
	testutil.RequiresRoot(t)
	parent := testutil.CgroupParent(t)
	c := New(Options{SockAccountParent: parent})
	path := "/" + parent + "/sock"
	testCgroup(t, c, path)
	// v1 charges only sockets created after accounting is switched on, so switch it on
	// before the helper opens its sockets (a first Workload call would do it too).
	if err := c.EnableSockAccounting(path); err != nil {
		t.Fatal(err)
	}
	startIn(t, c, path, "sock")
	var w WorkloadSample
	testutil.Eventually(t, 5*time.Second, "socket memory charged to "+path, func() bool {
		var err error
		if w, err = c.Workload("sock", path); err != nil {
			t.Fatal(err)
		}
		return w.Sock > 0
	})
	t.Logf("%s: %+v", c.Mode(), w)
	if w.Sock < 64<<10 {
		t.Errorf("sock %d bytes: want at least 64 KiB queued on a loopback socket nobody reads", w.Sock)
	}
	s, err := c.Host(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	// The host counts sk_forward_alloc pages per protocol, the cgroup its own page
	// charges: close, not equal.
	if s.SockMem < w.Sock/2 {
		t.Errorf("host socket memory %d, less than half the workload's %d", s.SockMem, w.Sock)
	}
}

func TestHostReal(t *testing.T) {
	c := New(Options{})
	s, err := c.Host(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: %+v", c.Mode(), s)
	if s.MemTotal == 0 || s.MemAvailable == 0 || s.MemAvailable > s.MemTotal || s.Uptime <= 0 || s.CPUs < 1 || s.Load1 < 0 {
		t.Errorf("implausible host sample %+v", s)
	}
	if time.Since(s.Time) > time.Minute {
		t.Errorf("sample time %s", s.Time)
	}
}

func TestMissingCgroupReal(t *testing.T) {
	c := New(Options{})
	path := "/" + testutil.Unique("duplex-test-missing-")
	_, err := c.Workload("ghost", path)
	if !errors.Is(err, ErrNoCgroup) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "ghost") {
		t.Fatalf("got %v, want ErrNoCgroup naming workload ghost and %s", err, path)
	}
	t.Log(err)
}
