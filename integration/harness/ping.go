package harness

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Ping sends ICMP echo requests from inside n to dst every 200 ms until one is
// answered (nil) or ctx ends. It uses a raw socket in n's namespace, so it needs
// root but no ping binary.
func (n *Node) Ping(ctx context.Context, dst netip.Addr) error {
	dst = dst.Unmap()
	family, proto, reqType, replyType := unix.AF_INET, unix.IPPROTO_ICMP, byte(8), byte(0)
	if dst.Is6() {
		family, proto, reqType, replyType = unix.AF_INET6, unix.IPPROTO_ICMPV6, 128, 129
	}
	var conn net.PacketConn
	err := inNetNS(n.NSPath, func() error {
		fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
		if err != nil {
			return fmt.Errorf("raw icmp socket: %w", err)
		}
		f := os.NewFile(uintptr(fd), "icmp")
		defer f.Close()
		conn, err = net.FilePacketConn(f)
		return err
	})
	if err != nil {
		return fmt.Errorf("ping %s from %s: %w", dst, n.Name, err)
	}
	defer conn.Close()

	var idb [2]byte
	_, _ = rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	to := &net.IPAddr{IP: dst.AsSlice()}
	buf := make([]byte, 1500)
	for seq := uint16(1); ; seq++ {
		msg := []byte{reqType, 0, 0, 0, idb[0], idb[1], byte(seq >> 8), byte(seq), 'd', 'p', 'x'}
		if dst.Is4() { // the kernel fills in ICMPv6 checksums, not ICMPv4 ones
			binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
		}
		if _, err := conn.WriteTo(msg, to); err != nil {
			return fmt.Errorf("ping %s from %s: send: %w", dst, n.Name, err)
		}
		wait := time.Now().Add(200 * time.Millisecond)
		if dl, ok := ctx.Deadline(); ok && dl.Before(wait) {
			wait = dl
		}
		_ = conn.SetReadDeadline(wait)
		for {
			k, from, err := conn.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break
				}
				return fmt.Errorf("ping %s from %s: receive: %w", dst, n.Name, err)
			}
			b := buf[:k]
			if dst.Is4() && len(b) > 0 { // IPv4 raw sockets deliver the IP header
				b = b[int(b[0]&0x0f)*4:]
			}
			var src netip.Addr
			if ipa, ok := from.(*net.IPAddr); ok {
				src, _ = netip.AddrFromSlice(ipa.IP)
			}
			if len(b) >= 8 && b[0] == replyType && binary.BigEndian.Uint16(b[4:]) == id && src.Unmap() == dst {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("ping %s from %s: no reply: %w", dst, n.Name, ctx.Err())
		default:
		}
	}
}

func icmpChecksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
