package netfail

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/mdlayher/arp"
	"github.com/mdlayher/ethernet"
	"github.com/mdlayher/ndp"
	"github.com/mdlayher/packet"
	"github.com/vishvananda/netlink"
)

// Defaults for the zero fields of Announce. keepalived sends 5 gratuitous ARPs back to
// back and a second burst 5 s later; the packets of a burst are spaced here so that
// one short loss on the way does not take all of them.
const (
	DefaultCount    = 5
	DefaultInterval = 10 * time.Millisecond
	DefaultRepeat   = 5 * time.Second
)

// Announce says how peers are told that a VIP has moved. The zero value means the
// defaults: 5 rounds 10 ms apart, again 5 s later.
type Announce struct {
	// Count is the number of rounds per burst (0: DefaultCount). A round is, for IPv4,
	// one gratuitous ARP request and one gratuitous ARP reply; for IPv6, one
	// unsolicited neighbour advertisement.
	Count int
	// Interval separates the rounds of a burst (0 or less: DefaultInterval).
	Interval time.Duration
	// Repeat is the delay before the second burst (0: DefaultRepeat). The second burst
	// catches peers that missed the first one, e.g. a switch port still learning.
	Repeat time.Duration
	// NoRepeat sends the first burst only.
	NoRepeat bool
	// OnRepeat, if set, is called from the Manager's goroutine with the outcome of the
	// second burst: nil once it was sent, or the error (ErrNotAssigned when the VIP
	// left the link meanwhile, which sends nothing). It is not called when the second
	// burst is cancelled by ctx, Remove, a newer Announce of the same address or Close.
	OnRepeat func(error)
}

func (a Announce) withDefaults() (Announce, error) {
	if a.Count < 0 || a.Repeat < 0 {
		return a, fmt.Errorf("negative count %d or repeat %s", a.Count, a.Repeat)
	}
	if a.Count == 0 {
		a.Count = DefaultCount
	}
	if a.Interval <= 0 {
		a.Interval = DefaultInterval
	}
	if a.Repeat == 0 {
		a.Repeat = DefaultRepeat
	}
	return a, nil
}

// repeat is a scheduled second burst.
type repeat struct {
	cancel context.CancelFunc
}

// Announce tells the peers on the VIP's link that the VIP is here now, so that their
// neighbour caches point at this link's MAC address without waiting for their entries
// to expire. IPv4: gratuitous ARP request and reply (sender IP = target IP = VIP, and
// for the reply target MAC = sender MAC, RFC 2002 4.6) broadcast from the link's MAC;
// Linux peers override even an entry updated within locktime for these. IPv6:
// unsolicited neighbour advertisement (override flag, target link-layer address
// option, hop limit 255) from the VIP to ff02::1, with the Router flag set when the
// link forwards IPv6. Peers update entries they have; they create none (Linux defaults
// arp_accept=0, accept_untracked_na=0), and a peer without an entry resolves afresh.
//
// The first burst is sent before Announce returns. Unless a.NoRepeat, a second burst
// follows after a.Repeat from a goroutine the Manager owns; ctx, Remove of the VIP, a
// newer Announce of it, and Close cancel it, so pass a ctx that lives that long. The
// second burst is sent only if the VIP is still on the link.
//
// Announce refuses a VIP that is not on its link (ErrNotAssigned), and stops with
// ErrNotAssigned when the VIP is removed through this Manager while it runs: a host
// must never announce a VIP it no longer holds.
func (m *Manager) Announce(ctx context.Context, v VIP, a Announce) error {
	_, err := m.announce(ctx, v, a, true)
	return err
}

// announce sends the first burst, schedules the second, and returns the time the
// first packet left. If check, it first verifies the address is on the link.
func (m *Manager) announce(ctx context.Context, v VIP, a Announce, check bool) (time.Time, error) {
	a, err := a.withDefaults()
	if err != nil {
		return time.Time{}, fmt.Errorf("announce %s: %w", v, err)
	}
	if err := m.prepare(ctx, v); err != nil {
		return time.Time{}, fmt.Errorf("announce %s: %w", v, err)
	}
	gen := m.generation(v.Addr.Addr())
	first, err := m.burst(ctx, v, a, check, gen)
	m.ops.RUnlock()
	if err != nil {
		return first, fmt.Errorf("announce %s: %w", v, err)
	}
	if !a.NoRepeat {
		m.scheduleRepeat(ctx, v, a, gen)
	}
	return first, nil
}

// generation counts the Removes of ip; a burst stops when it changes under it.
func (m *Manager) generation(ip netip.Addr) uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.gen[ip]
}

func (m *Manager) scheduleRepeat(ctx context.Context, v VIP, a Announce, gen uint64) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ip := v.Addr.Addr()
	if m.closed || m.gen[ip] != gen { // closed, or removed while the first burst ran
		return
	}
	if old := m.pending[ip]; old != nil {
		old.cancel()
	}
	rctx, cancel := context.WithCancel(ctx)
	r := &repeat{cancel: cancel}
	m.pending[ip] = r
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer func() {
			cancel()
			m.mu.Lock()
			if m.pending[ip] == r {
				delete(m.pending, ip)
			}
			m.mu.Unlock()
		}()
		t := time.NewTimer(a.Repeat)
		defer t.Stop()
		select {
		case <-rctx.Done():
			return
		case <-t.C:
		}
		if err := m.begin(); err != nil {
			return // closed
		}
		_, err := m.burst(rctx, v, a, true, gen)
		m.ops.RUnlock()
		if rctx.Err() != nil {
			return
		}
		if a.OnRepeat != nil {
			if err != nil {
				err = fmt.Errorf("announce %s (second burst): %w", v, err)
			}
			a.OnRepeat(err)
		}
	}()
}

// removing stops the announcements of ip: the rounds still to come of a burst in
// flight and the pending second burst.
func (m *Manager) removing(ip netip.Addr) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.gen[ip]++
	if r := m.pending[ip]; r != nil {
		r.cancel()
		delete(m.pending, ip)
	}
}

// burst sends a.Count rounds of announcements and returns the time the first one
// left. It stops when the VIP is removed through this Manager (its generation is no
// longer gen). The caller holds m.ops shared.
func (m *Manager) burst(ctx context.Context, v VIP, a Announce, check bool, gen uint64) (time.Time, error) {
	link, err := m.link(v)
	if err != nil {
		return time.Time{}, err
	}
	if check {
		ok, err := m.assigned(link, v)
		if err != nil {
			return time.Time{}, err
		}
		if !ok {
			return time.Time{}, fmt.Errorf("%s on link %s in netns %s: %w", v.Addr.Addr(), v.Link, m.nsName, ErrNotAssigned)
		}
	}
	attrs := link.Attrs()
	mac := attrs.HardwareAddr
	if len(mac) != 6 {
		return time.Time{}, fmt.Errorf("link %s in netns %s has no Ethernet address (%q): nothing to announce to", v.Link, m.nsName, mac)
	}
	ls, err := m.linkState(link, v.Addr.Addr().Is6())
	if err != nil {
		return time.Time{}, err
	}
	var router bool
	if v.Addr.Addr().Is6() {
		if router, err = ls.forwarding(); err != nil {
			m.dropLinkState(v.Link, ls)
			return time.Time{}, fmt.Errorf("read IPv6 forwarding of %s in netns %s: %w", v.Link, m.nsName, err)
		}
	}
	frames, err := announcement(v.Addr.Addr(), mac, router)
	if err != nil {
		return time.Time{}, err
	}

	var first time.Time
	dst := &packet.Addr{HardwareAddr: frames.dst}
	for i := range a.Count {
		if i > 0 {
			t := time.NewTimer(a.Interval)
			select {
			case <-ctx.Done():
				t.Stop()
				return first, ctx.Err()
			case <-t.C:
			}
		}
		if m.generation(v.Addr.Addr()) != gen {
			return first, fmt.Errorf("%s removed from %s in netns %s while announcing: %w", v.Addr.Addr(), v.Link, m.nsName, ErrNotAssigned)
		}
		for _, f := range frames.frames {
			if _, err := ls.conn.WriteTo(f, dst); err != nil {
				m.dropLinkState(v.Link, ls)
				return first, fmt.Errorf("send on %s in netns %s: %w", v.Link, m.nsName, err)
			}
			if first.IsZero() {
				first = time.Now()
			}
		}
	}
	return first, nil
}

// linkState is what the Manager keeps per link for announcing, all opened inside its
// namespace: a raw AF_PACKET socket (bound to protocol 0, so it receives nothing and
// only sends) and, once an IPv6 VIP was announced there, the link's IPv6 forwarding
// sysctl (a /proc/sys/net file shows the namespace of the thread that opened it).
//
// They are kept, one set per link name, until Close, a failed send, or the name turning
// up with another interface index (the link was recreated). Reopening per Announce
// would cost a namespace switch each time and, worse, closing an AF_PACKET socket
// waits for an RCU grace period (synchronize_net in packet_release): about 12 ms here.
type linkState struct {
	index int
	conn  *packet.Conn
	fwd   *os.File // /proc/sys/net/ipv6/conf/LINK/forwarding; nil until needed
}

func (ls *linkState) close() error {
	err := ls.conn.Close()
	if ls.fwd != nil {
		err = errors.Join(err, ls.fwd.Close())
	}
	return err
}

// forwarding reports whether the link forwards IPv6, i.e. whether this host is a router
// there. A neighbour advertisement must say so: a peer that sees the Router flag drop
// for its default router deletes the routes through it (RFC 4861 7.2.5), which would
// break a gateway VIP. The kernel and keepalived set the flag the same way.
func (ls *linkState) forwarding() (bool, error) {
	var b [8]byte
	n, err := ls.fwd.ReadAt(b[:], 0)
	if n == 0 && err != nil {
		return false, err
	}
	return strings.TrimSpace(string(b[:n])) != "0", nil
}

// linkState returns the link's state, opening what is missing (the forwarding sysctl
// only if v6).
func (m *Manager) linkState(link netlink.Link, v6 bool) (*linkState, error) {
	attrs := link.Attrs()
	m.linksMu.Lock()
	defer m.linksMu.Unlock()
	ls := m.links[attrs.Name]
	if ls != nil && ls.index != attrs.Index {
		delete(m.links, attrs.Name)
		_ = ls.close() // its link is gone; nothing to report
		ls = nil
	}
	if ls != nil && (!v6 || ls.fwd != nil) {
		return ls, nil
	}
	if ls == nil {
		ls = &linkState{index: attrs.Index}
	}
	ifi := &net.Interface{Index: attrs.Index, Name: attrs.Name, HardwareAddr: attrs.HardwareAddr, MTU: attrs.MTU}
	err := inNetns(m.ns, func() error {
		if ls.conn == nil {
			conn, err := packet.Listen(ifi, packet.Raw, 0, nil)
			if err != nil {
				return fmt.Errorf("open packet socket: %w", err)
			}
			ls.conn = conn
		}
		if v6 && ls.fwd == nil {
			f, err := os.Open("/proc/sys/net/ipv6/conf/" + attrs.Name + "/forwarding")
			if err != nil {
				return err
			}
			ls.fwd = f
		}
		return nil
	})
	if ls.conn != nil {
		m.links[attrs.Name] = ls // keep what did open, even on error
	}
	if err != nil {
		return nil, fmt.Errorf("prepare announcing on %s in netns %s: %w", attrs.Name, m.nsName, err)
	}
	return ls, nil
}

// dropLinkState forgets and closes ls if it is still the named link's, so that the next
// announcement starts afresh.
func (m *Manager) dropLinkState(name string, ls *linkState) {
	m.linksMu.Lock()
	defer m.linksMu.Unlock()
	if m.links[name] == ls {
		delete(m.links, name)
		_ = ls.close() // it already failed; that error is the one to report
	}
}

// frames is one round of announcement frames and their Ethernet destination.
type frames struct {
	dst    net.HardwareAddr
	frames [][]byte
}

var (
	zeroMAC = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	// allNodes is ff02::1 and its Ethernet multicast address (RFC 2464).
	allNodes    = netip.IPv6LinkLocalAllNodes()
	allNodesMAC = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
)

// announcement builds one round of frames announcing ip at mac. router sets the IPv6
// advertisement's Router flag.
func announcement(ip netip.Addr, mac net.HardwareAddr, router bool) (frames, error) {
	if ip.Is4() {
		req, err := arp.NewPacket(arp.OperationRequest, mac, ip, zeroMAC, ip)
		if err != nil {
			return frames{}, fmt.Errorf("build ARP request: %w", err)
		}
		rep, err := arp.NewPacket(arp.OperationReply, mac, ip, mac, ip)
		if err != nil {
			return frames{}, fmt.Errorf("build ARP reply: %w", err)
		}
		var out [][]byte
		for _, p := range []*arp.Packet{req, rep} {
			f, err := ethFrame(ethernet.Broadcast, mac, ethernet.EtherTypeARP, p)
			if err != nil {
				return frames{}, err
			}
			out = append(out, f)
		}
		return frames{dst: ethernet.Broadcast, frames: out}, nil
	}
	na := &ndp.NeighborAdvertisement{
		Router:        router,
		Override:      true,
		TargetAddress: ip,
		Options:       []ndp.Option{&ndp.LinkLayerAddress{Direction: ndp.Target, Addr: mac}},
	}
	icmp, err := ndp.MarshalMessageChecksum(na, ip, allNodes)
	if err != nil {
		return frames{}, fmt.Errorf("build neighbour advertisement: %w", err)
	}
	pkt := make([]byte, 40+len(icmp))
	pkt[0] = 6 << 4 // version 6, traffic class 0, flow label 0
	binary.BigEndian.PutUint16(pkt[4:6], uint16(len(icmp)))
	pkt[6] = 58  // next header: ICMPv6
	pkt[7] = 255 // hop limit: receivers drop ND messages with any other value
	src, dst := ip.As16(), allNodes.As16()
	copy(pkt[8:24], src[:])
	copy(pkt[24:40], dst[:])
	copy(pkt[40:], icmp)
	f, err := (&ethernet.Frame{Destination: allNodesMAC, Source: mac, EtherType: ethernet.EtherTypeIPv6, Payload: pkt}).MarshalBinary()
	if err != nil {
		return frames{}, fmt.Errorf("build Ethernet frame: %w", err)
	}
	return frames{dst: allNodesMAC, frames: [][]byte{f}}, nil
}

func ethFrame(dst, src net.HardwareAddr, et ethernet.EtherType, p *arp.Packet) ([]byte, error) {
	pb, err := p.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("marshal ARP packet: %w", err)
	}
	f, err := (&ethernet.Frame{Destination: dst, Source: src, EtherType: et, Payload: pb}).MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("build Ethernet frame: %w", err)
	}
	return f, nil
}
