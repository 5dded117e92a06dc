package netfail

import (
	"fmt"
	"net/netip"
	"strings"
)

// VIP is a service IP with its prefix length and the interface that carries it.
type VIP struct {
	Addr netip.Prefix // e.g. 10.77.0.100/24 or fd00::100/64; the host bits are kept
	Link string       // interface name, e.g. "eth0"
}

// ParseVIP parses "ADDR/BITS@LINK", e.g. "10.77.0.100/24@eth0" or "fd00::100/64@eth0".
// The prefix length is required: it decides the on-link route the address brings.
func ParseVIP(s string) (VIP, error) {
	at := strings.LastIndexByte(s, '@')
	if at < 0 {
		return VIP{}, fmt.Errorf("parse VIP %q: missing \"@link\" (want ADDR/BITS@LINK)", s)
	}
	addr, link := s[:at], s[at+1:]
	if addr == "" {
		return VIP{}, fmt.Errorf("parse VIP %q: missing address before \"@\"", s)
	}
	if !strings.Contains(addr, "/") {
		return VIP{}, fmt.Errorf("parse VIP %q: address %q has no prefix length (want e.g. %s/24)", s, addr, addr)
	}
	p, err := netip.ParsePrefix(addr)
	if err != nil {
		return VIP{}, fmt.Errorf("parse VIP %q: address %q: %w", s, addr, err)
	}
	v := VIP{Addr: p, Link: link}
	if err := v.check(); err != nil {
		return VIP{}, fmt.Errorf("parse VIP %q: %w", s, err)
	}
	return v, nil
}

// String returns the VIP in ParseVIP's format.
func (v VIP) String() string { return v.Addr.String() + "@" + v.Link }

// check reports what makes v unusable as a service IP.
func (v VIP) check() error {
	if err := checkLinkName(v.Link); err != nil {
		return err
	}
	if !v.Addr.IsValid() {
		return fmt.Errorf("address %s: not a valid prefix", v.Addr)
	}
	a := v.Addr.Addr()
	switch {
	case a.Is4In6():
		return fmt.Errorf("address %s: IPv4-mapped IPv6 address; write the IPv4 form", v.Addr)
	case a.Zone() != "":
		return fmt.Errorf("address %s: zone not allowed; the link names the interface", v.Addr)
	case a.IsUnspecified(), a.IsMulticast(), a.IsLoopback(), a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return fmt.Errorf("address %s: not a unicast address", v.Addr)
	}
	if a.Is4() && v.Addr.Bits() < 31 {
		network := v.Addr.Masked().Addr()
		b := network.As4()
		for i := v.Addr.Bits(); i < 32; i++ {
			b[i/8] |= 0x80 >> (i % 8)
		}
		switch a {
		case network:
			return fmt.Errorf("address %s: is the network address of %s", v.Addr, v.Addr.Masked())
		case netip.AddrFrom4(b):
			return fmt.Errorf("address %s: is the broadcast address of %s", v.Addr, v.Addr.Masked())
		}
	}
	return nil
}

// checkLinkName applies the kernel's rules for interface names (dev_valid_name).
func checkLinkName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("link name missing after \"@\"")
	case len(name) > 15:
		return fmt.Errorf("link %q: longer than 15 bytes", name)
	case name == "." || name == "..":
		return fmt.Errorf("link %q: not an interface name", name)
	case strings.ContainsAny(name, "/: \t\n\r\v\f"):
		return fmt.Errorf("link %q: contains '/', ':' or white space", name)
	}
	return nil
}
