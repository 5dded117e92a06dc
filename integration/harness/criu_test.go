package harness_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/testutil"
)

// TestEchoServerSurvivesCRIU proves the echo server is a usable workload: dumped with
// its established connection and restored in the same host, the client's Stream goes
// on without an error. CRIU runs inside the host's namespace (otherwise it tries to
// dump the namespace itself) with the nftables network lock.
func TestEchoServerSurvivesCRIU(t *testing.T) {
	eng := testutil.RequiresCRIU(t)
	c := harness.NewT(t, harness.Options{Hosts: 1, Clients: 1})
	h0, c0 := c.Hosts[0], c.Clients[0]
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	dir := t.TempDir()

	// Not through Cluster.Start: CRIU cannot restore a pipe to the test process, so
	// output goes to a file, and a session of its own spares CRIU's --shell-job.
	logPath := filepath.Join(dir, "echo.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := h0.Command(context.Background(), testutil.Build(t, "./integration/harness/echoserver"),
		"-listen", h0.Addr.Addr().String()+":7777")
	cmd.Env = append(os.Environ(), "GODEBUG=multipathtcp=0")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait() }() // reaped here; Close kills the restored copy
	testutil.Eventually(t, 3*time.Second, "echo server listening", func() bool {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "LISTENING")
	})

	s, err := harness.StartStream(ctx, c0, netip.AddrPortFrom(h0.Addr.Addr(), 7777), 256<<10, 1024)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	testutil.Eventually(t, 3*time.Second, "stream flowing", func() bool { return s.Stats().BytesVerified >= 32<<10 })

	criu := func(args ...string) {
		t.Helper()
		img := filepath.Join(dir, "img")
		args = append(args, "-D", img, "--tcp-established", "--network-lock", "nftables", "-v4", "-o", args[0]+".log")
		if out, err := h0.Command(ctx, eng.Path(), args...).CombinedOutput(); err != nil {
			b, _ := os.ReadFile(filepath.Join(img, args[0]+".log"))
			lines := strings.Split(strings.TrimSpace(string(b)), "\n")
			t.Fatalf("criu %s: %v: %s\n%s", args[0], err, out, strings.Join(lines[max(0, len(lines)-30):], "\n"))
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "img"), 0o700); err != nil {
		t.Fatal(err)
	}
	criu("dump", "-t", strconv.Itoa(cmd.Process.Pid))
	time.Sleep(200 * time.Millisecond)
	criu("restore", "-d")
	before := s.Stats().BytesVerified
	testutil.Eventually(t, 3*time.Second, "stream flowing after restore", func() bool {
		st := s.Stats()
		return st.BytesVerified >= before+32<<10 || st.Err != nil
	})
	st := s.Stop()
	t.Logf("stream across dump and restore: %+v", st)
	if st.Err != nil || st.MaxGap < 200*time.Millisecond {
		t.Errorf("stream %+v: want no error and a gap of the 200ms freeze", st)
	}
}
