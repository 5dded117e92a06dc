package netfail_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/duplex-ha/duplex/netfail"
)

func TestParseVIP(t *testing.T) {
	good := []struct {
		in   string
		addr string
		link string
	}{
		{"10.77.0.100/24@eth0", "10.77.0.100/24", "eth0"},
		{"10.0.0.1/32@bond0.100", "10.0.0.1/32", "bond0.100"},
		{"192.168.1.1/31@e", "192.168.1.1/31", "e"},
		{"fd00::100/64@eth0", "fd00::100/64", "eth0"},
		{"2001:db8::1/128@enp0s31f6", "2001:db8::1/128", "enp0s31f6"},
		{"fd00::/64@eth0", "fd00::/64", "eth0"},
		{"10.0.0.5/24@abcdefghijklmno", "10.0.0.5/24", "abcdefghijklmno"},
	}
	for _, c := range good {
		v, err := netfail.ParseVIP(c.in)
		if err != nil {
			t.Errorf("ParseVIP(%q): %v", c.in, err)
			continue
		}
		if v.Addr != netip.MustParsePrefix(c.addr) || v.Link != c.link {
			t.Errorf("ParseVIP(%q) = %+v, want %s on %s", c.in, v, c.addr, c.link)
		}
		if v.String() != c.in {
			t.Errorf("ParseVIP(%q).String() = %q", c.in, v.String())
		}
	}

	bad := []struct {
		in   string
		want string // part the error must name
	}{
		{"", `missing "@link"`},
		{"10.77.0.100/24", `missing "@link"`},
		{"10.77.0.100/24@", "link name missing"},
		{"@eth0", "missing address"},
		{"10.77.0.100@eth0", `address "10.77.0.100" has no prefix length`},
		{"10.77.0.300/24@eth0", `address "10.77.0.300/24"`},
		{"10.77.0.1/33@eth0", `address "10.77.0.1/33"`},
		{"fd00::1/129@eth0", `address "fd00::1/129"`},
		{"eth0@10.77.0.1/24", `address "eth0"`},
		{"fe80::1%eth0/64@eth0", `address "fe80::1%eth0/64"`},
		{"10.77.0.1/24@abcdefghijklmnop", `link "abcdefghijklmnop": longer than 15`},
		{"10.77.0.1/24@eth 0", `link "eth 0"`},
		{"10.77.0.1/24@eth0:1", `link "eth0:1"`},
		{"10.77.0.1/24@a/b", `link "a/b"`},
		{"10.77.0.1/24@..", `link ".."`},
		{"0.0.0.0/0@eth0", "not a unicast address"},
		{"224.0.0.1/24@eth0", "not a unicast address"},
		{"127.0.0.2/8@eth0", "not a unicast address"},
		{"ff02::1/64@eth0", "not a unicast address"},
		{"::ffff:10.0.0.1/120@eth0", "IPv4-mapped"},
		{"10.77.0.0/24@eth0", "network address of 10.77.0.0/24"},
		{"10.77.0.255/24@eth0", "broadcast address of 10.77.0.0/24"},
	}
	for _, c := range bad {
		v, err := netfail.ParseVIP(c.in)
		if err == nil {
			t.Errorf("ParseVIP(%q) = %v, want error naming %q", c.in, v, c.want)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseVIP(%q) error %q does not name %q", c.in, err, c.want)
		}
	}
}
