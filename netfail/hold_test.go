package netfail_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duplex-ha/duplex/netfail"
)

// A request sent while the server's host drops it (as CRIU's network lock does) is
// held, and replayed once the drop ends: the server reads it at once, before the
// client's retransmission timeout would have resent it (200 ms at least by default).
// The client's route gets a 1 s minimum timeout and the test checks the client never
// retransmitted, so that a loaded machine's scheduling delays cannot make a
// retransmission pass for the replay, nor fail a replay that came after 200 ms.
func TestHoldAndReplay(t *testing.T) {
	tp := newTopology(t)
	for _, family := range []int{4, 6} {
		t.Run(familyName(family), func(t *testing.T) {
			addr := tp.prefix(family, 1)
			port := 7000 + family
			var ln net.Listener
			if err := inNS(t, tp.a, func() (err error) {
				ln, err = net.Listen("tcp", netip.AddrPortFrom(addr.Addr(), uint16(port)).String())
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			host := netip.PrefixFrom(addr.Addr(), addr.Addr().BitLen()).String()
			ip(t, "-n", tp.c.ns, "route", "add", host, "dev", "eth0", "rto_min", "1s")
			var c net.Conn
			if err := inNS(t, tp.c, func() (err error) {
				c, err = net.DialTimeout("tcp", netip.AddrPortFrom(addr.Addr(), uint16(port)).String(), 3*time.Second)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sc, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer sc.Close()
			got := make(chan time.Time, 1)
			go func() {
				b := make([]byte, 16)
				if n, err := sc.Read(b); err == nil && string(b[:n]) == "request" {
					got <- time.Now()
				}
				close(got)
			}()

			m := manager(t, tp.a)
			table := fmt.Sprintf("dpxhold%d", family)
			nft(t, tp.a, fmt.Sprintf("table inet %s {\n chain in { type filter hook input priority 0; tcp dport %d drop; }\n}\n", table, port))
			held, err := m.Hold([]netfail.VIP{{Addr: addr, Link: "eth0"}})
			if err != nil {
				t.Fatal(err)
			}
			sent := time.Now()
			if _, err := c.Write([]byte("request")); err != nil {
				t.Fatal(err)
			}
			time.Sleep(60 * time.Millisecond) // the server is "frozen"
			select {
			case <-got:
				t.Fatal("the request got through the drop")
			default:
			}
			pkts, dropped, err := held.Stop()
			if err != nil || len(pkts) == 0 || dropped != 0 {
				t.Fatalf("held %d packets (%d over the bounds), %v", len(pkts), dropped, err)
			}
			nft(t, tp.a, "delete table inet "+table+"\n")
			n, err := m.Replay(pkts)
			if err != nil || n != len(pkts) {
				t.Fatalf("replayed %d of %d: %v", n, len(pkts), err)
			}
			select {
			case at, ok := <-got:
				if !ok {
					t.Fatal("the server read something else")
				}
				if r := retransmits(t, c); r != 0 {
					t.Errorf("the client retransmitted %d times: the request that arrived %s after it was sent was not the replay", r, at.Sub(sent))
				}
				t.Logf("%d packets held and replayed; the request arrived %s after it was sent", len(pkts), at.Sub(sent).Round(time.Millisecond))
			case <-time.After(2 * time.Second):
				t.Fatal("the request never arrived")
			}
		})
	}
}

// Other traffic on the link is not held.
func TestHoldFilters(t *testing.T) {
	tp := newTopology(t)
	serve(t, tp.a)
	serve(t, tp.b)
	m := manager(t, tp.a)
	held, err := m.Hold([]netfail.VIP{{Addr: tp.prefix(4, 100), Link: "eth0"}}) // an address no one uses
	if err != nil {
		t.Fatal(err)
	}
	if name := dial(t, tp.c, tp.prefix(4, 1).Addr()); name != "A" {
		t.Fatalf("A's service answered %q", name)
	}
	if name := dial(t, tp.c, tp.prefix(6, 1).Addr()); name != "A" {
		t.Fatalf("A's service answered %q", name)
	}
	pkts, _, err := held.Stop()
	if err != nil || len(pkts) != 0 {
		t.Errorf("held %d packets for an address nobody sent to (%v)", len(pkts), err)
	}
	if _, err := m.Hold([]netfail.VIP{{Addr: tp.prefix(4, 100), Link: "nosuch0"}}); err == nil {
		t.Error("holding on a missing link succeeded")
	}
}

// retransmits is the number of segments the client's TCP resent on c.
func retransmits(t *testing.T, c net.Conn) uint32 {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var info *unix.TCPInfo
	var serr error
	if err := raw.Control(func(fd uintptr) { info, serr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO) }); err != nil {
		t.Fatal(err)
	}
	if serr != nil {
		t.Fatalf("TCP_INFO: %v", serr)
	}
	return info.Total_retrans
}
