package checkpoint

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// CRIU (4.2) corks its page-server socket at connect and sends the final close
// command without pushing it, so every page-server dump waits for the kernel's 200 ms
// cork timeout before the server acknowledges. uncorkPageServer finds that socket in
// the CRIU process and clears TCP_CORK (setting TCP_NODELAY), which sends whatever is
// queued at once and every later write immediately.
func uncorkPageServer(ctx context.Context, criuPid int, to Address) {
	if criuPid <= 0 {
		return
	}
	want, err := netip.ParseAddr(to.Host)
	if err != nil {
		return
	}
	pidfd, err := unix.PidfdOpen(criuPid, 0)
	if err != nil {
		return
	}
	defer unix.Close(pidfd)
	tick := time.NewTicker(500 * time.Microsecond)
	defer tick.Stop()
	seen := map[string]bool{}
	for {
		if fd := findPeer(criuPid, pidfd, want.Unmap(), to.Port, seen); fd >= 0 {
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
			_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_CORK, 0)
			unix.Close(fd)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// findPeer returns a duplicate of the CRIU process's TCP socket connected to
// addr:port, or -1. seen remembers descriptors already ruled out.
func findPeer(pid, pidfd int, addr netip.Addr, port int, seen map[string]bool) int {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return -1
	}
	for _, e := range ents {
		link, err := os.Readlink(dir + "/" + e.Name())
		if err != nil || !strings.HasPrefix(link, "socket:") || seen[e.Name()+link] {
			continue
		}
		n, _ := strconv.Atoi(e.Name())
		fd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			continue
		}
		if sa, err := unix.Getpeername(fd); err == nil && peerIs(sa, addr, port) {
			return fd
		}
		unix.Close(fd)
		seen[e.Name()+link] = true
	}
	return -1
}

func peerIs(sa unix.Sockaddr, addr netip.Addr, port int) bool {
	switch v := sa.(type) {
	case *unix.SockaddrInet4:
		return v.Port == port && netip.AddrFrom4(v.Addr) == addr
	case *unix.SockaddrInet6:
		return v.Port == port && netip.AddrFrom16(v.Addr).Unmap() == addr
	}
	return false
}
