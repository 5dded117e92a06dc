package netfail

import (
	"net/netip"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

func ipPacket(dst string, proto byte) []byte {
	a := netip.MustParseAddr(dst)
	if a.Is4() {
		p := make([]byte, 40)
		p[0], p[9] = 0x45, proto
		copy(p[16:20], a.AsSlice())
		return p
	}
	p := make([]byte, 60)
	p[0], p[6] = 0x60, proto
	copy(p[24:40], a.AsSlice())
	return p
}

// The capture filter keeps TCP to the held addresses, of either family, and nothing else.
func TestHoldFilter(t *testing.T) {
	addrs := []netip.Addr{
		netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.1.2.4"),
		netip.MustParseAddr("fd00::1:3"), netip.MustParseAddr("fd00::2:3"),
	}
	for _, set := range [][]netip.Addr{addrs, addrs[:2], addrs[2:], addrs[3:]} {
		raw, err := holdFilter(set)
		if err != nil {
			t.Fatal(err)
		}
		var prog []bpf.Instruction
		for _, r := range raw {
			prog = append(prog, r.Disassemble())
		}
		vm, err := bpf.NewVM(prog)
		if err != nil {
			t.Fatal(err)
		}
		held := map[netip.Addr]bool{}
		for _, a := range set {
			held[a] = true
		}
		for _, tc := range []struct {
			dst   string
			proto byte
		}{
			{"10.1.2.3", unix.IPPROTO_TCP}, {"10.1.2.4", unix.IPPROTO_TCP}, {"10.1.2.5", unix.IPPROTO_TCP},
			{"10.1.2.3", unix.IPPROTO_UDP}, {"fd00::1:3", unix.IPPROTO_TCP}, {"fd00::2:3", unix.IPPROTO_TCP},
			{"fd00::1:4", unix.IPPROTO_TCP}, {"fd00::3", unix.IPPROTO_TCP}, {"fd00::1:3", unix.IPPROTO_UDP},
		} {
			n, err := vm.Run(ipPacket(tc.dst, tc.proto))
			if err != nil {
				t.Fatal(err)
			}
			want := held[netip.MustParseAddr(tc.dst)] && tc.proto == unix.IPPROTO_TCP
			if (n > 0) != want {
				t.Errorf("holding %v: packet to %s proto %d kept %v, want %v", set, tc.dst, tc.proto, n > 0, want)
			}
		}
	}
	if _, err := holdFilter(nil); err != nil {
		t.Errorf("empty set: %v", err)
	}
}

// A partial checksum (what a veth peer leaves to the hardware) is completed.
func TestCompleteTCP(t *testing.T) {
	p := ipPacket("10.1.2.3", unix.IPPROTO_TCP)
	p[2], p[3] = 0, 40 // total length
	copy(p[12:16], []byte{10, 1, 2, 9})
	p[20+12] = 5 << 4 // data offset
	p[20+16], p[20+17] = 0x12, 0x34
	q, ok := completeTCP(append(p, 0xde, 0xad)) // trailing bytes beyond the stated length
	if !ok || len(q) != 40 {
		t.Fatalf("complete: %v, %d bytes", ok, len(q))
	}
	// A correct checksum sums, with the pseudo-header, to all ones.
	pseudo := []byte{10, 1, 2, 9, 10, 1, 2, 3, 0, unix.IPPROTO_TCP, 0, 20}
	if s := fold(onesSum(onesSum(0, pseudo), q[20:])); s != 0xffff {
		t.Errorf("checksum does not verify: sum %#x", s)
	}
	if _, ok := completeTCP(ipPacket("10.1.2.3", unix.IPPROTO_UDP)); ok {
		t.Error("a UDP packet was taken")
	}
}
