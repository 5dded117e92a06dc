package integration

import (
	"context"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/checkpoint"
	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func checkpointPath() string { return checkpoint.FindCRIU() }

// runDaemonOnce runs duplexd expecting it to exit (a refused start) and returns its output.
func runDaemonOnce(bin string, args ...string) (string, error) {
	out, err := exec.Command(bin, args...).CombinedOutput()
	return string(out), err
}

// runEcho runs the echo server as workload "echo" on h, listening on vip port 9000
// (extra are more echoserver flags), and waits until it listens. It returns the
// echoserver binary's path in h's directory.
func runEcho(t *testing.T, h *harness.Daemon, vip netip.Prefix, wait time.Duration, extra ...string) string {
	t.Helper()
	echo := filepath.Join(h.Dir, "echoserver")
	copyFile(t, testutil.Build(t, "./integration/harness/echoserver"), echo)
	args := append([]string{"run", "echo", "--vip", vip.String() + "@eth0", "--env", "GODEBUG=multipathtcp=0", "--",
		echo, "-listen", netip.AddrPortFrom(vip.Addr(), 9000).String()}, extra...)
	must(t, h, args...)
	testutil.Eventually(t, wait, "the echo server to listen", func() bool {
		return strings.Contains(must(t, h, "logs", "echo"), "LISTENING")
	})
	return echo
}

// streamTo starts a client streaming rate bytes a second in chunks through vip
// port 9000 and waits until it carried min verified bytes. The stream ends with
// the test.
func streamTo(t *testing.T, client *harness.Node, vip netip.Prefix, rate, chunk int, min int64) *harness.Stream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	s, err := harness.StartStream(ctx, client, netip.AddrPortFrom(vip.Addr(), 9000), rate, chunk)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "stream traffic", func() bool { return s.Stats().BytesVerified > min })
	return s
}
