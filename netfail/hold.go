package netfail

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// A workload frozen for a migration cannot take the packets its clients send
// meanwhile: CRIU's network lock drops them, and each client's TCP sends them again
// only when its retransmission timer fires, at least 200 ms later. A client with
// nothing else in flight (one request, then its answer) waits that long even when
// the workload runs again on the destination after 50 ms. Hold keeps a copy of every
// TCP packet that arrives for the workload's addresses while it is frozen; Replay
// hands them to the destination's stack once the restored copy runs there, as if
// they had just arrived, so the copy answers at once. Copies of packets the workload
// had already taken are harmless: TCP discards what it already has.

// Bounds on what one Hold keeps; beyond them packets are only counted.
const (
	MaxHeldPackets = 8192
	MaxHeldBytes   = 32 << 20
)

// Held is a capture started by Hold.
type Held struct {
	stop chan struct{}
	wg   sync.WaitGroup
	once sync.Once
	fds  []int

	mu      sync.Mutex
	pkts    [][]byte
	bytes   int
	dropped int // over the bounds
	err     error
}

// Hold starts keeping copies of the TCP packets that arrive on the VIPs' links for
// the VIPs' addresses (IPv4 and IPv6), until Stop. It uses one packet socket per link
// with a kernel filter, so other traffic on the link costs nothing.
func (m *Manager) Hold(vips []VIP) (*Held, error) {
	if err := m.begin(); err != nil {
		return nil, err
	}
	defer m.ops.RUnlock()
	byLink := map[string][]netip.Addr{}
	for _, v := range vips {
		if err := v.check(); err != nil {
			return nil, fmt.Errorf("hold packets for %s: %w", v, err)
		}
		byLink[v.Link] = append(byLink[v.Link], v.Addr.Addr())
	}
	h := &Held{stop: make(chan struct{})}
	for name, addrs := range byLink {
		link, err := m.link(VIP{Link: name})
		if err != nil {
			h.Stop()
			return nil, fmt.Errorf("hold packets: %w", err)
		}
		prog, err := holdFilter(addrs)
		if err != nil {
			h.Stop()
			return nil, fmt.Errorf("hold packets on %s: %w", name, err)
		}
		// One socket per family present, bound to that protocol rather than to all:
		// a socket for all protocols also taps every packet the host sends (the
		// page channel's gigabytes among them); one for a protocol sees only what
		// arrives.
		families := map[uint16]bool{}
		for _, a := range addrs {
			if a.Unmap().Is4() {
				families[unix.ETH_P_IP] = true
			} else {
				families[unix.ETH_P_IPV6] = true
			}
		}
		for proto := range families {
			var fd int
			err = inNetns(m.ns, func() error {
				var err error
				fd, err = packetSocket(link.Attrs().Index, proto, prog)
				return err
			})
			if err != nil {
				h.Stop()
				return nil, fmt.Errorf("hold packets on %s in netns %s: %w", name, m.nsName, err)
			}
			h.fds = append(h.fds, fd)
			h.wg.Add(1)
			go h.read(fd)
		}
	}
	return h, nil
}

// packetSocket opens a cooked (network-layer) packet socket for one protocol on the
// link with the filter attached before it is bound, so that nothing unfiltered is
// ever queued.
func packetSocket(ifindex int, proto uint16, prog []bpf.RawInstruction) (int, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	filter := make([]unix.SockFilter, len(prog))
	for i, ins := range prog {
		filter[i] = unix.SockFilter{Code: ins.Op, Jt: ins.Jt, Jf: ins.Jf, K: ins.K}
	}
	fprog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &fprog); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("attach filter: %w", err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	// Wake the reader now and then, to see Stop.
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 20000})
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(proto), Ifindex: ifindex}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind packet socket: %w", err)
	}
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func (h *Held) read(fd int) {
	defer h.wg.Done()
	buf := make([]byte, 65536+256)
	for {
		select {
		case <-h.stop:
			// What arrived before Stop is still queued: take it too.
			for h.recv(fd, buf, unix.MSG_DONTWAIT) {
			}
			return
		default:
		}
		h.recv(fd, buf, 0)
	}
}

// recv takes one packet; false when none was there.
func (h *Held) recv(fd int, buf []byte, flags int) bool {
	n, from, err := unix.Recvfrom(fd, buf, flags)
	if err != nil {
		if !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EINTR) {
			h.fail(err)
		}
		return false
	}
	if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
		return true
	}
	pkt, ok := completeTCP(buf[:n])
	if !ok {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.pkts) >= MaxHeldPackets || h.bytes+len(pkt) > MaxHeldBytes {
		h.dropped++
		return true
	}
	h.pkts = append(h.pkts, pkt)
	h.bytes += len(pkt)
	return true
}

func (h *Held) fail(err error) {
	h.mu.Lock()
	if h.err == nil {
		h.err = err
	}
	h.mu.Unlock()
}

// Stop ends the capture and returns the packets held, oldest first, and how many
// were left out over the bounds. It may be called more than once.
func (h *Held) Stop() (pkts [][]byte, dropped int, err error) {
	h.once.Do(func() {
		close(h.stop)
		h.wg.Wait()
		for _, fd := range h.fds {
			unix.Close(fd)
		}
	})
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.pkts, h.dropped, h.err
}

// Replay hands held packets to this namespace's stack as if they had just arrived:
// each goes out of a raw socket to its own destination address, which is local here,
// so the kernel delivers it to the socket it belongs to. It returns how many went.
func (m *Manager) Replay(pkts [][]byte) (int, error) {
	if len(pkts) == 0 {
		return 0, nil
	}
	if err := m.begin(); err != nil {
		return 0, err
	}
	defer m.ops.RUnlock()
	sent := 0
	err := inNetns(m.ns, func() error {
		fds := map[int]int{} // by family
		defer func() {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}()
		var errs []error
		for _, p := range pkts {
			dst, family, ok := destination(p)
			if !ok {
				continue
			}
			fd, open := fds[family]
			if !open {
				var err error
				if fd, err = unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW); err != nil {
					return fmt.Errorf("raw socket: %w", err)
				}
				fds[family] = fd
			}
			var sa unix.Sockaddr
			if family == unix.AF_INET6 {
				sa = &unix.SockaddrInet6{Addr: dst.As16()}
			} else {
				sa = &unix.SockaddrInet4{Addr: dst.As4()}
			}
			if err := unix.Sendto(fd, p, 0, sa); err != nil {
				if len(errs) < 3 {
					errs = append(errs, fmt.Errorf("replay to %s: %w", dst, err))
				}
				continue
			}
			sent++
		}
		return errors.Join(errs...)
	})
	return sent, err
}

// destination returns an IP packet's destination address and family.
func destination(p []byte) (netip.Addr, int, bool) {
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(p[16:20])), unix.AF_INET, true
	case len(p) >= 40 && p[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(p[24:40])), unix.AF_INET6, true
	}
	return netip.Addr{}, 0, false
}

// completeTCP returns a copy of an IPv4 or IPv6 TCP packet, cut to its stated
// length, with its TCP checksum computed: a packet from a local peer (a veth) may
// carry only the partial sum its sender left to the hardware.
func completeTCP(b []byte) ([]byte, bool) {
	var hdr, total int
	var pseudo []byte
	switch {
	case len(b) >= 20 && b[0]>>4 == 4 && b[9] == unix.IPPROTO_TCP:
		hdr = int(b[0]&0xf) * 4
		total = int(binary.BigEndian.Uint16(b[2:4]))
		if hdr < 20 || total < hdr+20 || total > len(b) {
			return nil, false
		}
		pseudo = append(append([]byte{}, b[12:20]...), 0, unix.IPPROTO_TCP, byte((total-hdr)>>8), byte(total-hdr))
	case len(b) >= 40 && b[0]>>4 == 6 && b[6] == unix.IPPROTO_TCP:
		hdr = 40
		total = 40 + int(binary.BigEndian.Uint16(b[4:6]))
		if total < hdr+20 || total > len(b) {
			return nil, false
		}
		n := total - hdr
		pseudo = append(append([]byte{}, b[8:40]...), byte(n>>24), byte(n>>16), byte(n>>8), byte(n), 0, 0, 0, unix.IPPROTO_TCP)
	default:
		return nil, false
	}
	p := append([]byte(nil), b[:total]...)
	tcp := p[hdr:]
	tcp[16], tcp[17] = 0, 0
	sum := onesSum(onesSum(0, pseudo), tcp)
	binary.BigEndian.PutUint16(tcp[16:18], ^fold(sum))
	return p, true
}

func onesSum(sum uint32, b []byte) uint32 {
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// holdFilter is a classic BPF program for a cooked packet socket (offset 0 is the
// IP header) that keeps TCP packets to any of addrs.
func holdFilter(addrs []netip.Addr) ([]bpf.RawInstruction, error) {
	const accept, reject = 1 << 30, 1<<30 + 1 // placeholders, resolved below
	var ins []bpf.Instruction
	var targets []uint32 // for each instruction: accept, reject, or 0
	emit := func(i bpf.Instruction, target uint32) {
		ins = append(ins, i)
		targets = append(targets, target)
	}
	var v4, v6 []netip.Addr
	for _, a := range addrs {
		if a.Unmap().Is4() {
			v4 = append(v4, a.Unmap())
		} else {
			v6 = append(v6, a)
		}
	}
	// The version nibble.
	emit(bpf.LoadAbsolute{Off: 0, Size: 1}, 0)
	emit(bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 4}, 0)
	if len(v4) > 0 {
		// if version != 4 skip the IPv4 block
		skip := 2 + 1 + len(v4) + 1 // the protocol check, the load, the compares, the jump
		emit(bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 4, SkipTrue: uint8(skip)}, 0)
		emit(bpf.LoadAbsolute{Off: 9, Size: 1}, 0)
		emit(bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.IPPROTO_TCP}, reject)
		emit(bpf.LoadAbsolute{Off: 16, Size: 4}, 0)
		for _, a := range v4 {
			emit(bpf.JumpIf{Cond: bpf.JumpEqual, Val: binary.BigEndian.Uint32(a.AsSlice())}, accept)
		}
		emit(bpf.Jump{}, reject)
	}
	if len(v6) > 0 {
		// The version is still in A only if the IPv4 block was skipped: reload it.
		emit(bpf.LoadAbsolute{Off: 0, Size: 1}, 0)
		emit(bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 4}, 0)
		emit(bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: 6}, reject)
		emit(bpf.LoadAbsolute{Off: 6, Size: 1}, 0)
		emit(bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: unix.IPPROTO_TCP}, reject)
		for _, a := range v6 {
			b := a.As16()
			for w := 0; w < 4; w++ {
				emit(bpf.LoadAbsolute{Off: uint32(24 + 4*w), Size: 4}, 0)
				if w < 3 {
					// A mismatch skips this address's remaining loads and compares:
					// on to the next address, or to reject after the last.
					emit(bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: binary.BigEndian.Uint32(b[4*w:]), SkipTrue: uint8(2 * (3 - w))}, 0)
				} else {
					emit(bpf.JumpIf{Cond: bpf.JumpEqual, Val: binary.BigEndian.Uint32(b[4*w:])}, accept)
				}
			}
		}
	}
	emit(bpf.RetConstant{Val: 0}, 0)       // reject
	emit(bpf.RetConstant{Val: 1 << 18}, 0) // accept: the whole packet
	rejectAt, acceptAt := len(ins)-2, len(ins)-1
	// Resolve the jumps to accept and reject.
	for i := range ins {
		var to int
		switch targets[i] {
		case accept:
			to = acceptAt
		case reject:
			to = rejectAt
		default:
			continue
		}
		skip := to - i - 1
		if skip > 255 {
			return nil, fmt.Errorf("%d addresses: too many for one filter", len(addrs))
		}
		switch j := ins[i].(type) {
		case bpf.JumpIf:
			j.SkipTrue = uint8(skip)
			ins[i] = j
		case bpf.Jump:
			j.Skip = uint32(skip)
			ins[i] = j
		}
	}
	return bpf.Assemble(ins)
}
