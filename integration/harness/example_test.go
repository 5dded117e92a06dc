package harness_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/duplex-ha/duplex/integration/harness"
)

// A demo program's use: two hosts and a client, an echo server on h0, and a stream
// from the client that must outlive whatever happens to h0 meanwhile. Needs root.
func ExampleNew() {
	ctx := context.Background()
	c, err := harness.New(ctx, harness.Options{Hosts: 2, Clients: 1})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	defer c.Close()
	h0, c0 := c.Hosts[0], c.Clients[0]
	vip := c.VIP(0) // the service IP, which moves with the workload
	if out, err := h0.Command(ctx, "ip", "addr", "add", vip.String(), "dev", h0.Link).CombinedOutput(); err != nil {
		fmt.Fprintln(os.Stderr, err, string(out))
		return
	}

	cmd := h0.Command(ctx, "/path/to/echoserver", "-listen", vip.Addr().String()+":7777")
	cmd.Env = append(os.Environ(), "GODEBUG=multipathtcp=0")
	srv, err := c.StartCmd(cmd)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	defer srv.Stop(syscall.SIGTERM, time.Second)
	if err := srv.WaitOutput(ctx, "LISTENING"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}

	s, err := harness.StartStream(ctx, c0, netip.AddrPortFrom(vip.Addr(), 7777), 64<<10, 1024)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return
	}
	time.Sleep(time.Second) // ... migrate the echo server and the VIP to h1 here ...
	st := s.Stop()
	fmt.Printf("verified %d of %d bytes, longest gap %s, error %v\n", st.BytesVerified, st.BytesSent, st.MaxGap, st.Err)
}
