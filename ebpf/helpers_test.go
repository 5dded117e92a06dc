package ebpf_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/ebpf"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// helperEnv selects a helper mode when the test binary re-executes itself.
const helperEnv = "DUPLEX_EBPF_TEST_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(testutil.Main(m))
	case "alloc":
		helperAlloc(64 << 20)
	case "tcphog":
		helperTCPHog()
	case "pinghog":
		helperPingHog()
	case "oom":
		joinMemcg()
		fmt.Println("ready")
		helperAlloc(256 << 20)
	default:
		fmt.Fprintln(os.Stderr, "unknown helper", os.Getenv(helperEnv))
		os.Exit(2)
	}
	os.Exit(0)
}

// joinMemcg moves the helper into the cgroup v1 memory group named by
// DUPLEX_EBPF_TEST_MEMCG, if any.
func joinMemcg() {
	if g := os.Getenv("DUPLEX_EBPF_TEST_MEMCG"); g != "" {
		if err := os.WriteFile(filepath.Join(g, "cgroup.procs"), []byte(fmt.Sprint(os.Getpid())), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "join memcg:", err)
			os.Exit(1)
		}
	}
}

// helperAlloc maps and touches n bytes of anonymous memory, says "ready" and
// waits for stdin to close.
func helperAlloc(n int) {
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
}

// helperTCPHog fills a loopback TCP connection whose receiver never reads, with
// a large (locked) send buffer. Run in a cgroup v1 memory group whose
// memory.kmem.tcp.limit_in_bytes is small (DUPLEX_EBPF_TEST_MEMCG), the socket
// charge fails before the send buffer is full and sock/sock_exceed_buf_limit fires.
func helperTCPHog() {
	joinMemcg()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	r := <-accepted
	_ = r
	_ = c.(*net.TCPConn).SetWriteBuffer(4 << 20)
	fmt.Println("ready")
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	buf := make([]byte, 64<<10)
	for {
		_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		_, _ = c.Write(buf)
	}
}

// loadProbes loads the probes or skips (fails on CI) when the kernel cannot.
func loadProbes(t testing.TB, o ebpf.Options) *ebpf.Probes {
	t.Helper()
	testutil.RequiresRoot(t)
	p, err := ebpf.Load(o)
	if errors.Is(err, ebpf.ErrUnavailable) && !testutil.OnCI() {
		t.Skipf("eBPF probes unavailable on this host: %v", err)
	}
	if err != nil {
		t.Fatalf("load probes: %v", err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("close probes: %v", err)
		}
	})
	return p
}

// cgroup2Group creates a fresh cgroup2 group, removed when the test ends.
func cgroup2Group(t testing.TB) (dir string, id uint64) {
	t.Helper()
	dir = filepath.Join("/sys/fs/cgroup/unified", testutil.Unique("duplex-ebpf-test-"))
	if err := os.Mkdir(dir, 0o755); err != nil {
		if testutil.OnCI() {
			t.Fatalf("create cgroup2 group: %v", err)
		}
		t.Skipf("no cgroup2 hierarchy at /sys/fs/cgroup/unified: %v", err)
	}
	t.Cleanup(func() {
		// Members must be gone first; their cleanup (registered later) runs earlier.
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := os.Remove(dir)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", dir, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	id, err := ebpf.CgroupID(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, id
}

// startHelper runs this test binary in a helper mode, in the cgroup2 group dir
// when dir is not empty, waits for it to say "ready" and kills it when the test
// ends.
func startHelper(t testing.TB, mode, dir string) *exec.Cmd {
	return startHelperFlags(t, mode, dir, 0)
}

// startHelperFlags is startHelper with extra clone flags (e.g. CLONE_NEWNET).
func startHelperFlags(t testing.TB, mode, dir string, cloneflags uintptr) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: cloneflags}
	if dir != "" {
		fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Fatalf("open cgroup %s: %v", dir, err)
		}
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start helper %s: %v", mode, err)
	}
	t.Cleanup(func() {
		stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		t.Fatalf("helper %s did not get ready: %q %v", mode, line, err)
	}
	return cmd
}

// helperPingHog runs in its own network namespace: it enables ICMP ping sockets
// there, brings lo up and pings 127.0.0.1 from a ping socket with a tiny receive
// buffer that never reads. Echo replies are queued with sock_queue_rcv_skb, which
// fires sock/sock_rcvqueue_full once the buffer is full.
func helperPingHog() {
	fail := func(what string, err error) {
		fmt.Fprintln(os.Stderr, what+":", err)
		os.Exit(1)
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ping_group_range", []byte("0 0"), 0o644); err != nil {
		fail("enable ping sockets", err)
	}
	ctl, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
	if err != nil {
		fail("socket", err)
	}
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		fail("ifreq", err)
	}
	if err := unix.IoctlIfreq(ctl, unix.SIOCGIFFLAGS, ifr); err != nil {
		fail("get lo flags", err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(ctl, unix.SIOCSIFFLAGS, ifr); err != nil {
		fail("bring lo up", err)
	}
	s, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, unix.IPPROTO_ICMP)
	if err != nil {
		fail("ping socket", err)
	}
	_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, 1)
	to := &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}
	msg := make([]byte, 1008)
	msg[0] = 8 // ICMP echo request; the kernel sets id and checksum
	fmt.Println("ready")
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); os.Exit(0) }()
	for seq := 0; ; seq++ {
		msg[6], msg[7] = byte(seq>>8), byte(seq)
		_ = unix.Sendto(s, msg, 0, to)
		time.Sleep(time.Millisecond)
	}
}

// memcgV1Group creates a cgroup v1 memory group with a limit written to file,
// removed when the test ends.
func memcgV1Group(t testing.TB, file string, limit int) string {
	t.Helper()
	g := filepath.Join("/sys/fs/cgroup/memory", testutil.Unique("duplex-ebpf-test-"))
	if err := os.Mkdir(g, 0o755); err != nil {
		if testutil.OnCI() {
			t.Fatalf("create memory cgroup: %v", err)
		}
		t.Skipf("no cgroup v1 memory controller: %v", err)
	}
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			err := os.Remove(g)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("remove cgroup %s: %v", g, err)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	if err := os.WriteFile(filepath.Join(g, file), []byte(fmt.Sprint(limit)), 0o644); err != nil {
		t.Fatalf("write %s of %s: %v", file, g, err)
	}
	return g
}

// ensureTracefs mounts tracefs at /sys/kernel/tracing unless it is there, and
// unmounts it when the test ends if it mounted it.
func ensureTracefs(t testing.TB) {
	t.Helper()
	const dir = "/sys/kernel/tracing"
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err == nil && fs.Type == unix.TRACEFS_MAGIC {
		return
	}
	if err := unix.Mount("nodev", dir, "tracefs", 0, ""); err != nil {
		if testutil.OnCI() {
			t.Fatalf("mount tracefs: %v", err)
		}
		t.Skipf("cannot mount tracefs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmount tracefs: %v", err)
		}
	})
}
