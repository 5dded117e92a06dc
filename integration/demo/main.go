// Command demo shows duplex's live migration on one machine: two hosts and a client
// as network namespaces, duplexd on each host (embedded etcd on h0), a TCP echo
// service bound to a service address with a client streaming through it, a live
// migration from h0 to h1, and proof that the client never lost its connection.
// It cleans up after itself. `make demo` runs it as root.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/duplex-ha/duplex/integration/harness"
)

func main() {
	duplexd := flag.String("duplexd", "bin/duplexd", "duplexd binary")
	duplexctl := flag.String("duplexctl", "bin/duplexctl", "duplexctl binary")
	echo := flag.String("echoserver", "bin/echoserver", "echo server binary (the demo workload)")
	flag.Parse()
	if err := run(*duplexd, *duplexctl, *echo); err != nil {
		fmt.Fprintf(os.Stderr, "demo: %s\n", err)
		os.Exit(1)
	}
}

func say(format string, a ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", a...)
}

func run(duplexd, duplexctl, echo string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root (namespaces, cgroups, CRIU)")
	}
	for _, p := range []*string{&duplexd, &duplexctl, &echo} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		if _, err := os.Stat(abs); err != nil {
			return fmt.Errorf("%s: %w (run 'make build' first)", abs, err)
		}
		*p = abs
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	say("Building a cluster on this machine: hosts h0 and h1 and a client c0, each a network namespace on one bridge")
	c, err := harness.New(ctx, harness.Options{Prefix: "dpxdemo", Hosts: 2, Clients: 1})
	if err != nil {
		return err
	}
	defer func() {
		say("Cleaning up: namespaces, processes, cgroups")
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: cleanup:", err)
		}
	}()
	for _, n := range c.Nodes() {
		fmt.Printf("    %-3s %-15s %s\n", n.Name, n.Addr, n.MAC)
	}

	dir, err := os.MkdirTemp("", "duplex-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	say("Starting duplexd on h0 and h1 (mutual TLS between agents, embedded etcd on h0)")
	d, err := harness.StartDuplex(ctx, c, harness.DuplexOptions{
		Duplexd: duplexd, Duplexctl: duplexctl, Dir: dir, CgroupParent: filepath.Base(dir),
	})
	if err != nil {
		return err
	}
	defer func() {
		for _, h := range d.Hosts {
			out, _ := h.Ctl(context.Background(), "ps", "-q")
			for _, name := range strings.Fields(out) {
				_, _ = h.Ctl(context.Background(), "stop", "--timeout", "0s", name)
			}
		}
		d.Stop()
		for _, root := range []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified"} {
			os.Remove(filepath.Join(root, filepath.Base(dir)))
		}
	}()
	h0, h1, client := d.Hosts[0], d.Hosts[1], c.Clients[0]
	show(h0, "hosts")

	vip := c.VIP(0)
	addr := netip.AddrPortFrom(vip.Addr(), 9000)
	say("Running an echo service on h0, bound to the service address %s", vip.Addr())
	if _, err := h0.Ctl(ctx, "run", "echo", "--vip", vip.String()+"@eth0", "--env", "GODEBUG=multipathtcp=0", "--", echo, "-listen", addr.String()); err != nil {
		return err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		out, _ := h0.Ctl(ctx, "logs", "echo")
		if strings.Contains(out, "LISTENING") {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the echo service did not start:\n%s", out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	show(h0, "ps")

	say("The client c0 streams 512 KiB/s through %s and checks every echoed byte", addr)
	s, err := harness.StartStream(ctx, client, addr, 512<<10, 4096)
	if err != nil {
		return err
	}
	time.Sleep(2 * time.Second)
	before := s.Stats()
	fmt.Printf("    verified so far: %d KiB, longest pause %s, client resolves %s to %s (h0)\n",
		before.BytesVerified>>10, before.MaxGap.Round(time.Millisecond), vip.Addr(), neighbour(client, vip.Addr()))

	say("Live-migrating the echo service from h0 to h1 while the client streams")
	cmd := exec.CommandContext(ctx, duplexctl, "--socket", h0.Socket, "migrate", "echo", "--to", "h1")
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stdout
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}

	time.Sleep(2 * time.Second)
	after := s.Stop()
	say("What the client saw")
	fmt.Printf("    bytes sent %d KiB, verified %d KiB, errors: %v, reconnects: %d\n",
		after.BytesSent>>10, after.BytesVerified>>10, errText(after.Err), after.Reconnects)
	fmt.Printf("    longest pause between echoes: %s\n", after.MaxGap.Round(time.Millisecond))
	fmt.Printf("    client now resolves %s to %s (h1 is %s)\n", vip.Addr(), neighbour(client, vip.Addr()), h1.Node.MAC)
	show(h1, "ps")
	show(h0, "ps", "-a")
	if after.Err != nil {
		return fmt.Errorf("the client's stream broke: %w", after.Err)
	}
	say("The service moved hosts live; the client kept its TCP connection and lost no byte")
	return nil
}

func show(h *harness.Daemon, args ...string) {
	out, err := h.Ctl(context.Background(), args...)
	fmt.Printf("    $ duplexctl %s   (on %s)\n", strings.Join(args, " "), h.Node.Name)
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		fmt.Println("    " + l)
	}
	if err != nil {
		fmt.Println("    error:", err)
	}
}

func neighbour(client *harness.Node, ip netip.Addr) string {
	out, err := client.Command(context.Background(), "ip", "neigh", "show", ip.String()).CombinedOutput()
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(out))
	for i, w := range f {
		if w == "lladdr" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return "none"
}

func errText(err error) string {
	if err == nil {
		return "none"
	}
	return err.Error()
}
