package netfail

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

var (
	// ErrLinkNotFound means the VIP's interface does not exist in the Manager's
	// network namespace.
	ErrLinkNotFound = errors.New("link not found")
	// ErrNotAssigned means Announce was asked to advertise a VIP the link does not
	// hold: announcing it would pull the peers' traffic to a host that drops it.
	ErrNotAssigned = errors.New("address not assigned to link")
	// ErrClosed means the Manager was closed.
	ErrClosed = errors.New("manager closed")
)

// Manager adds, removes and announces VIPs in one network namespace. Its methods are
// safe for concurrent use. Every netlink request and every packet socket it uses lives
// in that namespace, whatever namespace the calling goroutine's thread is in.
type Manager struct {
	nsName string
	ns     netns.NsHandle
	h      *netlink.Handle

	// ops is held shared by every operation and exclusively by Close, which releases
	// h and ns only when no operation uses them.
	ops sync.RWMutex

	mu      sync.Mutex // guards closed, pending and gen
	closed  bool
	pending map[netip.Addr]*repeat // second bursts not yet sent, by VIP address
	gen     map[netip.Addr]uint64  // Removes per VIP address, see burst
	wg      sync.WaitGroup         // the goroutines sending second bursts

	linksMu sync.Mutex
	links   map[string]*linkState // by link name, see linkState
}

// New returns a Manager for the network namespace at netnsPath, e.g. /run/netns/NAME
// or /proc/PID/ns/net; "" means the namespace of the calling thread. Entering another
// namespace needs CAP_SYS_ADMIN; for "" CAP_NET_ADMIN (addresses) and CAP_NET_RAW
// (announcements) suffice.
func New(netnsPath string) (*Manager, error) {
	if netnsPath == "" {
		// The handle must not switch namespaces (netlink.NewHandleAt always does,
		// which needs CAP_SYS_ADMIN), and both must come from the same thread.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		ns, err := netns.Get()
		if err != nil {
			return nil, fmt.Errorf("open current netns: %w", err)
		}
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			ns.Close()
			return nil, fmt.Errorf("open netlink in current netns: %w", err)
		}
		return newManager("current", ns, h), nil
	}
	ns, err := netns.GetFromPath(netnsPath)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", netnsPath, err)
	}
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("open netlink in netns %s: %w", netnsPath, err)
	}
	return newManager(netnsPath, ns, h), nil
}

func newManager(name string, ns netns.NsHandle, h *netlink.Handle) *Manager {
	return &Manager{
		nsName:  name,
		ns:      ns,
		h:       h,
		pending: map[netip.Addr]*repeat{},
		gen:     map[netip.Addr]uint64{},
		links:   map[string]*linkState{},
	}
}

// Close stops pending second bursts, waits for their goroutines and releases the
// namespace. It leaves the addresses as they are. Closing twice is not an error.
func (m *Manager) Close() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	for _, r := range m.pending {
		r.cancel()
	}
	m.mu.Unlock()
	m.wg.Wait()

	m.ops.Lock()
	defer m.ops.Unlock()
	// Each close waits for an RCU grace period: close them side by side.
	errs := make([]error, 0, len(m.links)+1)
	var (
		wg    sync.WaitGroup
		errMu sync.Mutex
	)
	for name, ls := range m.links {
		wg.Go(func() {
			if err := ls.close(); err != nil {
				errMu.Lock()
				errs = append(errs, fmt.Errorf("close sockets of %s in netns %s: %w", name, m.nsName, err))
				errMu.Unlock()
			}
		})
	}
	wg.Wait()
	clear(m.links)
	m.h.Close()
	if err := m.ns.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close netns %s: %w", m.nsName, err))
	}
	return errors.Join(errs...)
}

// begin marks the start of an operation; the caller must call m.ops.RUnlock when done.
func (m *Manager) begin() error {
	m.ops.RLock()
	m.mu.Lock()
	closed := m.closed
	m.mu.Unlock()
	if closed {
		m.ops.RUnlock()
		return ErrClosed
	}
	return nil
}

// Add puts the VIP on its link. It is idempotent (RTM_NEWADDR with NLM_F_REPLACE).
// IPv6 VIPs are added with IFA_F_NODAD so they are usable at once instead of after
// duplicate address detection. Add does not tell the peers: call Announce.
func (m *Manager) Add(ctx context.Context, v VIP) error {
	if err := m.prepare(ctx, v); err != nil {
		return fmt.Errorf("add %s: %w", v, err)
	}
	defer m.ops.RUnlock()
	link, err := m.link(v)
	if err != nil {
		return fmt.Errorf("add %s: %w", v, err)
	}
	a := &netlink.Addr{IPNet: ipNet(v.Addr)}
	if v.Addr.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := m.h.AddrReplace(link, a); err != nil {
		return fmt.Errorf("add %s in netns %s: %w", v, m.nsName, err)
	}
	return nil
}

// Remove takes the VIP off its link and stops its announcements through this Manager:
// the rest of a burst in flight and the pending second burst. An absent
// address is not an error; a missing link is (ErrLinkNotFound), because a wrong link
// name must not pass for a removed VIP. The address is removed whatever prefix length
// it carries.
//
// IPv4: if the VIP is the primary address of its subnet on the link (the first one
// added), the kernel deletes the secondaries of that subnet with it unless
// net.ipv4.conf.LINK.promote_secondaries is 1. Give hosts their own address first, or
// set that sysctl.
func (m *Manager) Remove(ctx context.Context, v VIP) error {
	if err := m.prepare(ctx, v); err != nil {
		return fmt.Errorf("remove %s: %w", v, err)
	}
	defer m.ops.RUnlock()
	m.removing(v.Addr.Addr())
	link, err := m.link(v)
	if err != nil {
		return fmt.Errorf("remove %s: %w", v, err)
	}
	err = m.h.AddrDel(link, &netlink.Addr{IPNet: ipNet(v.Addr)})
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("remove %s in netns %s: %w", v, m.nsName, err)
	}
	// Not there with this prefix length: it may be there with another one.
	addrs, err := m.addrs(link, v)
	if err != nil {
		return fmt.Errorf("remove %s: %w", v, err)
	}
	for _, a := range addrs {
		if ip, _ := netip.AddrFromSlice(a.IP); ip.Unmap() == v.Addr.Addr() {
			if err := m.h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
				return fmt.Errorf("remove %s (as %s) in netns %s: %w", v, a.IPNet, m.nsName, err)
			}
		}
	}
	return nil
}

// Has reports whether the VIP's address is on its link with the VIP's prefix length.
func (m *Manager) Has(v VIP) (bool, error) {
	if err := m.prepare(context.Background(), v); err != nil {
		return false, fmt.Errorf("check %s: %w", v, err)
	}
	defer m.ops.RUnlock()
	link, err := m.link(v)
	if err != nil {
		return false, fmt.Errorf("check %s: %w", v, err)
	}
	addrs, err := m.addrs(link, v)
	if err != nil {
		return false, fmt.Errorf("check %s: %w", v, err)
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if ip.Unmap() == v.Addr.Addr() && ones == v.Addr.Bits() {
			return true, nil
		}
	}
	return false, nil
}

// prepare validates v, checks ctx and begins an operation.
func (m *Manager) prepare(ctx context.Context, v VIP) error {
	if err := v.check(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return m.begin()
}

// link looks up the VIP's interface in the Manager's namespace.
func (m *Manager) link(v VIP) (netlink.Link, error) {
	link, err := m.h.LinkByName(v.Link)
	if err != nil {
		if errors.As(err, &netlink.LinkNotFoundError{}) || errors.Is(err, unix.ENODEV) {
			return nil, fmt.Errorf("link %s in netns %s: %w", v.Link, m.nsName, ErrLinkNotFound)
		}
		return nil, fmt.Errorf("look up link %s in netns %s: %w", v.Link, m.nsName, err)
	}
	return link, nil
}

// addrs lists the link's addresses of the VIP's family. A dump interrupted by a
// concurrent change (NLM_F_DUMP_INTR) is retried.
func (m *Manager) addrs(link netlink.Link, v VIP) ([]netlink.Addr, error) {
	family := netlink.FAMILY_V4
	if v.Addr.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	var err error
	for range 5 {
		var addrs []netlink.Addr
		addrs, err = m.h.AddrList(link, family)
		if err == nil {
			return addrs, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return nil, fmt.Errorf("list addresses of %s in netns %s: %w", v.Link, m.nsName, err)
}

// assigned reports whether the VIP's address is on the link, with any prefix length.
func (m *Manager) assigned(link netlink.Link, v VIP) (bool, error) {
	addrs, err := m.addrs(link, v)
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		if ip, _ := netip.AddrFromSlice(a.IP); ip.Unmap() == v.Addr.Addr() {
			return true, nil
		}
	}
	return false, nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}
