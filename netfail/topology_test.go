package netfail_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/netfail"
)

// servicePort is where each host's test listener answers with its name.
const servicePort = 7777

// host is one network namespace of the test topology with its eth0.
type host struct {
	name string // host name: "A", "B", "C"
	ns   string // netns name
	mac  net.HardwareAddr
}

func (h *host) path() string { return "/run/netns/" + h.ns }

// topology is three hosts A, B and client C, each with an eth0 veth into a bridge
// that lives in a fourth namespace (the switch). Host i (1-based) has 10.77.N.i/24
// and fd00:77:N::i/64 on eth0, N random per run.
type topology struct {
	n       int
	a, b, c *host
}

// prefix returns the address .100 (the VIP) or any other host number of the topology's
// subnet in the family (4 or 6).
func (tp *topology) prefix(family, hostnum int) netip.Prefix {
	if family == 4 {
		return netip.MustParsePrefix(fmt.Sprintf("10.77.%d.%d/24", tp.n, hostnum))
	}
	return netip.MustParsePrefix(fmt.Sprintf("fd00:77:%x::%x/64", tp.n, hostnum))
}

// newTopology builds the topology and removes it when the test ends, failed or not.
func newTopology(t testing.TB) *topology {
	t.Helper()
	testutil.RequiresRoot(t)
	base := testutil.Unique("dpxnf")
	tp := &topology{n: rand.IntN(256)}
	addNetns := func(name string) {
		ip(t, "netns", "add", name)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", name, err, out)
			}
		})
	}
	sw := base + "s"
	addNetns(sw)
	ip(t, "-n", sw, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
	ip(t, "-n", sw, "link", "set", "br0", "up")
	for i, name := range []string{"A", "B", "C"} {
		h := &host{name: name, ns: base + strings.ToLower(name)}
		addNetns(h.ns)
		port := "p" + strings.ToLower(name)
		// Created inside the namespaces, so the names cannot collide with anything.
		ip(t, "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.ns)
		ip(t, "-n", sw, "link", "set", port, "master", "br0", "up")
		ip(t, "-n", h.ns, "link", "set", "lo", "up")
		ip(t, "-n", h.ns, "link", "set", "eth0", "up")
		ip(t, "-n", h.ns, "addr", "add", tp.prefix(4, i+1).String(), "dev", "eth0")
		ip(t, "-n", h.ns, "addr", "add", tp.prefix(6, i+1).String(), "dev", "eth0", "nodad")
		link, err := handle(t, h).LinkByName("eth0")
		if err != nil {
			t.Fatalf("eth0 in %s: %v", h.ns, err)
		}
		h.mac = link.Attrs().HardwareAddr
		switch name {
		case "A":
			tp.a = h
		case "B":
			tp.b = h
		case "C":
			tp.c = h
		}
	}
	return tp
}

func ip(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// nft runs an nft script inside h's namespace.
func nft(t testing.TB, h *host, script string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", h.ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft in %s: %v: %s\n%s", h.ns, err, out, script)
	}
}

// silence stops h from sending ARP requests and neighbour solicitations, so that any
// change of its neighbour cache can only come from what others send unasked. The
// returned func lifts it.
func silence(t testing.TB, h *host) func() {
	t.Helper()
	nft(t, h, `table arp dpxnf {
	chain out { type filter hook output priority 0; policy drop; }
}
table ip6 dpxnf {
	chain out { type filter hook output priority 0; icmpv6 type nd-neighbor-solicit drop; }
}
`)
	return func() { nft(t, h, "delete table arp dpxnf\ndelete table ip6 dpxnf\n") }
}

// handle returns a netlink handle inside h's namespace, closed when the test ends.
func handle(t testing.TB, h *host) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromName(h.ns)
	if err != nil {
		t.Fatalf("open netns %s: %v", h.ns, err)
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatalf("netlink in %s: %v", h.ns, err)
	}
	t.Cleanup(nh.Close)
	return nh
}

// manager returns a netfail.Manager for h, closed when the test ends.
func manager(t testing.TB, h *host) *netfail.Manager {
	t.Helper()
	m, err := netfail.New(h.path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := m.Close(); err != nil {
			t.Errorf("close manager of %s: %v", h.name, err)
		}
	})
	return m
}

// inNS runs fn on a thread inside h's namespace; sockets fn opens stay there.
func inNS(t testing.TB, h *host, fn func() error) error {
	t.Helper()
	target, err := netns.GetFromName(h.ns)
	if err != nil {
		t.Fatalf("open netns %s: %v", h.ns, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // unlocked only once back home; else the thread dies with the goroutine
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			errc <- err
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			errc <- err
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// serve runs a TCP listener on every address of h at servicePort that answers each
// connection with h's name, until the test ends.
func serve(t testing.TB, h *host) {
	t.Helper()
	var ln net.Listener
	if err := inNS(t, h, func() (err error) {
		ln, err = net.Listen("tcp", fmt.Sprintf("[::]:%d", servicePort))
		return err
	}); err != nil {
		t.Fatalf("listen in %s: %v", h.name, err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = io.WriteString(c, h.name)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
}

// dial connects from h to addr:servicePort and returns the name of the host that answered.
func dial(t testing.TB, h *host, addr netip.Addr) string {
	t.Helper()
	var c net.Conn
	if err := inNS(t, h, func() (err error) {
		d := net.Dialer{Timeout: 3 * time.Second}
		c, err = d.Dial("tcp", netip.AddrPortFrom(addr, servicePort).String())
		return err
	}); err != nil {
		t.Fatalf("connect from %s to %s: %v", h.name, addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read from %s at %s: %v", addr, h.name, err)
	}
	return string(b)
}

// neigh returns h's eth0 neighbour entry for addr (nil if none).
func neigh(t testing.TB, nh *netlink.Handle, addr netip.Addr) *netlink.Neigh {
	t.Helper()
	n, err := lookupNeigh(nh, addr)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func lookupNeigh(nh *netlink.Handle, addr netip.Addr) (*netlink.Neigh, error) {
	link, err := nh.LinkByName("eth0")
	if err != nil {
		return nil, err
	}
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	list, err := nh.NeighList(link.Attrs().Index, family)
	if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
		return nil, err
	}
	for i := range list {
		if ip, ok := netip.AddrFromSlice(list[i].IP); ok && ip.Unmap() == addr {
			return &list[i], nil
		}
	}
	return nil, nil
}

// neighWatch polls a neighbour entry every 200 µs from a goroutine, so that the moment
// it changes is known even while the caller is busy.
type neighWatch struct {
	done chan struct{}
	at   time.Time
	n    *netlink.Neigh
	err  error
}

// watchNeigh starts watching h's entry for addr until it holds mac.
func watchNeigh(nh *netlink.Handle, addr netip.Addr, mac net.HardwareAddr, stop <-chan struct{}) *neighWatch {
	w := &neighWatch{done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			n, err := lookupNeigh(nh, addr)
			if err != nil {
				w.err = err
				return
			}
			if n != nil && bytes.Equal(n.HardwareAddr, mac) {
				w.at, w.n = time.Now(), n
				return
			}
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Microsecond):
			}
		}
	}()
	return w
}

// wait returns when the entry held the MAC, or fails the test after timeout.
func (w *neighWatch) wait(t testing.TB, timeout time.Duration, what string) (time.Time, *netlink.Neigh) {
	t.Helper()
	select {
	case <-w.done:
	case <-time.After(timeout):
		t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
	if w.err != nil {
		t.Fatalf("waiting for %s: %v", what, w.err)
	}
	if w.n == nil {
		t.Fatalf("stopped waiting for %s", what)
	}
	return w.at, w.n
}

// waitNeigh waits until h's neighbour entry for addr holds mac.
func waitNeigh(t testing.TB, nh *netlink.Handle, h *host, addr netip.Addr, mac net.HardwareAddr, within time.Duration, who string) *netlink.Neigh {
	t.Helper()
	var n *netlink.Neigh
	testutil.Eventually(t, within, fmt.Sprintf("%s's neighbour entry for %s to be %s's MAC %s", h.name, addr, who, mac), func() bool {
		n = neigh(t, nh, addr)
		return n != nil && bytes.Equal(n.HardwareAddr, mac)
	})
	return n
}

// nudState names a neighbour cache state.
func nudState(s int) string {
	names := map[int]string{
		netlink.NUD_INCOMPLETE: "INCOMPLETE", netlink.NUD_REACHABLE: "REACHABLE",
		netlink.NUD_STALE: "STALE", netlink.NUD_DELAY: "DELAY", netlink.NUD_PROBE: "PROBE",
		netlink.NUD_FAILED: "FAILED", netlink.NUD_NOARP: "NOARP", netlink.NUD_PERMANENT: "PERMANENT",
	}
	if n, ok := names[s]; ok {
		return n
	}
	return fmt.Sprintf("%#x", s)
}
