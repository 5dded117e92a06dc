package netfail_test

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/internal/testutil"
	"github.com/duplex-ha/duplex/netfail"
)

var families = []int{4, 6}

func familyName(f int) string { return fmt.Sprintf("IPv%d", f) }

func TestAddRemoveIdempotent(t *testing.T) {
	tp := newTopology(t)
	m := manager(t, tp.a)
	nh := handle(t, tp.a)
	for _, f := range families {
		t.Run(familyName(f), func(t *testing.T) {
			ctx := t.Context()
			v := netfail.VIP{Addr: tp.prefix(f, 100), Link: "eth0"}
			for i := range 2 {
				if err := m.Add(ctx, v); err != nil {
					t.Fatalf("Add #%d: %v", i+1, err)
				}
			}
			if ok, err := m.Has(v); err != nil || !ok {
				t.Fatalf("Has after Add = %v, %v; want true", ok, err)
			}
			other := netfail.VIP{Addr: netip.PrefixFrom(v.Addr.Addr(), v.Addr.Addr().BitLen()), Link: "eth0"}
			if ok, err := m.Has(other); err != nil || ok {
				t.Fatalf("Has(%s) with another prefix length = %v, %v; want false", other, ok, err)
			}
			// Once on the link, and for IPv6 usable at once (no DAD, not tentative).
			link, _ := nh.LinkByName("eth0")
			addrs, err := nh.AddrList(link, netlink.FAMILY_ALL)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for _, a := range addrs {
				if ip, _ := netip.AddrFromSlice(a.IP); ip.Unmap() == v.Addr.Addr() {
					n++
					if a.Flags&unix.IFA_F_TENTATIVE != 0 {
						t.Errorf("%s is tentative (flags %#x)", v, a.Flags)
					}
					if f == 6 && a.Flags&unix.IFA_F_NODAD == 0 {
						t.Errorf("%s lacks IFA_F_NODAD (flags %#x)", v, a.Flags)
					}
				}
			}
			if n != 1 {
				t.Fatalf("%s is on eth0 %d times, want once", v, n)
			}
			for i := range 2 {
				if err := m.Remove(ctx, v); err != nil {
					t.Fatalf("Remove #%d: %v", i+1, err)
				}
			}
			if ok, err := m.Has(v); err != nil || ok {
				t.Fatalf("Has after Remove = %v, %v; want false", ok, err)
			}

			// Remove takes the address off whatever prefix length it carries.
			ip(t, "-n", tp.a.ns, "addr", "add", other.Addr.String(), "dev", "eth0", "nodad")
			if err := m.Remove(ctx, v); err != nil {
				t.Fatalf("Remove of %s present as %s: %v", v, other.Addr, err)
			}
			if ok, err := m.Has(other); err != nil || ok {
				t.Fatalf("Has(%s) after Remove(%s) = %v, %v; want false", other, v, ok, err)
			}
		})
	}
}

func TestMissingLink(t *testing.T) {
	tp := newTopology(t)
	m := manager(t, tp.a)
	ctx := t.Context()
	v := netfail.VIP{Addr: tp.prefix(4, 100), Link: "nosuch0"}
	check := func(op string, err error) {
		t.Helper()
		if !errors.Is(err, netfail.ErrLinkNotFound) {
			t.Fatalf("%s on a missing link: %v, want ErrLinkNotFound", op, err)
		}
		for _, part := range []string{"nosuch0", v.Addr.String(), tp.a.path()} {
			if !strings.Contains(err.Error(), part) {
				t.Errorf("%s error %q does not name %s", op, err, part)
			}
		}
		t.Logf("%s: %v", op, err)
	}
	check("Add", m.Add(ctx, v))
	check("Remove", m.Remove(ctx, v))
	_, err := m.Has(v)
	check("Has", err)
	check("Announce", m.Announce(ctx, v, netfail.Announce{NoRepeat: true}))
}

func TestAnnounceRefusesUnassigned(t *testing.T) {
	tp := newTopology(t)
	m := manager(t, tp.a)
	for _, f := range families {
		v := netfail.VIP{Addr: tp.prefix(f, 100), Link: "eth0"}
		err := m.Announce(t.Context(), v, netfail.Announce{NoRepeat: true})
		if !errors.Is(err, netfail.ErrNotAssigned) {
			t.Fatalf("Announce of %s not on the link: %v, want ErrNotAssigned", v, err)
		}
	}
}

func TestNewAndClose(t *testing.T) {
	if _, err := netfail.New("/run/netns/dpxnf-does-not-exist"); err == nil || !strings.Contains(err.Error(), "/run/netns/dpxnf-does-not-exist") {
		t.Fatalf("New on a missing netns: %v, want an error naming the path", err)
	}
	// The caller's own namespace; needs no privileges.
	m, err := netfail.New("")
	if err != nil {
		t.Fatal(err)
	}
	lo := netfail.VIP{Addr: netip.MustParsePrefix("127.0.0.1/8"), Link: "lo"}
	// ParseVIP refuses loopback VIPs, and so do the methods.
	if _, err := m.Has(lo); err == nil {
		t.Fatalf("Has(%s) accepted a loopback address", lo)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	v := netfail.VIP{Addr: netip.MustParsePrefix("10.77.0.100/24"), Link: "lo"}
	if err := m.Add(t.Context(), v); !errors.Is(err, netfail.ErrClosed) {
		t.Fatalf("Add after Close: %v, want ErrClosed", err)
	}
}

// TestFailover moves a VIP between A and B while client C holds a neighbour entry for
// it. C is kept from sending ARP requests or neighbour solicitations, so its entry can
// only follow the VIP through what the new holder announces. A control step moves the
// VIP back without announcing and checks that C's entry stays put: the kernel itself
// announces nothing, so the switch is the announcement's doing.
func TestFailover(t *testing.T) {
	for _, f := range families {
		t.Run(familyName(f), func(t *testing.T) {
			tp := newTopology(t)
			ctx := t.Context()
			ma, mb := manager(t, tp.a), manager(t, tp.b)
			serve(t, tp.a)
			serve(t, tp.b)
			nc := handle(t, tp.c)
			v := netfail.VIP{Addr: tp.prefix(f, 100), Link: "eth0"}
			vip := v.Addr.Addr()

			if f == 6 {
				// B routes IPv6, A does not: B's advertisement must carry the Router
				// flag, A's must not (a peer drops routes through a "former" router).
				ip(t, "netns", "exec", tp.b.ns, "sysctl", "-qw", "net.ipv6.conf.eth0.forwarding=1")
			}
			if err := ma.Add(ctx, v); err != nil {
				t.Fatal(err)
			}
			if got := dial(t, tp.c, vip); got != "A" {
				t.Fatalf("C reached %q at %s, want A", got, vip)
			}
			waitNeigh(t, nc, tp.c, vip, tp.a.mac, time.Second, "A")

			unsilence := silence(t, tp.c)
			stop := make(chan struct{})
			defer close(stop)
			w := watchNeigh(nc, vip, tp.b.mac, stop)
			start := time.Now()
			tm, err := netfail.Takeover(ctx, ma, mb, v, netfail.Announce{NoRepeat: true})
			if err != nil {
				t.Fatal(err)
			}
			at, n := w.wait(t, time.Second, fmt.Sprintf("C's neighbour entry for %s to be B's MAC %s", vip, tp.b.mac))
			t.Logf("takeover A->B: remove %s, add %s, first packet at %s, burst %s, total %s; C's entry held B's MAC at %s (state %s)",
				tm.Remove, tm.Add, tm.FirstPacket, tm.Announce, tm.Total, at.Sub(start), nudState(n.State))
			if d := at.Sub(start); d > time.Second {
				t.Fatalf("C's entry followed only after %s", d)
			}
			if f == 6 && n.Flags&netlink.NTF_ROUTER == 0 {
				t.Errorf("C's entry for %s lacks the router flag after B (forwarding) announced it", vip)
			}
			if ok, err := ma.Has(v); err != nil || ok {
				t.Fatalf("A still has %s after takeover: %v, %v", v, ok, err)
			}
			unsilence()
			if got := dial(t, tp.c, vip); got != "B" {
				t.Fatalf("C reached %q at %s after takeover, want B", got, vip)
			}

			// Control: move back without announcing; C keeps B's MAC.
			unsilence = silence(t, tp.c)
			if err := mb.Remove(ctx, v); err != nil {
				t.Fatal(err)
			}
			if err := ma.Add(ctx, v); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond)
			if n := neigh(t, nc, vip); n == nil || !bytes.Equal(n.HardwareAddr, tp.b.mac) {
				t.Fatalf("without announcement C's entry for %s changed to %v: the kernel announced by itself, the test proves nothing", vip, n)
			}
			w = watchNeigh(nc, vip, tp.a.mac, stop)
			start = time.Now()
			if err := ma.Announce(ctx, v, netfail.Announce{NoRepeat: true}); err != nil {
				t.Fatal(err)
			}
			burst := time.Since(start)
			at, n = w.wait(t, time.Second, fmt.Sprintf("C's neighbour entry for %s to be A's MAC %s", vip, tp.a.mac))
			t.Logf("announce on A: burst %s; C's entry held A's MAC at %s (state %s)", burst, at.Sub(start), nudState(n.State))
			if f == 6 && n.Flags&netlink.NTF_ROUTER != 0 {
				t.Errorf("C's entry for %s keeps the router flag after A (not forwarding) announced it", vip)
			}
			unsilence()
			if got := dial(t, tp.c, vip); got != "A" {
				t.Fatalf("C reached %q at %s after moving back, want A", got, vip)
			}
		})
	}
}

// TestSecondBurst checks the Manager's goroutine: it sends the second burst, skips it
// when the VIP left the link, and stops on Remove and Close.
func TestSecondBurst(t *testing.T) {
	tp := newTopology(t)
	ctx := t.Context()
	m := manager(t, tp.a)
	v := netfail.VIP{Addr: tp.prefix(4, 100), Link: "eth0"}
	if err := m.Add(ctx, v); err != nil {
		t.Fatal(err)
	}
	outcome := func(repeat time.Duration) (netfail.Announce, chan error) {
		ch := make(chan error, 1)
		return netfail.Announce{Count: 2, Interval: time.Millisecond, Repeat: repeat, OnRepeat: func(err error) { ch <- err }}, ch
	}

	t.Run("sent", func(t *testing.T) {
		a, ch := outcome(50 * time.Millisecond)
		if err := m.Announce(ctx, v, a); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ch:
			if err != nil {
				t.Fatalf("second burst: %v", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("no second burst within 2s")
		}
	})

	t.Run("address gone", func(t *testing.T) {
		a, ch := outcome(100 * time.Millisecond)
		if err := m.Announce(ctx, v, a); err != nil {
			t.Fatal(err)
		}
		// Removed behind the Manager's back: the second burst must not claim it.
		ip(t, "-n", tp.a.ns, "addr", "del", v.Addr.String(), "dev", "eth0")
		select {
		case err := <-ch:
			if !errors.Is(err, netfail.ErrNotAssigned) {
				t.Fatalf("second burst after the VIP left: %v, want ErrNotAssigned", err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("no second burst outcome within 2s")
		}
		if err := m.Add(ctx, v); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("cancelled by Remove", func(t *testing.T) {
		a, ch := outcome(200 * time.Millisecond)
		if err := m.Announce(ctx, v, a); err != nil {
			t.Fatal(err)
		}
		if err := m.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-ch:
			t.Fatalf("second burst ran after Remove: %v", err)
		case <-time.After(500 * time.Millisecond):
		}
		if err := m.Add(ctx, v); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("first burst stopped by Remove", func(t *testing.T) {
		errc := make(chan error, 1)
		start := time.Now()
		go func() {
			errc <- m.Announce(ctx, v, netfail.Announce{Count: 50, Interval: 20 * time.Millisecond, NoRepeat: true})
		}()
		time.Sleep(50 * time.Millisecond)
		if err := m.Remove(ctx, v); err != nil {
			t.Fatal(err)
		}
		err := <-errc
		if !errors.Is(err, netfail.ErrNotAssigned) {
			t.Fatalf("Announce during Remove: %v, want ErrNotAssigned", err)
		}
		if d := time.Since(start); d > 300*time.Millisecond {
			t.Fatalf("Announce ran on for %s after Remove", d)
		}
		t.Log(err)
		if err := m.Add(ctx, v); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("stopped by Close", func(t *testing.T) {
		mc := manager(t, tp.a)
		a, ch := outcome(time.Hour)
		if err := mc.Announce(ctx, v, a); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := mc.Close(); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("Close took %s with a second burst pending", d)
		}
		select {
		case err := <-ch:
			t.Fatalf("second burst ran after Close: %v", err)
		default:
		}
	})
}

func TestTakeoverWithoutSource(t *testing.T) {
	tp := newTopology(t)
	mb := manager(t, tp.b)
	v := netfail.VIP{Addr: tp.prefix(4, 100), Link: "eth0"}
	tm, err := netfail.Takeover(t.Context(), nil, mb, v, netfail.Announce{NoRepeat: true, Count: 1})
	if err != nil {
		t.Fatal(err)
	}
	if tm.Remove != 0 || tm.FirstPacket <= 0 {
		t.Fatalf("timing %+v: want no removal and a first packet", tm)
	}
	if ok, err := mb.Has(v); err != nil || !ok {
		t.Fatalf("B has %s: %v, %v", v, ok, err)
	}
	// A failed removal adds nothing: vip0 exists on B only.
	ip(t, "-n", tp.b.ns, "link", "add", "vip0", "type", "veth", "peer", "name", "vip1") // no dummy module here
	ma := manager(t, tp.a)
	only := netfail.VIP{Addr: netip.MustParsePrefix("10.78.0.1/32"), Link: "vip0"}
	if _, err := netfail.Takeover(t.Context(), ma, mb, only, netfail.Announce{NoRepeat: true}); !errors.Is(err, netfail.ErrLinkNotFound) {
		t.Fatalf("Takeover with a missing source link: %v, want ErrLinkNotFound", err)
	}
	if ok, err := mb.Has(only); err != nil || ok {
		t.Fatalf("B has %s after a failed removal on A: %v, %v", only, ok, err)
	}
}

func BenchmarkTakeover(b *testing.B) {
	for _, f := range families {
		b.Run(familyName(f), func(b *testing.B) {
			testutil.RequiresRoot(b)
			tp := newTopology(b)
			ctx := b.Context()
			ms := [2]*netfail.Manager{manager(b, tp.a), manager(b, tp.b)}
			v := netfail.VIP{Addr: tp.prefix(f, 100), Link: "eth0"}
			if err := ms[0].Add(ctx, v); err != nil {
				b.Fatal(err)
			}
			a := netfail.Announce{Count: 1, NoRepeat: true}
			var sum netfail.Timing
			n := 0
			for b.Loop() {
				tm, err := netfail.Takeover(ctx, ms[n%2], ms[(n+1)%2], v, a)
				if err != nil {
					b.Fatal(err)
				}
				sum.Remove += tm.Remove
				sum.Add += tm.Add
				sum.FirstPacket += tm.FirstPacket
				n++
			}
			b.ReportMetric(float64(sum.Remove.Nanoseconds())/float64(n), "remove-ns")
			b.ReportMetric(float64(sum.Add.Nanoseconds())/float64(n), "add-ns")
			b.ReportMetric(float64(sum.FirstPacket.Nanoseconds())/float64(n), "firstpkt-ns")
		})
	}
}

// TestAnnounceAfterLinkChange: the Manager keeps a packet socket per link; a link that
// went down and up, or was deleted and recreated under the same name (new index, new
// MAC), must not break the next announcement.
func TestAnnounceAfterLinkChange(t *testing.T) {
	tp := newTopology(t)
	ctx := t.Context()
	m := manager(t, tp.a)
	nc := handle(t, tp.c)
	v := netfail.VIP{Addr: tp.prefix(4, 100), Link: "eth0"}
	a := netfail.Announce{Count: 1, NoRepeat: true}
	if err := m.Add(ctx, v); err != nil {
		t.Fatal(err)
	}
	serve(t, tp.a)
	if got := dial(t, tp.c, v.Addr.Addr()); got != "A" { // Linux peers update entries, never create them
		t.Fatalf("C reached %q, want A", got)
	}
	if err := m.Announce(ctx, v, a); err != nil {
		t.Fatal(err)
	}

	ip(t, "-n", tp.a.ns, "link", "set", "eth0", "down")
	ip(t, "-n", tp.a.ns, "link", "set", "eth0", "up")
	if err := m.Add(ctx, v); err != nil { // a downed link loses nothing for IPv4, but be sure
		t.Fatal(err)
	}
	if err := m.Announce(ctx, v, a); err != nil {
		t.Fatalf("announce after link down/up: %v", err)
	}

	// Recreate A's eth0 (new index, new MAC) and check C learns the new MAC.
	sw := strings.TrimSuffix(tp.a.ns, "a") + "s"
	ip(t, "-n", tp.a.ns, "link", "del", "eth0")
	ip(t, "-n", sw, "link", "add", "pa", "type", "veth", "peer", "name", "eth0", "netns", tp.a.ns)
	ip(t, "-n", sw, "link", "set", "pa", "master", "br0", "up")
	ip(t, "-n", tp.a.ns, "link", "set", "eth0", "up")
	link, err := handle(t, tp.a).LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Add(ctx, v); err != nil {
		t.Fatal(err)
	}
	if err := m.Announce(ctx, v, a); err != nil {
		t.Fatalf("announce after eth0 was recreated: %v", err)
	}
	waitNeigh(t, nc, tp.c, v.Addr.Addr(), link.Attrs().HardwareAddr, time.Second, "A's new eth0")
}

// TestNewCurrentNetns: New("") binds to the namespace of the calling thread, and the
// Manager keeps working there from any goroutine.
func TestNewCurrentNetns(t *testing.T) {
	tp := newTopology(t)
	var m *netfail.Manager
	if err := inNS(t, tp.a, func() (err error) {
		m, err = netfail.New("")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v := netfail.VIP{Addr: tp.prefix(4, 100), Link: "eth0"}
	if err := m.Add(t.Context(), v); err != nil {
		t.Fatal(err)
	}
	if ok, err := manager(t, tp.a).Has(v); err != nil || !ok {
		t.Fatalf("A has %s added through New(\"\") on A's thread: %v, %v", v, ok, err)
	}
	if err := m.Announce(t.Context(), v, netfail.Announce{Count: 1, NoRepeat: true}); err != nil {
		t.Fatal(err)
	}
}
