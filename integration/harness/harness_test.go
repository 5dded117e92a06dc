package harness_test

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/integration/harness"
	"github.com/duplex-ha/duplex/internal/testutil"
)

func TestMain(m *testing.M) { os.Exit(testutil.Main(m)) }

// netnsWithPrefix lists the named network namespaces whose names start with prefix.
func netnsWithPrefix(t *testing.T, prefix string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatalf("ip netns list: %v", err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			names = append(names, f[0])
		}
	}
	return names
}

func TestInvalidOptions(t *testing.T) {
	for _, o := range []harness.Options{
		{Hosts: 0},
		{Hosts: 91},
		{Hosts: 1, Clients: -1},
		{Hosts: 1, Subnet: "nonsense"},
		{Hosts: 1, Subnet: "fd00::/64"},
		{Hosts: 1, Subnet: "10.1.2.0/28"},
		{Hosts: 1, Prefix: "has-dash"},
		{Hosts: 1, Prefix: "a/b"},
	} {
		c, err := harness.New(context.Background(), o)
		if !errors.Is(err, harness.ErrInvalidOptions) {
			t.Errorf("New(%+v) = %v, %v; want ErrInvalidOptions", o, c, err)
		}
	}
}

func TestCluster(t *testing.T) {
	c := harness.NewT(t, harness.Options{Hosts: 2, Clients: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	h0, h1, c0 := c.Hosts[0], c.Hosts[1], c.Clients[0]

	t.Run("layout", func(t *testing.T) {
		seen := map[netip.Addr]string{}
		for _, n := range c.Nodes() {
			if !c.Subnet.Contains(n.Addr.Addr()) || n.Addr.Bits() != c.Subnet.Bits() {
				t.Errorf("%s: address %s outside %s", n.Name, n.Addr, c.Subnet)
			}
			if !c.Subnet6.Contains(n.Addr6.Addr()) {
				t.Errorf("%s: address %s outside %s", n.Name, n.Addr6, c.Subnet6)
			}
			if other, dup := seen[n.Addr.Addr()]; dup {
				t.Errorf("%s and %s share %s", n.Name, other, n.Addr)
			}
			seen[n.Addr.Addr()] = n.Name
			if n.NetNS != c.Name+"-"+n.Name || n.NSPath != "/run/netns/"+n.NetNS || n.Link != "eth0" {
				t.Errorf("%s: names %q %q %q", n.Name, n.NetNS, n.NSPath, n.Link)
			}
		}
		if h0.Addr.Addr().As4()[3] != 10 || c0.Addr.Addr().As4()[3] != 100 {
			t.Errorf("h0 %s, c0 %s: want .10 and .100", h0.Addr, c0.Addr)
		}
		if v := c.VIP(0); v.Addr().As4()[3] != 200 || !c.Subnet.Contains(v.Addr()) || v.Bits() != 24 {
			t.Errorf("VIP(0) = %s", v)
		}
		if got := netnsWithPrefix(t, c.Name+"-"); len(got) != 4 {
			t.Errorf("namespaces %v: want switch, h0, h1, c0", got)
		}
	})

	t.Run("command runs in the node", func(t *testing.T) {
		for _, n := range c.Nodes() {
			out := ipShow(t, ctx, n, "addr") + ipShow(t, ctx, n, "link")
			for _, want := range []string{n.Addr.String(), n.Addr6.String(), "state UP", n.MAC.String()} {
				if !strings.Contains(out, want) {
					t.Errorf("%s: %q missing from:\n%s", n.Name, want, out)
				}
			}
		}
	})

	t.Run("nodes reach each other", func(t *testing.T) {
		for _, p := range [][2]*harness.Node{{h0, h1}, {h1, h0}, {h0, c0}, {c0, h1}} {
			for _, dst := range []netip.Addr{p[1].Addr.Addr(), p[1].Addr6.Addr()} {
				pctx, pcancel := context.WithTimeout(ctx, 3*time.Second)
				if err := p[0].Ping(pctx, dst); err != nil {
					t.Error(err)
				}
				pcancel()
			}
		}
	})

	t.Run("ping binary via Command", func(t *testing.T) {
		if _, err := exec.LookPath("ping"); err != nil {
			t.Skip("no ping binary (iputils-ping is not among make deps); Node.Ping covers reachability")
		}
		if out, err := c0.Command(ctx, "ping", "-c1", "-W2", h0.Addr.Addr().String()).CombinedOutput(); err != nil {
			t.Errorf("ping from c0: %v: %s", err, out)
		}
	})

	echoBin := testutil.Build(t, "./integration/harness/echoserver")
	cmd := h0.Command(context.Background(), echoBin, "-listen", h0.Addr.Addr().String()+":7777")
	cmd.Env = append(os.Environ(), "GODEBUG=multipathtcp=0")
	echo, err := c.StartCmd(cmd)
	if err != nil {
		t.Fatal(err)
	}
	t.Run("stream through echo server", func(t *testing.T) {
		if err := echo.WaitOutput(ctx, "LISTENING"); err != nil {
			t.Fatal(err)
		}
		s, err := harness.StartStream(ctx, c0, netip.AddrPortFrom(h0.Addr.Addr(), 7777), 1<<20, 4096)
		if err != nil {
			t.Fatal(err)
		}
		if la := s.LocalAddr(); la.Addr() != c0.Addr.Addr() {
			t.Errorf("stream's local address %s, want c0's %s", la, c0.Addr)
		}
		testutil.Eventually(t, 5*time.Second, "100 KiB verified", func() bool {
			st := s.Stats()
			return st.BytesVerified >= 100<<10 || st.Err != nil
		})
		st := s.Stop()
		t.Logf("stream: %+v", st)
		if st.Err != nil || st.BytesVerified != st.BytesSent || st.BytesVerified < 100<<10 || st.Reconnects != 0 {
			t.Errorf("stream: %+v", st)
		}
		if st.MaxGap > time.Second {
			t.Errorf("max gap %s on an idle bridge", st.MaxGap)
		}
	})

	t.Run("close leaves nothing", func(t *testing.T) {
		// Started behind the cluster's back: Close must find it by its namespace.
		stray := h1.Command(context.Background(), "sleep", "300")
		if err := stray.Start(); err != nil {
			t.Fatal(err)
		}
		if err := c.Close(); err != nil {
			t.Fatal(err)
		}
		if got := netnsWithPrefix(t, c.Name); len(got) > 0 {
			t.Errorf("namespaces left: %v", got)
		}
		select {
		case <-echo.Done():
		default:
			t.Errorf("echo server (pid %d) still running", echo.Pid())
		}
		strayDone := make(chan error, 1)
		go func() { strayDone <- stray.Wait() }()
		select {
		case err := <-strayDone:
			if err == nil || !strings.Contains(err.Error(), "killed") {
				t.Errorf("stray sleep: %v, want killed", err)
			}
		case <-time.After(2 * time.Second):
			_ = stray.Process.Kill()
			t.Errorf("stray sleep (pid %d) survived Close", stray.Process.Pid)
		}
		if out, _ := exec.Command("ip", "-o", "link").Output(); strings.Contains(string(out), c.Name) {
			t.Errorf("links named for %s in the root namespace:\n%s", c.Name, out)
		}
		if err := c.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		if _, err := c.Start(h0, "true"); !errors.Is(err, harness.ErrClosed) {
			t.Errorf("Start after Close: %v, want ErrClosed", err)
		}
	})
}

// ipShow returns `ip -o OBJ show dev eth0` run inside n through Command.
func ipShow(t *testing.T, ctx context.Context, n *harness.Node, obj string) string {
	t.Helper()
	out, err := n.Command(ctx, "ip", "-o", obj, "show", "dev", "eth0").CombinedOutput()
	if err != nil {
		t.Fatalf("%s: ip %s: %v: %s", n.Name, obj, err, out)
	}
	return string(out)
}

func TestNewFailsHalfway(t *testing.T) {
	testutil.RequiresRoot(t)
	prefix := testutil.Unique("dpxt")
	o := harness.FailAt(harness.Options{Prefix: prefix, Hosts: 2, Clients: 1}, "c0 veth")
	c, err := harness.New(context.Background(), o)
	if c != nil || !errors.Is(err, harness.ErrInjected) || !strings.Contains(err.Error(), "c0 veth") {
		t.Fatalf("New = %v, %v; want an injected failure at c0 veth", c, err)
	}
	t.Log(err)
	if got := netnsWithPrefix(t, prefix); len(got) > 0 {
		t.Errorf("namespaces left after failed New: %v", got)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := harness.New(ctx, harness.Options{Prefix: prefix, Hosts: 1}); err == nil {
		t.Fatal("New with a cancelled context succeeded")
	} else {
		t.Log(err)
	}
	if got := netnsWithPrefix(t, prefix); len(got) > 0 {
		t.Errorf("namespaces left after cancelled New: %v", got)
	}
}

func TestProcStop(t *testing.T) {
	c := harness.NewT(t, harness.Options{Hosts: 1})
	p, err := c.Start(c.Hosts[0], "sh", "-c", "trap 'echo bye; exit 3' TERM; echo started; while :; do :; done")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := p.WaitOutput(ctx, "started"); err != nil {
		t.Fatal(err)
	}
	if err := p.Stop(syscall.SIGTERM, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	var ee *exec.ExitError
	if err := p.Wait(); !errors.As(err, &ee) || ee.ExitCode() != 3 || !strings.Contains(p.Output(), "bye") {
		t.Errorf("Wait = %v, output %q; want exit 3 after bye", err, p.Output())
	}
	if err := p.WaitOutput(ctx, "never printed"); err == nil {
		t.Error("WaitOutput on an exited process succeeded")
	}
}
