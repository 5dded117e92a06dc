package netfail_test

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/duplex-ha/duplex/netfail"
)

// A request sent while the server's host drops it (as CRIU's network lock does) is
// held, and replayed once the drop ends: the server reads it at once, long before
// the client's retransmission timeout (200 ms at least) would have resent it.
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
				if d := at.Sub(sent); d > 150*time.Millisecond {
					t.Errorf("the request arrived %s after it was sent: not the replay, a retransmission", d)
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
