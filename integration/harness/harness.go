package harness

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Address plan inside Options.Subnet (offsets from the network address).
const (
	hostBase   = 10  // hosts: .10 ...
	maxHosts   = 90  // ... .99
	clientBase = 100 // clients: .100 ...
	maxClients = 100 // ... .199
	vipBase    = 200 // service IPs: .200 ...
	maxVIPs    = 51  // ... .250
)

// LinkName is the interface every node has towards the bridge.
const LinkName = "eth0"

// BridgeName is the bridge inside the cluster's switch namespace.
const BridgeName = "br0"

// DefaultPrefix starts every namespace name unless Options.Prefix says otherwise;
// scripts/clean-leftovers.sh removes leftovers whose names start with it.
const DefaultPrefix = "dpx"

// cmdTimeout bounds each ip command run by Close (New uses the caller's context).
const cmdTimeout = 10 * time.Second

var (
	// ErrInvalidOptions is returned by New for Options it cannot build.
	ErrInvalidOptions = errors.New("invalid harness options")
	// ErrClosed is returned when starting a process in a closed cluster.
	ErrClosed = errors.New("harness cluster closed")

	errInjected = errors.New("injected failure")
	prefixRE    = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_]{0,23}$`)
)

// Options describe the cluster New builds.
type Options struct {
	// Prefix starts the name of every namespace; default "dpx". A random suffix is
	// always added. Keep it starting with "dpx" so scripts/clean-leftovers.sh finds
	// the leftovers of a crashed run.
	Prefix string
	// Hosts is the number of host namespaces (h0, h1, ...), 1 to 90.
	Hosts int
	// Clients is the number of client namespaces (c0, c1, ...), 0 to 100.
	Clients int
	// Subnet is the IPv4 network of the bridge, at most a /24; default 10.77.<random>.0/24.
	// Hosts get .10, .11, ...; clients .100, ...; VIP(i) is .200+i.
	Subnet string

	failAt string // a step name that fails on purpose (tests)
}

// Node is one host or client: a network namespace with one link to the bridge.
type Node struct {
	Name   string           // "h0", "c0"
	NetNS  string           // namespace name as in `ip netns list`
	NSPath string           // /run/netns/<NetNS>
	Link   string           // interface inside the namespace: always "eth0"
	Addr   netip.Prefix     // IPv4 address with the subnet's length
	Addr6  netip.Prefix     // IPv6 address, fd00:77:<x>::<host>/64
	MAC    net.HardwareAddr // of Link
}

// Cluster is a set of nodes joined by a bridge in a switch namespace. Nothing of it
// lives in the caller's network namespace, so it cannot reach the outside world.
type Cluster struct {
	Name    string // Prefix plus random suffix; every namespace name starts with Name+"-"
	Hosts   []*Node
	Clients []*Node
	Subnet  netip.Prefix
	Subnet6 netip.Prefix
	Switch  string // namespace holding the bridge BridgeName; node n's port is named n.Name

	mu         sync.Mutex
	namespaces []string
	procs      []*Proc
	closed     bool
}

// New builds the cluster: a switch namespace with a bridge, and for each node a
// namespace whose eth0 is a veth pair with the other end on the bridge, loopback and
// eth0 up, IPv6 enabled, IPv4 and IPv6 addresses assigned. On failure it removes
// what it built and returns the step that failed.
func New(ctx context.Context, o Options) (*Cluster, error) {
	c, err := plan(o)
	if err != nil {
		return nil, err
	}
	if err := c.build(ctx, o.failAt); err != nil {
		err = fmt.Errorf("build cluster %s: %w", c.Name, err)
		if cerr := c.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up after failure: %w", cerr))
		}
		return nil, err
	}
	return c, nil
}

// plan validates o and fills in names and addresses without touching the system.
func plan(o Options) (*Cluster, error) {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if !prefixRE.MatchString(o.Prefix) {
		return nil, fmt.Errorf("%w: prefix %q: want 1-24 letters, digits or '_'", ErrInvalidOptions, o.Prefix)
	}
	if o.Hosts < 1 || o.Hosts > maxHosts {
		return nil, fmt.Errorf("%w: %d hosts: want 1 to %d", ErrInvalidOptions, o.Hosts, maxHosts)
	}
	if o.Clients < 0 || o.Clients > maxClients {
		return nil, fmt.Errorf("%w: %d clients: want 0 to %d", ErrInvalidOptions, o.Clients, maxClients)
	}
	rnd := make([]byte, 5)
	if _, err := rand.Read(rnd); err != nil {
		return nil, fmt.Errorf("random suffix: %w", err)
	}
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, rnd[4], 0}), 24)
	if o.Subnet != "" {
		p, err := netip.ParsePrefix(o.Subnet)
		if err != nil {
			return nil, fmt.Errorf("%w: subnet: %w", ErrInvalidOptions, err)
		}
		if !p.Addr().Is4() || p.Bits() < 8 || p.Bits() > 24 {
			return nil, fmt.Errorf("%w: subnet %s: want an IPv4 network of /8 to /24", ErrInvalidOptions, p)
		}
		subnet = p.Masked()
	}
	c := &Cluster{Name: o.Prefix + "-" + hex.EncodeToString(rnd[:4]), Subnet: subnet}
	third := subnet.Addr().As4()[2]
	c.Subnet6 = netip.PrefixFrom(netip.AddrFrom16([16]byte{
		0xfd, 0x00, 0x00, 0x77, byte(decAsHex(int(third)) >> 8), byte(decAsHex(int(third))),
	}), 64)
	c.Switch = c.Name + "-sw"
	for i := range o.Hosts {
		c.Hosts = append(c.Hosts, c.node(fmt.Sprintf("h%d", i), hostBase+i))
	}
	for i := range o.Clients {
		c.Clients = append(c.Clients, c.node(fmt.Sprintf("c%d", i), clientBase+i))
	}
	return c, nil
}

func (c *Cluster) node(name string, off int) *Node {
	a4 := c.addr4(off)
	b := a4.As4()
	ns := c.Name + "-" + name
	return &Node{
		Name:   name,
		NetNS:  ns,
		NSPath: "/run/netns/" + ns,
		Link:   LinkName,
		Addr:   netip.PrefixFrom(a4, c.Subnet.Bits()),
		Addr6:  netip.PrefixFrom(c.addr6(off), 64),
		MAC:    net.HardwareAddr{0x02, 0x77, b[0], b[1], b[2], b[3]},
	}
}

func (c *Cluster) addr4(off int) netip.Addr {
	b := c.Subnet.Addr().As4()
	var out [4]byte
	binary.BigEndian.PutUint32(out[:], binary.BigEndian.Uint32(b[:])+uint32(off))
	return netip.AddrFrom4(out)
}

// addr6 mirrors the IPv4 offset in the last group, written in decimal digits so that
// 10.77.5.10 pairs with fd00:77:5::10.
func (c *Cluster) addr6(off int) netip.Addr {
	b := c.Subnet6.Addr().As16()
	v := decAsHex(off)
	b[14], b[15] = byte(v>>8), byte(v)
	return netip.AddrFrom16(b)
}

// decAsHex reads n's decimal digits as hexadecimal (n < 10000).
func decAsHex(n int) uint16 {
	v, _ := strconv.ParseUint(strconv.Itoa(n), 16, 16)
	return uint16(v)
}

// VIP returns the i-th free address for service IPs (.200+i, i from 0 to 50) with the
// subnet's prefix length. It panics for other i.
func (c *Cluster) VIP(i int) netip.Prefix {
	if i < 0 || i >= maxVIPs {
		panic(fmt.Sprintf("harness: VIP(%d): want 0 to %d", i, maxVIPs-1))
	}
	return netip.PrefixFrom(c.addr4(vipBase+i), c.Subnet.Bits())
}

// VIP6 is VIP's IPv6 counterpart in Subnet6 (fd00:77:<x>::200+i/64).
func (c *Cluster) VIP6(i int) netip.Prefix {
	if i < 0 || i >= maxVIPs {
		panic(fmt.Sprintf("harness: VIP6(%d): want 0 to %d", i, maxVIPs-1))
	}
	return netip.PrefixFrom(c.addr6(vipBase+i), 64)
}

// Nodes returns the hosts followed by the clients.
func (c *Cluster) Nodes() []*Node {
	return append(append([]*Node(nil), c.Hosts...), c.Clients...)
}

// Node returns the node called name ("h0", "c1"), or nil.
func (c *Cluster) Node(name string) *Node {
	for _, n := range c.Nodes() {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func (c *Cluster) build(ctx context.Context, failAt string) error {
	step := func(name string, fn func() error) error {
		if name == failAt {
			return fmt.Errorf("%s: %w", name, errInjected)
		}
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}
	ip := func(name string, args ...string) error {
		return step(name, func() error { return runIP(ctx, args...) })
	}
	sw := c.Switch
	if err := step("switch netns", func() error { return c.addNS(ctx, sw) }); err != nil {
		return err
	}
	if err := ip("switch lo", "-n", sw, "link", "set", "lo", "up"); err != nil {
		return err
	}
	if err := ip("switch bridge", "-n", sw, "link", "add", BridgeName, "type", "bridge",
		"stp_state", "0", "forward_delay", "0", "mcast_snooping", "0"); err != nil {
		return err
	}
	if err := ip("switch bridge up", "-n", sw, "link", "set", BridgeName, "up"); err != nil {
		return err
	}
	for _, n := range c.Nodes() {
		steps := []struct {
			name string
			fn   func() error
		}{
			{"netns", func() error { return c.addNS(ctx, n.NetNS) }},
			{"sysctl", func() error {
				for _, k := range []string{"net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"} {
					if err := writeSysctl(n.NSPath, k, "0"); err != nil {
						return err
					}
				}
				return nil
			}},
			{"lo", func() error { return runIP(ctx, "-n", n.NetNS, "link", "set", "lo", "up") }},
			{"veth", func() error {
				return runIP(ctx, "link", "add", n.Link, "netns", n.NetNS, "address", n.MAC.String(),
					"type", "veth", "peer", "name", n.Name, "netns", sw)
			}},
			{"port", func() error {
				return runIP(ctx, "-n", sw, "link", "set", n.Name, "master", BridgeName, "up")
			}},
			{"addr", func() error {
				return runIP(ctx, "-n", n.NetNS, "addr", "add", n.Addr.String(), "dev", n.Link)
			}},
			{"addr6", func() error {
				return runIP(ctx, "-n", n.NetNS, "addr", "add", n.Addr6.String(), "dev", n.Link, "nodad")
			}},
			{"up", func() error { return runIP(ctx, "-n", n.NetNS, "link", "set", n.Link, "up") }},
		}
		for _, s := range steps {
			if err := step(n.Name+" "+s.name, s.fn); err != nil {
				return err
			}
		}
	}
	return nil
}

// addNS creates a named network namespace and registers it for Close first, so a
// half-done `ip netns add` is cleaned up too.
func (c *Cluster) addNS(ctx context.Context, name string) error {
	c.mu.Lock()
	c.namespaces = append(c.namespaces, name)
	c.mu.Unlock()
	return runIP(ctx, "netns", "add", name)
}

func runIP(ctx context.Context, args ...string) error {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "ip", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, msg)
		}
		return fmt.Errorf("ip %s: %w", strings.Join(args, " "), err)
	}
	return nil
}

// Close kills every process started through the cluster and any other process still
// inside its namespaces, then deletes the namespaces (and with them every link). It
// is idempotent and safe after a failed New.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	procs, namespaces := c.procs, c.namespaces
	c.mu.Unlock()

	var errs []error
	for _, p := range procs {
		p.signalGroup(sigKill)
	}
	var refs []nsRef
	for _, ns := range namespaces {
		path := "/run/netns/" + ns
		id, err := statNS(path)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("stat netns %s: %w", ns, err))
			}
			continue
		}
		refs = append(refs, nsRef{path: path, id: id})
	}
	if left := killHolders(refs, 5*time.Second); len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes %v survive SIGKILL in cluster %s", left, c.Name))
	}
	deadline := time.After(5 * time.Second)
	for _, p := range procs {
		select {
		case <-p.done:
		case <-deadline:
			errs = append(errs, fmt.Errorf("process %d (%s) not reaped", p.Pid(), p.Name))
		}
	}
	for i := len(namespaces) - 1; i >= 0; i-- {
		ns := namespaces[i]
		if _, err := os.Stat("/run/netns/" + ns); errors.Is(err, os.ErrNotExist) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
		if err := runIP(ctx, "netns", "delete", ns); err != nil {
			errs = append(errs, fmt.Errorf("delete netns %s: %w", ns, err))
		}
		cancel()
	}
	return errors.Join(errs...)
}
